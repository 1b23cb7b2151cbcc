#!/usr/bin/env python3
"""The postcopy phase alone: how fast the pages left at the switch reach the destination, and
what it costs each side, for one or more builds in alternation (an A/B in the same minutes).

    push_rate.py --runs 5 base=/tmp/postcopy-base ours=.build/release/postcopy
    push_rate.py --runs 5 --vm IMAGE ours=.build/release/postcopy   # `postcopy vm` on a boot image
    push_rate.py base=/tmp/postcopy-base ours=.build/release/postcopy:--prealloc   # arguments for the destination only

Each run starts two `postcopy host` processes (1 vCPU, --workload, default linear) or two
`postcopy vm` on IMAGE, turns on postcopy-ram, postcopy-preempt and postcopy-blocktime and
`x-timeline` on both sides, lifts max-bandwidth, waits --warm seconds (the source's guest
touches its memory), migrates, and switches to postcopy after --switch seconds. From the
source's timeline: the postcopy phase (switch to completed), the pages left at the switch and
the pages per millisecond, the wait from the switch to the first background page, and when
each multifd lane stopped. From /proc, over the postcopy phase: the CPU time per GB moved of
each side's migration threads; with a destination started with --prealloc, the time its page
pool took to touch (before the run). Prints one JSON line per run and the medians with ranges.
"""
import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from proc_stats import cpu_ticks, tasks


class QMP:
    def __init__(self, path):
        for _ in range(400):
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self("qmp_capabilities")

    def __call__(self, cmd, **args):
        self.f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(r)


def thread_cpu(pids):
    """{(pid, tid): (name, cpu ms)} of every thread of `pids`."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        for tid in tasks(pid):
            try:
                name, ticks = cpu_ticks(f"/proc/{pid}/task/{tid}/stat")
            except OSError:
                continue
            out[(pid, tid)] = (name, ticks * 1000 / tick)
    return out


def run_once(binary, dst_args, a, work):
    port = 47000 + (os.getpid() + int(time.time() * 1000)) % 2000
    for f in ("src.qmp", "dst.qmp", "src.jsonl", "dst.jsonl"):
        try:
            os.unlink(f"{work}/{f}")
        except OSError:
            pass
    guest = ["vm", "--memory", a.memory, "--vcpus", "1", "--boot", a.vm] if a.vm else \
            ["host", "--memory", a.memory, "--vcpus", "1", "--workload", a.workload]
    dst = subprocess.Popen([binary] + guest + dst_args + ["--qmp", f"{work}/dst.qmp", "--incoming", f"tcp:127.0.0.1:{port}"],
                           stderr=open(f"{work}/dst.log", "w"))
    src = subprocess.Popen([binary] + guest + ["--qmp", f"{work}/src.qmp"], stderr=open(f"{work}/src.log", "w"))
    try:
        d, s = QMP(f"{work}/dst.qmp"), QMP(f"{work}/src.qmp")
        caps = [{"capability": c, "state": True} for c in ("postcopy-ram", "postcopy-preempt", "postcopy-blocktime")]
        for q, role in ((d, "dst"), (s, "src")):
            q("migrate-set-capabilities", capabilities=caps)
            q("migrate-set-parameters", **{"x-timeline": f"{work}/{role}.jsonl", "max-bandwidth": 100 * 1000 ** 3})
        time.sleep(a.warm)
        s("migrate", uri=f"tcp:127.0.0.1:{port}")
        time.sleep(a.switch)
        s("migrate-start-postcopy")
        # CPU per thread from the switch until each thread ends (the last value seen counts).
        cpu_start, cpu_last, sampling = thread_cpu([src.pid, dst.pid]), {}, [True]

        def sample():
            while sampling[0]:
                cpu_last.update(thread_cpu([src.pid, dst.pid]))
                time.sleep(0.02)
        sampler = threading.Thread(target=sample)
        sampler.start()
        while s("query-migrate")["status"] not in ("completed", "failed"):
            time.sleep(0.01)
        time.sleep(0.1)
        sampling[0] = False
        sampler.join()
        info, dinfo = s("query-migrate"), d("query-migrate")
    finally:
        src.kill()
        dst.kill()
        src.wait()
        dst.wait()
    if info["status"] != "completed":
        raise RuntimeError(f"{binary}: {info['status']}")
    timeline = [json.loads(line) for line in open(f"{work}/src.jsonl")]
    pc = [r for r in timeline if r["status"] == "postcopy-active"]
    if len(pc) < 2:
        return None   # precopy converged before the switch
    total = lambda r: r["bytes"]["main"] + r["bytes"]["urgent"] + sum(r["bytes"]["multifd"])
    ms = pc[-1]["t-ms"] - pc[0]["t-ms"]
    moved = total(pc[-1]) - total(pc[0])
    lanes0 = pc[0]["bytes"]["multifd"]
    first = next((r["t-ms"] - pc[0]["t-ms"] for r in pc if sum(r["bytes"]["multifd"]) > sum(lanes0) + 500), None)
    stops = [round(next(r["t-ms"] for r in pc if r["bytes"]["multifd"][i] == pc[-1]["bytes"]["multifd"][i]) - pc[0]["t-ms"])
             for i in range(len(lanes0))]
    cpu = {"src": 0.0, "dst": 0.0}
    for key, (name, last) in cpu_last.items():
        if name.startswith("mig-") and name != "mig-timeline":
            cpu["src" if key[0] == src.pid else "dst"] += last - cpu_start.get(key, (name, 0))[1]
    gb = max(moved, 1) / 1e9
    pool = re.search(r"page pool: \d+ MiB touched in (\d+) ms", open(f"{work}/dst.log").read())
    return {"total_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "postcopy_ms": round(ms), "left_pages": pc[0]["remaining-pages"],
            "pages_per_ms": round(pc[0]["remaining-pages"] / ms, 1), "gbit_s": round(moved * 8 / ms / 1e6, 2),
            "first_push_ms": None if first is None else round(first), "lane_stops_ms": stops,
            "blocktime_ms": dinfo.get("postcopy-blocktime"), "requests": info["ram"].get("postcopy-requests"),
            "src_cpu_ms_per_gb": round(cpu["src"] / gb), "dst_cpu_ms_per_gb": round(cpu["dst"] / gb),
            "pool_ms": int(pool.group(1)) if pool else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", help="LABEL=PATH of a postcopy binary, or LABEL=PATH:ARGS to give its "
                    "destination the space-separated ARGS too (e.g. ours=.build/release/postcopy:--prealloc)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", default="1000M")
    ap.add_argument("--workload", default="linear")
    ap.add_argument("--vm", help="boot this image with `postcopy vm` instead of the synthetic host")
    ap.add_argument("--warm", type=float, default=2.0, help="seconds the source's guest runs before migrate")
    ap.add_argument("--switch", type=float, default=1.0, help="seconds of precopy before migrate-start-postcopy")
    a = ap.parse_args()
    builds = [(label, path.split(":", 1)) for label, path in (b.split("=", 1) for b in a.builds)]
    work = tempfile.mkdtemp(prefix="push-rate-")
    results = {label: [] for label, _ in builds}
    for i in range(a.runs):
        for label, (binary, *dst_args) in (builds if i % 2 == 0 else list(reversed(builds))):
            r = run_once(binary, dst_args[0].split() if dst_args else [], a, work)
            print(json.dumps({"build": label, "run": i + 1, **(r or {"postcopy": "none: precopy converged"})}), flush=True)
            if r:
                results[label].append(r)
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")
    keys = ["total_ms", "postcopy_ms", "left_pages", "pages_per_ms", "gbit_s", "first_push_ms", "blocktime_ms",
            "requests", "src_cpu_ms_per_gb", "dst_cpu_ms_per_gb", "pool_ms"]
    for label, rs in results.items():
        summary = {}
        for k in keys:
            values = [r[k] for r in rs if isinstance(r.get(k), (int, float))]
            if values:
                summary[k] = f"{statistics.median(values):g} ({min(values):g}-{max(values):g})"
        print(label, json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
