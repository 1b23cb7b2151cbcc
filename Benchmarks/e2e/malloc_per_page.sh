#!/usr/bin/env bash
# Does the migration allocate per page? Count its malloc calls (LD_PRELOAD counter) across a
# whole migration of a small and of a large guest: a per-page allocation would add one call per
# page, i.e. ~190,000 more for 1000M than for 256M.
#   Benchmarks/e2e/malloc_per_page.sh        (after swift build -c release)
set -euo pipefail
cd "$(dirname "$0")/../.."
B=.build/release/postcopy
SO=/tmp/malloc_count.so
gcc -O2 -shared -fPIC -o "$SO" Benchmarks/e2e/malloc_count.c
D=$(mktemp -d)
trap 'pkill -f "$D/" 2>/dev/null || true; rm -rf "$D"' EXIT
count() { kill -USR2 "$1"; sleep 0.3; grep mallocs "$2" | tail -1 | awk '{print $2}'; }
for MEM in 256M 1000M; do
  PORT=$((20000 + RANDOM % 20000))
  LD_PRELOAD=$SO $B host --memory $MEM --vcpus 2 --workload linear --qmp $D/dst.qmp --incoming tcp:127.0.0.1:$PORT 2>$D/dst.log &
  DP=$!
  LD_PRELOAD=$SO $B host --memory $MEM --vcpus 2 --workload linear --qmp $D/src.qmp --serial $D/src.serial 2>$D/src.log &
  SP=$!
  sleep 2
  $B monitor $D/dst.qmp 'migrate_set_capability postcopy-ram on' >/dev/null
  $B monitor $D/src.qmp 'migrate_set_capability postcopy-ram on' 'migrate_set_parameter max-bandwidth 100G' >/dev/null
  before=$(count $DP $D/dst.log); sbefore=$(count $SP $D/src.log)
  $B monitor $D/src.qmp "migrate -d tcp:127.0.0.1:$PORT" >/dev/null
  sleep 0.5
  $B monitor $D/src.qmp migrate_start_postcopy >/dev/null
  until $B monitor $D/src.qmp 'info migrate' | grep -q 'status: completed'; do sleep 0.1; done
  sleep 0.5
  after=$(count $DP $D/dst.log); safter=$(count $SP $D/src.log)
  pages=$(( ${MEM%M} * 256 ))
  echo "$MEM ($pages pages): malloc calls during the migration: destination $((after - before)), source $((safter - sbefore)) (its monitor answered the polling)"
  kill $SP $DP; wait $SP $DP 2>/dev/null || true
  rm -f $D/*.qmp $D/*.log
done
