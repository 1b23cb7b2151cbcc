#!/usr/bin/env python3
"""Time and CPU per GiB as guest memory grows: `postcopy host` (and QEMU where it can) migrated
with postcopy after 1 s of precopy, at several memory sizes, through the anchors' harness.

  Benchmarks/e2e/scaling.py --sizes 1000,2000,4000,8000 --runs 3
  Benchmarks/e2e/scaling.py --sizes 1000,3000 --targets ours,qemu --runs 3

For each run it prints the total time, time per GiB, throughput, bytes sent, requests and
blocktime, and the CPU time each side spent outside its vCPU threads (the migration's own
threads, plus QEMU's main loop) per GiB of guest. CPU is read from /proc/PID/task/*/stat every
20 ms while the run lasts (so a thread's last 20 ms may be missed), over each process's whole
life: its start and the harness's watch after the end count too, as they do for both targets. Each size runs the targets alternately, and prints medians as a table and as JSON.

QEMU's boot-sector guests run in 32-bit mode behind the `pc` machine's PCI hole, so QEMU
is only run up to 3000 MiB; bigger sizes are ours alone.

Needs: a release build (swift build -c release), qemu-system-x86 for target qemu, and free
memory for two copies of the guest (8000 MiB: 16 GiB).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

from proc_stats import cpu_ticks, tasks

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
QEMU_MAX_MB = 3000
VCPU_THREAD = re.compile(r"^(vcpu\d+|CPU \d+/KVM)$")
TICK = os.sysconf("SC_CLK_TCK")


class CPUSampler(threading.Thread):
    """Reads the utime+stime of every thread of the two migrating processes (the harness puts
    its QMP sockets under a qmp-migrate-* folder, named src.qmp and dst.qmp) every 20 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.seen = {}  # (role, pid, tid) -> (comm, ticks)
        self.roles = {}  # pid -> "src", "dst" or None (not a migrating process)

    def run(self):
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                if pid not in self.roles:
                    try:
                        cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
                    except OSError:
                        continue
                    if "qmp-migrate.py" in cmd:
                        continue  # the harness, or a host it forked that has not exec'd yet: look again
                    migrating = "qmp-migrate-" in cmd
                    self.roles[pid] = ("src" if "src.qmp" in cmd else "dst" if "dst.qmp" in cmd else None) if migrating else None
                role = self.roles[pid]
                if role is None:
                    continue
                for tid in tasks(pid):
                    try:
                        comm, ticks = cpu_ticks(f"/proc/{pid}/task/{tid}/stat")
                    except (OSError, ValueError, IndexError):
                        continue
                    key = (role, pid, tid)
                    if ticks >= self.seen.get(key, ("", -1))[1]:
                        self.seen[key] = (comm, ticks)
            self.stop.wait(0.02)

    def migration_cpu_seconds(self, role):
        """CPU outside the vCPU threads. Ours are named vcpuN; QEMU names its threads only with
        -name debug-threads=on, which the harness does not pass, so a process without named
        vCPU threads loses its busiest thread instead (its one vCPU: the runs use --vcpus 1)."""
        total = 0
        for pid in {p for (r, p, _) in self.seen if r == role}:
            threads = [(comm, t) for (r, p, _), (comm, t) in self.seen.items() if r == role and p == pid]
            named = [t for comm, t in threads if VCPU_THREAD.match(comm)]
            total += sum(t for _, t in threads) - (sum(named) if named else max(t for _, t in threads))
        return total / TICK


def run_once(anchors, binary, target, memory_mb):
    cmd = [sys.executable, os.path.join(anchors, "qmp-migrate.py"), "--memory-mb", str(memory_mb), "--mode", "postcopy",
           "--cap", "postcopy-preempt", "--timeout", "900"]
    if target == "qemu":
        cmd += ["--guest", os.path.join(anchors, "linear.S")]
    else:
        cmd += ["--host-cmd", f"{binary} host --memory {{mb}}M --vcpus 1 --workload linear "
                              "--qmp {qmp} --serial {serial} {incoming}", "--check"]
    sampler = CPUSampler()
    sampler.start()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    finally:
        sampler.stop.set()
        sampler.join()
    if out.returncode != 0:
        raise RuntimeError(f"{target} {memory_mb} MiB: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    src, dst = result["source"], result["destination"]
    gib = memory_mb / 1024
    total = src.get("total-time")
    ram = src.get("ram", {})
    return {
        "status": src.get("status"),
        "total_ms": total,
        "s_per_gib": round(total / 1000 / gib, 3) if total else None,
        "mbps": ram.get("mbps"),
        "transferred_mb": round(ram.get("transferred", 0) / 1e6, 1),
        "requests": ram.get("postcopy-requests"),
        "blocktime_ms": dst.get("postcopy-blocktime"),
        "src_cpu_s_per_gib": round(sampler.migration_cpu_seconds("src") / gib, 3),
        "dst_cpu_s_per_gib": round(sampler.migration_cpu_seconds("dst") / gib, 3),
        "check_ok": None if result.get("check") is None else result["check"].get("ok"),
    }


def median(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return round(statistics.median(values), 3) if values else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", default=os.path.join(ROOT, "..", "shared", "anchors", "qemu"))
    ap.add_argument("--sizes", default="1000,2000,4000,8000", help="guest sizes in MiB, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--targets", default="ours", help="ours and/or qemu (qemu up to 3000 MiB)")
    ap.add_argument("--binary", default=os.path.join(ROOT, ".build", "release", "postcopy"))
    a = ap.parse_args()
    if not os.access(a.binary, os.X_OK):
        ap.error(f"{a.binary} is missing: build it with `swift build -c release` first")
    sizes = [int(s) for s in a.sizes.split(",")]
    targets = a.targets.split(",")
    keys = ["total_ms", "s_per_gib", "mbps", "transferred_mb", "requests", "blocktime_ms", "src_cpu_s_per_gib", "dst_cpu_s_per_gib"]
    report = {}
    for mb in sizes:
        runnable = [t for t in targets if t != "qemu" or mb <= QEMU_MAX_MB]
        runs = {t: [] for t in runnable}
        for i in range(a.runs):
            for t in (runnable if i % 2 == 0 else runnable[::-1]):
                r = run_once(a.anchors, a.binary, t, mb)
                runs[t].append(r)
                print(f"# {mb} MiB {t} run {i + 1}: " + json.dumps(r), file=sys.stderr, flush=True)
        report[mb] = {t: {k: median([r[k] for r in rs]) for k in keys} | {
            "range_total_ms": [min(r["total_ms"] for r in rs), max(r["total_ms"] for r in rs)],
            "all_completed": all(r["status"] == "completed" for r in rs),
            "all_checks_ok": all(r["check_ok"] is not False for r in rs)} for t, rs in runs.items()}
    print(f"{'MiB':>6} {'target':>6} {'total ms':>9} {'s/GiB':>6} {'Mbit/s':>7} {'sent MB':>8} {'requests':>8} "
          f"{'block ms':>8} {'src CPU s/GiB':>13} {'dst CPU s/GiB':>13}")
    for mb, by_target in report.items():
        for t, m in by_target.items():
            print(f"{mb:>6} {t:>6} {m['total_ms']:>9} {m['s_per_gib']:>6} {m['mbps']:>7} {m['transferred_mb']:>8} "
                  f"{m['requests']:>8} {m['blocktime_ms']:>8} {m['src_cpu_s_per_gib']:>13} {m['dst_cpu_s_per_gib']:>13}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
