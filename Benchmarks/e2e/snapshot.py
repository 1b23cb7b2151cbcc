#!/usr/bin/env python3
"""Snapshot save and lazy restore, timed: how soon a restored guest runs, and how fast the
background fill brings the rest in from the page cache.

Each run saves a stopped `postcopy host` guest to a file (`migrate file:PATH`), then starts a
new host with `--incoming defer`, sets postcopy-ram, and times `migrate-incoming file:PATH`
until `query-status` says running (both over one QMP connection, so the figure includes two
QMP round trips), then waits for the restore to complete and reports the fill rate (bytes of
guest memory over the restore's total time), the restoring process's CPU time, the fault count
and the memory check. The save is reported as a whole (QMP `migrate` to `completed`) and split
as the save logs it: its pages into the page cache, then with the fsyncs that put them on disk.

  python3 Benchmarks/e2e/snapshot.py --binary .build/release/postcopy --runs 3 --memory 1000M
  ... --paused          the destination stopped: the fill alone, no faults
  ... --copy            postcopy-ram off: everything copied first, then the guest runs
  ... --backing memfd   both hosts' guest memory in a memfd
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
import time


class QMP:
    def __init__(self, path, timeout=60):
        deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.02)
        self.file = self.sock.makefile("rwb")
        self.file.readline()  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command, **arguments):
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error']['desc']}")
            return reply["return"]

    def hmp(self, line):
        return self.execute("human-monitor-command", **{"command-line": line})


def wait_status(qmp, statuses, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = qmp.execute("query-migrate")
        if info.get("status") in statuses:
            return info
        time.sleep(0.01)
    raise RuntimeError(f"no {statuses} within {timeout} s: {info}")


RUN_LINE = re.compile(r"the guest runs from .* ([\d.]+) ms after migrate-incoming")
SAVE_LINE = re.compile(r"into the page cache in ([\d.e-]+) s, on disk \(fsync\) ([\d.e-]+) s later")


def save_phases(log, timeout=5):
    """The save's own split of its time (the line it logs just after completing): pages into
    the page cache, then the fsyncs."""
    deadline = time.time() + timeout
    while True:
        with open(log) as f:
            found = SAVE_LINE.search(f.read())
        if found or time.time() > deadline:
            return (float(found[1]), float(found[2])) if found else (None, None)
        time.sleep(0.01)


def cpu_seconds(pid):
    """utime + stime of a process, from /proc (clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(binary, memory, workload, directory, image, paused=False, backing="anon", lazy=True):
    src_qmp, dst_qmp = os.path.join(directory, "src.qmp"), os.path.join(directory, "dst.qmp")
    src_log = os.path.join(directory, "src.log")
    src = subprocess.Popen([binary, "host", "--memory", memory, "--workload", workload, "--qmp", src_qmp, "--backing", backing],
                           stderr=open(src_log, "w"))
    dst = None
    try:
        s = QMP(src_qmp)
        time.sleep(1)  # let the workload touch its memory
        s.execute("stop")
        started = time.time()
        s.execute("migrate", uri=f"file:{image}")
        saved = wait_status(s, {"completed", "failed"})
        save_s = time.time() - started
        if saved["status"] != "completed":
            raise RuntimeError(f"save failed: {saved}")
        cache_s, fsync_s = save_phases(src_log)
        src.terminate()
        src.wait()
        dst_log = os.path.join(directory, "dst.log")
        dst = subprocess.Popen([binary, "host", "--memory", memory, "--workload", workload, "--qmp", dst_qmp, "--backing", backing,
                                "--incoming", "defer"], stderr=open(dst_log, "w"))
        d = QMP(dst_qmp)
        d.execute("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": lazy}])
        if paused:
            d.execute("stop")   # no autostart: the fill runs alone, without the guest's faults
        cpu0 = cpu_seconds(dst.pid)
        t0 = time.perf_counter()
        d.execute("migrate-incoming", uri=f"file:{image}")
        while not paused and d.execute("query-status")["status"] != "running":
            time.sleep(0 if lazy else 0.001)
        running_ms = (time.perf_counter() - t0) * 1000
        info = wait_status(d, {"completed", "failed"})
        cpu = cpu_seconds(dst.pid) - cpu0
        total_ms = info.get("total-time", 0)
        size = info["ram"]["total"]
        d.execute("stop")
        check = d.execute("x-check-memory")
        with open(dst_log) as f:
            started = RUN_LINE.search(f.read())
        return {
            "save_gbps": size / save_s / 1e9,
            "save_cache_gbps": size / cache_s / 1e9 if cache_s else 0,
            "save_disk_gbps": size / (cache_s + fsync_s) / 1e9 if cache_s else 0,
            "running_ms": running_ms,
            # The restore's own time from migrate-incoming to the vCPUs resumed (no QMP round trips).
            "resumed_ms": float(started[1]) if started else 0,
            "fill_gbps": size / (total_ms / 1000) / 1e9 if total_ms else 0,
            "restore_total_ms": total_ms,
            # The restoring process's CPU time over the restore: with --paused, the filler's cost
            # per byte, less sensitive than the rate to what else the machine runs.
            "restore_cpu_s": cpu,
            "faults": info["ram"].get("postcopy-requests", 0),
            "status": info["status"],
            "memory_ok": bool(check.get("ok")),
        }
    finally:
        for p in (src, dst):
            if p and p.poll() is None:
                p.terminate()
                p.wait()


def vm_run(binary, qemu, image, memory_mb, directory, snapshot):
    """The same boot-sector guest (the anchors' linear.S) under QEMU 7.2 or `postcopy vm`:
    saved stopped to a file, restored in a new process; the time until the restored guest
    can run (QEMU: its incoming stream completed, having copied everything; ours: running,
    lazily)."""
    src_qmp, dst_qmp = os.path.join(directory, "vsrc.qmp"), os.path.join(directory, "vdst.qmp")
    serial = os.path.join(directory, "vsrc.serial")
    open(serial, "wb").close()
    if qemu:
        def command(qmp, extra):
            return ["qemu-system-x86_64", "-enable-kvm", "-m", f"{memory_mb + 200}M", "-nic", "none", "-boot", "c",
                    "-display", "none", "-monitor", "none", "-drive", f"file={image},format=raw,if=ide",
                    "-serial", f"file:{serial if 'vsrc' in qmp else os.devnull}", "-qmp", f"unix:{qmp},server=on,wait=off"] + extra
        save_uri, load_uri = f"exec:cat > {snapshot}", f"exec:cat {snapshot}"
    else:
        def command(qmp, extra):
            return [binary, "vm", "--memory", f"{memory_mb}M", "--boot", image, "--qmp", qmp,
                    "--serial", serial if "vsrc" in qmp else os.devnull] + extra
        save_uri, load_uri = f"file:{snapshot}", f"file:{snapshot}"
    src_log = os.path.join(directory, "vsrc.log")
    src = subprocess.Popen(command(src_qmp, []), stderr=open(src_log, "w"))
    dst = None
    try:
        s = QMP(src_qmp)
        deadline = time.time() + 60
        while open(serial, "rb").read().count(b"B") < 1 and time.time() < deadline:
            time.sleep(0.05)
        s.execute("stop")
        s.execute("migrate-set-parameters", **{"max-bandwidth": 100_000_000_000})   # QEMU's default caps it at 128 MiB/s
        started = time.time()
        s.execute("migrate", uri=save_uri)
        saved = wait_status(s, {"completed", "failed"})
        save_s = time.time() - started
        if saved["status"] != "completed":
            raise RuntimeError(f"save failed: {saved}")
        cache_s = None if qemu else save_phases(src_log)[0]
        src.terminate()
        src.wait()
        dst = subprocess.Popen(command(dst_qmp, ["-incoming", "defer"] if qemu else ["--incoming", "defer"]), stderr=subprocess.DEVNULL)
        d = QMP(dst_qmp)
        if not qemu:
            d.execute("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
        t0 = time.perf_counter()
        d.execute("migrate-incoming", uri=load_uri)
        if qemu:
            wait_status(d, {"completed", "failed"})
        else:
            while d.execute("query-status")["status"] != "running":
                pass
        ready_ms = (time.perf_counter() - t0) * 1000
        info = wait_status(d, {"completed", "failed"})
        return {"save_s": save_s, "save_cache_s": cache_s, "ready_ms": ready_ms, "file_mb": os.path.getsize(snapshot) / 1e6, "status": info["status"]}
    finally:
        for p in (src, dst):
            if p and p.poll() is None:
                p.terminate()
                p.wait()


def working_set_run(binary, memory, directory):
    """A 2-vCPU `hotcold` guest saved in its hot phase, restored three times: cold, cold while
    recording its working set (the filler waits for the faults to settle), then prefetching
    it: the fault counts (the first against the last is the figure)."""
    src_qmp = os.path.join(directory, "hsrc.qmp")
    serial = os.path.join(directory, "hsrc.serial")
    open(serial, "wb").close()
    image, record = os.path.join(directory, "hot.img"), os.path.join(directory, "hot.rec")
    src = subprocess.Popen([binary, "host", "--memory", memory, "--vcpus", "2", "--workload", "hotcold", "--qmp", src_qmp,
                            "--serial", serial], stderr=subprocess.DEVNULL)
    try:
        s = QMP(src_qmp)
        deadline = time.time() + 60
        while open(serial, "rb").read().count(b"B") < 2 and time.time() < deadline:   # a mark every 16 hot passes
            time.sleep(0.05)
        s.execute("stop")
        s.execute("migrate", uri=f"file:{image}")
        wait_status(s, {"completed"})
    finally:
        src.terminate()
        src.wait()
    faults = {}
    for name, parameter in (("cold", None), ("recording", "x-record-working-set"), ("prefetched", "x-prefetch")):
        qmp = os.path.join(directory, f"h{name}.qmp")
        dst = subprocess.Popen([binary, "host", "--memory", memory, "--vcpus", "2", "--workload", "hotcold", "--qmp", qmp,
                                "--incoming", "defer"], stderr=subprocess.DEVNULL)
        try:
            d = QMP(qmp)
            d.execute("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
            if parameter:
                d.execute("migrate-set-parameters", **{parameter: record})
            t0 = time.perf_counter()
            d.execute("migrate-incoming", uri=f"file:{image}")
            while d.execute("query-status")["status"] != "running":
                pass
            running_ms = (time.perf_counter() - t0) * 1000
            info = wait_status(d, {"completed", "failed"})
            d.execute("stop")
            ok = bool(d.execute("x-check-memory").get("ok"))
            faults[name] = (info["ram"].get("postcopy-requests", 0), running_ms, ok)
        finally:
            dst.terminate()
            dst.wait()
        if name == "recording":
            deadline = time.time() + 10
            while not os.path.exists(record) and time.time() < deadline:
                time.sleep(0.05)
    return faults


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default=".build/release/postcopy")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory", default="1000M")
    parser.add_argument("--workload", default="linear")
    parser.add_argument("--vm", action="store_true",
                        help="also the anchors' linear.S guest under QEMU 7.2 (exec:cat file migration) and postcopy vm")
    parser.add_argument("--anchors", default=os.path.join(os.path.dirname(__file__), "../../../shared/anchors/qemu"))
    parser.add_argument("--paused", action="store_true",
                        help="restore with the destination stopped (no autostart): the fill alone, no faults")
    parser.add_argument("--backing", default="anon", choices=["anon", "memfd"], help="what backs the hosts' guest memory")
    parser.add_argument("--copy", action="store_true",
                        help="restore with postcopy-ram off: everything copied first, then the guest runs (the comparison)")
    parser.add_argument("--working-set", action="store_true",
                        help="a hotcold guest saved in its hot phase: cold restore (recording) against a prefetched one")
    args = parser.parse_args()
    if args.working_set:
        rows = []
        for run in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="snapshot-ws-", dir="/var/tmp") as directory:
                f = working_set_run(os.path.abspath(args.binary), args.memory, directory)
            (cold, cold_ms, cold_ok), (warm, warm_ms, warm_ok) = f["cold"], f["prefetched"]
            cold_ok = cold_ok and f["recording"][2]
            rows.append((cold, warm))
            print(f"run {run + 1}: faults cold {cold} (running after {cold_ms:.1f} ms), recording {f['recording'][0]}, prefetched {warm} (running after "
                  f"{warm_ms:.1f} ms): {100 * (1 - warm / cold) if cold else 0:.0f}% fewer; memory "
                  f"{'ok' if cold_ok and warm_ok else 'FAILED'}", flush=True)
        cold_m, warm_m = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        print(f"medians: cold {cold_m:.0f} faults, prefetched {warm_m:.0f} ({100 * (1 - warm_m / cold_m) if cold_m else 0:.0f}% fewer)")
        return
    if args.vm:
        memory_mb = int(args.memory.rstrip("M"))
        with tempfile.TemporaryDirectory(prefix="snapshot-vm-", dir="/var/tmp") as directory:
            image = os.path.join(directory, "linear.img")
            subprocess.run([os.path.join(args.anchors, "build-guest.sh"), os.path.join(args.anchors, "linear.S"), str(memory_mb), image], check=True)
            for name, qemu in (("qemu", True), ("ours", False)):
                rows = []
                for run in range(args.runs):
                    snapshot = os.path.join(directory, "vm.snap")
                    rows.append(vm_run(os.path.abspath(args.binary), qemu, image, memory_mb, directory, snapshot))
                    os.unlink(snapshot)
                    r = rows[-1]
                    cached = f", into the page cache in {r['save_cache_s']:.2f} s" if r["save_cache_s"] else ""
                    print(f"{name} run {run + 1}: save {r['save_s']:.2f} s ({r['file_mb']:.0f} MB file{cached}); restored guest can run after "
                          f"{r['ready_ms']:.1f} ms; {r['status']}", flush=True)
                print(f"{name} medians: save {statistics.median(r['save_s'] for r in rows):.2f} s, ready "
                      f"{statistics.median(r['ready_ms'] for r in rows):.1f} ms", flush=True)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="snapshot-bench-", dir="/var/tmp") as directory:
        for run in range(args.runs):
            image = os.path.join(directory, "guest.img")
            r = one_run(os.path.abspath(args.binary), args.memory, args.workload, directory, image, args.paused,
                        args.backing, lazy=not args.copy)
            results.append(r)
            print(f"run {run + 1}: save {r['save_gbps']:.2f} GB/s (stopped, QMP migrate to completed; its own split: into the page "
                  f"cache {r['save_cache_gbps']:.2f} GB/s, with the fsyncs {r['save_disk_gbps']:.2f} GB/s); running after "
                  f"{r['running_ms']:.1f} ms (resumed after {r['resumed_ms']:.1f}); {'fill' if not args.copy else 'full copy'} {r['fill_gbps']:.2f} GB/s over "
                  f"{r['restore_total_ms']} ms ({r['restore_cpu_s']:.2f} s CPU); {r['faults']} faults; {r['status']}; memory {'ok' if r['memory_ok'] else 'FAILED'}", flush=True)
            os.unlink(image)
    keys = ("save_gbps", "save_cache_gbps", "save_disk_gbps", "running_ms", "resumed_ms", "fill_gbps", "restore_cpu_s", "faults")
    medians = {k: statistics.median(r[k] for r in results) for k in keys}
    print("ranges: " + ", ".join(f"{k} {min(r[k] for r in results):.2f}-{max(r[k] for r in results):.2f}" for k in keys))
    print("medians: " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    print(json.dumps({"runs": results, "medians": medians}))
    sys.exit(0 if all(r["memory_ok"] and r["status"] == "completed" for r in results) else 1)


if __name__ == "__main__":
    main()
