#!/usr/bin/env python3
"""What TLS costs a migration: the same migration in plaintext and under TLS (PSK, TLS 1.3),
alternating in one run, so both see the same machine.

Each run starts a destination `postcopy host --incoming` and a source `postcopy host` with a
`linear` guest (every vCPU writes every page, sweep after sweep), waits for two passes,
migrates with postcopy-ram (and postcopy-preempt with --preempt) over multifd, switches to
postcopy after --precopy-seconds, and waits until both sides report completed; then the
destination's `x-check-memory` must be ok. Under TLS both hosts get a `tls-creds-psk` object
made from a fresh `keys.psk` and `tls-creds` set, so every channel (main and its return path,
urgent, each multifd lane) runs TLS. Run k goes plaintext first when k is even, TLS first when
odd.

  python3 Benchmarks/e2e/tls_cost.py --binary .build/release/postcopy --runs 3 --memory 1000M

Prints one line per migration, then per mode the median and range of the source's total time
and throughput (QEMU's mbps: bytes sent * 8 / total time) and the CPU time both hosts spent
on the migration outside their vCPU threads (senders, receivers, fault thread, request server),
the ratios TLS / plaintext, and a JSON summary as the last line. With --before BINARY, every
run also migrates with that build, both ways, so a change is measured against its base in
the same run. Exits non-zero if a migration failed or a memory check did not
come out ok; that run's host logs are kept and their path printed.
"""
import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


from proc_stats import cpu_ticks, tasks
from recovery import Monitor, RunFailed, free_port  # one QMP client for the e2e scripts


def non_vcpu_cpu_seconds(pid):
    """CPU time of a host so far, minus its vCPU threads' (which live as long as the host;
    the migration threads that ended are still counted in the process's total)."""
    _, total = cpu_ticks(f"/proc/{pid}/stat")
    for task in tasks(pid):
        try:
            name, ticks = cpu_ticks(f"/proc/{pid}/task/{task}/stat")
        except OSError:
            continue
        if name.startswith("vcpu"):
            total -= ticks
    return total / os.sysconf("SC_CLK_TCK")


def migrate(binary, tls, args):
    """One migration; returns the source's figures."""
    work = tempfile.mkdtemp(prefix="tls-cost-")
    port = free_port()
    hosts = []
    failed = True
    try:
        objects = {"dst": [], "src": []}
        if tls:
            with open(os.path.join(work, "keys.psk"), "w") as f:
                f.write(f"qemu:{secrets.token_hex(32)}\n")
            os.chmod(os.path.join(work, "keys.psk"), 0o600)
            objects = {side: ["--object", f"tls-creds-psk,id=tls0,endpoint={endpoint},dir={work}"]
                       for side, endpoint in (("dst", "server"), ("src", "client"))}
        monitors = {}
        for side in ("dst", "src"):
            cmd = [binary, "host", "--memory", args.memory, "--vcpus", str(args.vcpus), "--workload", "linear",
                   "--qmp", os.path.join(work, f"{side}.qmp"), "--serial", os.path.join(work, f"{side}.serial"),
                   "--log-level", "warning"] + objects[side]
            if side == "dst":
                cmd += ["--incoming", f"tcp:127.0.0.1:{port}"]
            log = open(os.path.join(work, f"{side}.log"), "w")
            hosts.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
            monitors[side] = Monitor(os.path.join(work, f"{side}.qmp"), side)
        src, dst = monitors["src"], monitors["dst"]
        serial = os.path.join(work, "src.serial")
        deadline = time.monotonic() + 120
        while open(serial, "rb").read().count(b"B") < 2:
            if time.monotonic() > deadline:
                raise RunFailed("the source's workload did not make 2 passes in 120 s")
            time.sleep(0.05)
        capabilities = ["postcopy-ram", "multifd"] + (["postcopy-preempt"] if args.preempt else [])
        for side in (src, dst):
            side("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in capabilities])
            side("migrate-set-parameters", **{"multifd-channels": args.multifd_channels})
            if tls:
                side("migrate-set-parameters", **{"tls-creds": "tls0"})
        src("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
        cpu_before = sum(non_vcpu_cpu_seconds(host.pid) for host in hosts)
        src("migrate", uri=f"tcp:127.0.0.1:{port}")
        time.sleep(args.precopy_seconds)
        src("migrate-start-postcopy")
        deadline = time.monotonic() + 600
        while True:
            info = src("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise RunFailed("the migration did not end within 600 s")
            time.sleep(0.05)
        if info["status"] != "completed":
            raise RunFailed(f"the migration ended {info['status']}: {info.get('error-desc')}")
        deadline = time.monotonic() + 60
        while dst("query-migrate").get("status") != "completed":
            if time.monotonic() > deadline:
                raise RunFailed("the destination did not complete within 60 s of the source")
            time.sleep(0.05)
        cpu = sum(non_vcpu_cpu_seconds(host.pid) for host in hosts) - cpu_before
        dst("stop")
        check = dst("x-check-memory")
        if not check.get("ok"):
            raise RunFailed(f"memory check FAILED: {check}")
        for m in monitors.values():
            m.close()
        failed = False
        ram = info["ram"]
        return {"total_ms": info["total-time"], "mbps": ram["mbps"], "transferred_mib": ram["transferred"] / 2**20,
                "cpu_s": cpu, "memory_check": "ok"}
    finally:
        for host in hosts:
            host.terminate()
        for host in hosts:
            try:
                host.wait(timeout=10)
            except subprocess.TimeoutExpired:
                host.kill()
                host.wait()
        if failed:
            print(f"  logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default=os.path.join(ROOT, ".build", "release", "postcopy"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", default="1000M")
    ap.add_argument("--vcpus", type=int, default=2)
    ap.add_argument("--multifd-channels", type=int, default=2)
    ap.add_argument("--precopy-seconds", type=float, default=1.0)
    ap.add_argument("--preempt", action="store_true", help="also postcopy-preempt (the urgent channel)")
    ap.add_argument("--before", metavar="BINARY", help="also migrate with this build (the base of a change), in the same runs")
    args = ap.parse_args()

    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    builds = [("", args.binary)] + ([("before ", args.before)] if args.before else [])
    modes = [(f"{label}{'tls' if tls else 'plaintext'}", binary, tls) for label, binary in builds for tls in (False, True)]
    results = {mode: [] for mode, _, _ in modes}
    for run in range(args.runs):
        # Plaintext first in even runs, TLS first in odd ones (and the builds likewise).
        order = modes if run % 2 == 0 else list(reversed(modes))
        for mode, binary, tls in order:
            try:
                r = migrate(binary, tls, args)
            except RunFailed as error:
                print(f"run {run + 1} {mode}: FAILED: {error}")
                sys.exit(1)
            results[mode].append(r)
            print(f"run {run + 1} {mode:16}: total {r['total_ms']:6d} ms, {r['mbps']:7.0f} mbps, "
                  f"{r['transferred_mib']:6.0f} MiB sent, {r['cpu_s']:5.2f} CPU s outside vCPUs, "
                  f"memory check: {r['memory_check']}", flush=True)
    out = {"memory": args.memory, "runs": args.runs, "preempt": args.preempt,
           "multifd_channels": args.multifd_channels, "precopy_seconds": args.precopy_seconds}
    for mode, runs in results.items():
        out[mode] = {key: summary([r[key] for r in runs]) for key in ("total_ms", "mbps", "cpu_s", "transferred_mib")}
        t, m, c = out[mode]["total_ms"], out[mode]["mbps"], out[mode]["cpu_s"]
        print(f"{mode:16}: total {t['median']:.0f} ms ({t['min']}-{t['max']}), "
              f"{m['median']:.0f} mbps ({m['min']:.0f}-{m['max']:.0f}), "
              f"{c['median']:.2f} CPU s outside vCPUs ({c['min']:.2f}-{c['max']:.2f})")
    for label, _ in builds:
        tls, plain = out[f"{label}tls"], out[f"{label}plaintext"]
        ratios = {"throughput": tls["mbps"]["median"] / plain["mbps"]["median"],
                  "total_time": tls["total_ms"]["median"] / plain["total_ms"]["median"]}
        out[f"{label}ratio"] = ratios
        print(f"{label}TLS / plaintext: throughput {ratios['throughput']:.2f}x, total time {ratios['total_time']:.2f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
