#!/usr/bin/env bash
# Installs what building, running and testing this package needs, and nothing that is already there.
# `make demo`, `make test` and `.ci/run` all call it. Without root it installs nothing and prints
# the one command to run.
#
#   scripts/setup.sh          what the build and the demo need (C headers for the shim, OpenSSL)
#   scripts/setup.sh --test   also what the test suites need (iproute2, python3 + qemu.qmp)
#   scripts/setup.sh --bench  also what the end-to-end benchmarks' plots need (python3 + matplotlib)
set -euo pipefail

want_tests=0
want_bench=0
[ "${1:-}" = "--test" ] && want_tests=1
[ "${1:-}" = "--bench" ] && want_bench=1

apt_need=()
[ -f /usr/include/linux/userfaultfd.h ] || apt_need+=(linux-libc-dev)
[ -f /usr/include/openssl/ssl.h ] || apt_need+=(libssl-dev)   # TLS on the migration channels
[ -f /usr/include/liburing.h ] || apt_need+=(liburing-dev)    # snapshot restores read through io_uring
command -v cc >/dev/null || apt_need+=(gcc)
if [ $want_tests = 1 ]; then
  { [ -x /usr/sbin/ip ] || [ -x /sbin/ip ]; } && { [ -x /usr/sbin/tc ] || [ -x /sbin/tc ]; } || apt_need+=(iproute2)   # network-namespace tests
  command -v python3 >/dev/null || apt_need+=(python3 python3-pip)
fi
if [ $want_bench = 1 ]; then
  command -v python3 >/dev/null || apt_need+=(python3 python3-pip)
fi

pip_need=()
if [ $want_tests = 1 ]; then
  # The QMP compatibility tests drive the host with QEMU's own Python client; they are not optional.
  python3 -c 'import qemu.qmp' 2>/dev/null || pip_need+=(qemu.qmp)
fi
if [ $want_bench = 1 ]; then
  # Benchmarks/e2e/plot_timeline.py draws x-timeline files as SVG.
  python3 -c 'import matplotlib' 2>/dev/null || pip_need+=(matplotlib)
fi

if [ ${#apt_need[@]} -eq 0 ] && [ ${#pip_need[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  missing=("${apt_need[@]}" "${pip_need[@]}")
  echo "setup: missing ${missing[*]}" >&2
  echo "setup: run this once as root, then try again:" >&2
  cmd=""
  [ ${#apt_need[@]} -gt 0 ] && cmd="apt-get install -y ${apt_need[*]}"
  [ ${#pip_need[@]} -gt 0 ] && cmd="${cmd:+$cmd && }python3 -m pip install ${pip_need[*]}"
  echo "  sudo sh -c '$cmd'" >&2
  exit 1
fi

if [ ${#apt_need[@]} -gt 0 ]; then
  echo "setup: installing ${apt_need[*]} with apt" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_need[@]}" >/dev/null
fi
if [ ${#pip_need[@]} -gt 0 ]; then
  echo "setup: installing ${pip_need[*]} with pip" >&2
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check "${pip_need[@]}" \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages "${pip_need[@]}"
  for module in "${pip_need[@]}"; do
    python3 -c "import $module" || { echo "setup: $module still does not import after pip install" >&2; exit 1; }
  done
fi
