#!/usr/bin/env python3
"""Side-by-side migration benchmark: QEMU and our host, same workload, same machine, same run.

For each scenario it runs the anchor harness (qmp-migrate.py) alternately against QEMU and
against `postcopy host`, N times each, and prints the medians as a table and as JSON.
The vm-* scenarios run `postcopy vm` (our KVM host) on the very image QEMU boots, built by
the anchors' build-guest.sh: the same guest in two VMMs, compared like for like.

  Benchmarks/e2e/compare_qemu.py --anchors ../shared/anchors/qemu --runs 3
  # this build with and without an option, beside QEMU, runs alternating:
  Benchmarks/e2e/compare_qemu.py --targets qemu,ours,base --base-args=--no-page-pool --scenario vm-linear-postcopy-preempt

Needs: qemu-system-x86 (/dev/kvm), a release build (swift build -c release; another
--scratch-path is given here too), gcc and ld for the vm-* scenarios' images.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
BUILD = ".build"  # --scratch-path of the release build

SCENARIOS = {
    # name: (qemu guest, our workload, mode, extra harness args, extra host args)
    "linear-postcopy": ("linear.S", "linear", "postcopy", [], ""),
    "linear-postcopy-preempt": ("linear.S", "linear", "postcopy", ["--cap", "postcopy-preempt"], ""),
    # Our vCPUs touch pages ~100x faster than linear.S does under KVM (about 1 pass of 1000 MiB
    # a second on QEMU's destination); paced to that rate, the blocktimes compare like for like.
    "linear-postcopy-paced": ("linear.S", "linear", "postcopy", [], "--touch-ns 3900"),
    "random-postcopy": (None, "random", "postcopy", [], ""),
    # Paced random touches (one per 20 us per vCPU): for the per-vCPU table with --vcpus N.
    "random-postcopy-paced": (None, "random", "postcopy", ["--cap", "postcopy-preempt"], "--touch-ns 20000"),
    "hotcold-precopy": ("hotcold.S", "hotcold", "precopy", [], ""),
    # `postcopy vm` boots the QEMU guest's own image under KVM ("vm" as our workload).
    "vm-linear-postcopy-preempt": ("linear.S", "vm", "postcopy", ["--cap", "postcopy-preempt"], ""),
    "vm-hotcold-precopy": ("hotcold.S", "vm", "precopy", [], ""),
    # The same, with --prealloc on both sides (QEMU's -mem-prealloc; QEMU's side runs as above):
    # the destination's page pool is backed before the monitor opens.
    "linear-postcopy-preempt-prealloc": ("linear.S", "linear", "postcopy", ["--cap", "postcopy-preempt"], "--prealloc"),
    "vm-linear-postcopy-preempt-prealloc": ("linear.S", "vm", "postcopy", ["--cap", "postcopy-preempt"], "--prealloc"),
}

IMAGES = {}


def guest_image(anchors, guest, memory_mb):
    """The boot-sector image QEMU's side boots, built once per guest and size."""
    key = (guest, memory_mb)
    if key not in IMAGES:
        path = os.path.join(tempfile.mkdtemp(prefix="compare-qemu-"), f"{guest}.{memory_mb}.img")
        subprocess.run([os.path.join(anchors, "build-guest.sh"), os.path.join(anchors, guest), str(memory_mb), path], check=True)
        IMAGES[key] = path
    return IMAGES[key]


def run_once(anchors, target, scenario, memory_mb, vcpus, base_binary=None, base_args=""):
    guest, workload, mode, extra, host_extra = SCENARIOS[scenario]
    if target == "base":
        host_extra = f"{host_extra} {base_args}"
    cmd = [sys.executable, os.path.join(anchors, "qmp-migrate.py"), "--memory-mb", str(memory_mb), "--mode", mode] + extra
    if target == "qemu":
        cmd += ["--guest", os.path.join(anchors, guest)]
    else:
        binary = base_binary if target == "base" and base_binary else os.path.join(ROOT, BUILD, "release", "postcopy")
        if workload == "vm":
            image = guest_image(anchors, guest, memory_mb)
            cmd += ["--host-cmd", f"{binary} vm --memory {{mb}}M --vcpus {vcpus} --boot {image} {host_extra} "
                                  "--qmp {qmp} --serial {serial} {incoming}"]
            # x-check-memory on `postcopy vm` is QEMU's check of the linear guest's RAM.
            cmd += ["--check"] if guest == "linear.S" else []
        else:
            cmd += ["--host-cmd", f"{binary} host --memory {{mb}}M --vcpus {vcpus} --workload {workload} {host_extra} "
                                  "--qmp {qmp} --serial {serial} {incoming}", "--check"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{target} {scenario}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def figures(result):
    src, dst = result["source"], result["destination"]
    ram = src.get("ram", {})
    lat = dst.get("postcopy-latency")
    return {
        "status": src.get("status"),
        "total_ms": src.get("total-time"),
        "downtime_ms": src.get("downtime"),
        "mbps": ram.get("mbps"),
        "transferred_mb": round(ram.get("transferred", 0) / 1e6, 1),
        "blocktime_ms": dst.get("postcopy-blocktime"),
        "vcpu_blocktime_ms": dst.get("postcopy-vcpu-blocktime"),
        "requests": ram.get("postcopy-requests"),
        "blocktime_per_request_us": round(dst["postcopy-blocktime"] * 1000 / ram["postcopy-requests"], 1)
        if dst.get("postcopy-blocktime") is not None and ram.get("postcopy-requests") else None,
        "dirty_sync_count": ram.get("dirty-sync-count"),
        "avg_fault_latency_us": None if lat is None else round(lat / 1000, 1),
        "source_passes": result.get("source_passes"),
        "passes_in_window": result.get("destination_passes_in_window"),
        "check_ok": None if result.get("check") is None else result["check"].get("ok"),
    }


def median(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return round(statistics.median(values), 2) if values else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", default=os.path.join(ROOT, "..", "shared", "anchors", "qemu"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory-mb", type=int, default=1000)
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="default: all")
    ap.add_argument("--targets", default="qemu,ours", help="any of qemu, ours, base (base needs --base-binary or --base-args)")
    ap.add_argument("--base-binary", help="another build of postcopy to run as target 'base' (an A/B against an older commit)")
    ap.add_argument("--base-args", default="", help="extra host arguments for target 'base' on both sides, with this build "
                    "unless --base-binary is given (an A/B of an option: --base-args=--no-page-pool)")
    ap.add_argument("--scratch-path", default=".build", help="where the release build is (swift build --scratch-path)")
    a = ap.parse_args()
    global BUILD
    BUILD = a.scratch_path
    targets = a.targets.split(",")
    if "base" in targets and not (a.base_binary or a.base_args):
        ap.error("target 'base' needs --base-binary or --base-args")
    report = {}
    for scenario in a.scenario or list(SCENARIOS):
        report[scenario] = {}
        runs = {t: [] for t in targets}
        for i in range(a.runs):
            for t in (targets if i % 2 == 0 else list(reversed(targets))):
                if t == "qemu" and SCENARIOS[scenario][0] is None:
                    continue
                f = figures(run_once(a.anchors, t, scenario, a.memory_mb, a.vcpus, a.base_binary, a.base_args))
                runs[t].append(f)
                print(f"{scenario} {t} run {i + 1}: {json.dumps(f)}", file=sys.stderr)
        for t in targets:
            if not runs[t]:
                continue
            keys = ["total_ms", "downtime_ms", "mbps", "transferred_mb", "blocktime_ms", "requests", "blocktime_per_request_us",
                    "dirty_sync_count", "avg_fault_latency_us", "passes_in_window"]
            m = {k: median([r[k] for r in runs[t]]) for k in keys}
            m["statuses"] = [r["status"] for r in runs[t]]
            m["checks"] = [r["check_ok"] for r in runs[t]]
            report[scenario][t] = m
    print("| scenario | target | total ms | downtime ms | Mbit/s | MB sent | blocktime ms | requests | blocktime per request µs | syncs | avg fault µs | passes in window |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for scenario, per in report.items():
        for t, m in per.items():
            print(f"| {scenario} | {t} | {m['total_ms']} | {m['downtime_ms']} | {m['mbps']} | {m['transferred_mb']} | "
                  f"{m['blocktime_ms']} | {m['requests']} | {m['blocktime_per_request_us']} | {m['dirty_sync_count']} | {m['avg_fault_latency_us']} | {m['passes_in_window']} |")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
