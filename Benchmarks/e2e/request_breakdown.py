#!/usr/bin/env python3
"""Where a postcopy page request's time goes: the stages `x-request-breakdown` times on each
side, against the blocktime per request that query-migrate reports.

Each run starts two `postcopy host` processes (--vcpus, default 1; --workload, default random;
--memory, default 1000M), turns on postcopy-ram, postcopy-preempt, postcopy-blocktime and
x-request-breakdown on both sides, lifts max-bandwidth, lets the source's guest run --warm
seconds, migrates, switches to postcopy after --switch seconds and waits for the end. Then it
reads `x-request-breakdown` from both monitors and prints, per run, one JSON line, and at the
end a table of medians over the runs: each stage's mean per request in µs and its share of the
blocktime per request (the vCPUs' blocked time, postcopy-vcpu-blocktime summed, over the
destination's postcopy-requests).

Destination stages: fault thread (fault read -> the request's write called), round trip (that
call -> the answer's header read by the urgent receiver), payload (header -> payload read): the
three add up to the fault latency blocktime counts, which stamps the arrival there; then
placement (UFFDIO_COPY, which wakes the vCPU inside it). The round trip is split with the
writes' own times (request-write on the destination, answer-write on the source: a write on
loopback delivers the bytes and wakes the reader, which may take the writer's core before the
write returns) and the source's service (request read -> answer's write called); the rest is
the sockets, the wake-ups and anything queued on the urgent channel before the answer. Both
hosts run on this machine, so the source's figures can be set beside the destination's; the
product never compares clocks across hosts. Requests answered by the stream (the page came
first in another frame) are timed apart, as their whole wait (stream-wait); spread over all
requests it is the rest of the blocktime per request.

From /proc (schedstat and status), between the switch and the end, the path threads'
(mig-faults, mig-requests, mig-urgent, vcpu0) time waiting for a CPU once runnable, their CPU
time and how often they were preempted, each per request: the wake-ups' share.

    python3 Benchmarks/e2e/request_breakdown.py --binary .build/release/postcopy --runs 3
    python3 Benchmarks/e2e/request_breakdown.py --runs 3 --readahead 0 --workload linear
    python3 Benchmarks/e2e/request_breakdown.py --runs 3 --cost   # also with the breakdown off, alternating

With --cost each run is followed by one with x-request-breakdown off, and the blocktime per
request of both is compared (what the stamps cost the requests they time).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proc_stats import tasks  # noqa: E402
from recovery import Monitor, RunFailed, free_port, median, passes, wait_for  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


# The threads a request crosses, by side: their scheduler figures show the wake-ups.
PATH_THREADS = (("dst", "mig-faults"), ("src", "mig-requests"), ("dst", "mig-urgent"), ("dst", "vcpu0"))


def thread_sched(pids):
    """{(role, name): [cpu ns, run-queue wait ns, involuntary switches]} of the request path's threads."""
    out = {}
    for role, pid in pids.items():
        for tid in tasks(pid):
            try:
                name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
                if (role, name) not in PATH_THREADS:
                    continue
                cpu, wait, _ = (int(x) for x in open(f"/proc/{pid}/task/{tid}/schedstat").read().split())
                status = open(f"/proc/{pid}/task/{tid}/status").read()
            except OSError:
                continue
            involuntary = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
            out[(role, name)] = [cpu, wait, involuntary]
    return out


class SchedSampler(threading.Thread):
    """Samples the path threads' figures until stopped: a thread that ends (the fault thread
    with the migration) keeps its last values."""

    def __init__(self, pids):
        super().__init__(daemon=True)
        self.pids, self.first, self.last, self.running = pids, thread_sched(pids), {}, True
        self.start()

    def run(self):
        while self.running:
            self.last.update(thread_sched(self.pids))
            time.sleep(0.02)

    def stop(self):
        self.running = False
        self.join()
        return {k: [b - a for a, b in zip(self.first.get(k, [0, 0, 0]), v)] for k, v in self.last.items()}


def run_once(a, breakdown):
    work = tempfile.mkdtemp(prefix="request-breakdown-")
    port = free_port()
    procs = []
    try:
        for role in ("dst", "src"):
            open(f"{work}/{role}.serial", "wb").close()
            command = [a.binary, "host", "--memory", a.memory, "--vcpus", str(a.vcpus), "--workload", a.workload,
                       "--qmp", f"{work}/{role}.qmp", "--serial", f"{work}/{role}.serial"]
            if role == "dst":
                command += ["--incoming", f"tcp:127.0.0.1:{port}"]
            procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(f"{work}/{role}.log", "wb")))
        dst, src = Monitor(f"{work}/dst.qmp", "destination"), Monitor(f"{work}/src.qmp", "source")
        caps = [{"capability": c, "state": True} for c in ("postcopy-ram", "postcopy-preempt", "postcopy-blocktime")]
        params = {"max-bandwidth": 100 * 1000 ** 3, "x-request-breakdown": breakdown}
        if a.readahead is not None:
            params["x-postcopy-readahead"] = a.readahead
        for side in (dst, src):
            side("migrate-set-capabilities", capabilities=caps)
            side("migrate-set-parameters", **params)
        wait_for(lambda: passes(f"{work}/src.serial") >= 1, 60, "workload pass on the source")
        time.sleep(a.warm)
        src("migrate", uri=f"tcp:127.0.0.1:{port}")
        time.sleep(a.switch)
        sampler = SchedSampler({"dst": procs[0].pid, "src": procs[1].pid})
        src("migrate-start-postcopy")
        wait_for(lambda: src("query-migrate")["status"] in ("completed", "failed"), 120, "end of the migration")
        wait_for(lambda: dst("query-migrate")["status"] in ("completed", "failed"), 30, "end on the destination")
        sched = sampler.stop()
        info, dinfo = src("query-migrate"), dst("query-migrate")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    if info["status"] != "completed" or dinfo["status"] != "completed":
        raise RunFailed(f"source {info['status']}, destination {dinfo['status']}: logs in {work}")
    shutil.rmtree(work, ignore_errors=True)
    requests = dinfo["ram"]["postcopy-requests"]
    blocked_ms = sum(dinfo.get("postcopy-vcpu-blocktime", []))
    r = {"breakdown": breakdown, "requests": requests,
         "blocktime_ms": dinfo.get("postcopy-blocktime"), "vcpu_blocktime_ms": blocked_ms,
         "blocktime_per_request_us": round(blocked_ms * 1000 / requests, 1) if requests else None,
         "fault_latency_us": round(dinfo.get("postcopy-latency", 0) / 1000, 1)}
    # Per request, from the switch to the end: each path thread's time waiting for a CPU once
    # runnable (wake-ups, preemption), its CPU time, and how often it was preempted.
    for (role, name), (cpu, wait, involuntary) in sched.items():
        if requests:
            r[f"{name}_runqueue_us"] = round(wait / 1000 / requests, 2)
            r[f"{name}_cpu_us"] = round(cpu / 1000 / requests, 2)
            r[f"{name}_preempted"] = round(involuntary / requests, 3)
    if breakdown:
        d, s = dinfo["x-request-breakdown"], info["x-request-breakdown"]
        us = lambda stage: round(stage["mean-ns"] / 1000, 2)
        r.update({"answered": d["answered"], "answered_by_stream": d["answered-by-stream"],
                  "left_to_stream": s["left-to-stream"], "answered_source": s["answered"],
                  "fault_thread_us": us(d["fault-thread"]), "round_trip_us": us(d["round-trip"]),
                  "payload_us": us(d["payload"]), "placement_us": us(d["placement"]),
                  "request_write_us": us(d["request-write"]), "service_us": us(s["service"]),
                  "answer_write_us": us(s["answer-write"]),
                  "readahead_us": us(s["readahead"]), "readaheads": s["readahead"]["count"],
                  "readahead_kib": round(s["readahead-bytes"] / 1024 / max(s["readahead"]["count"], 1), 1)})
        # The writes overlap the rest when the writer lost its core to the reader it woke: then
        # this is below what the sockets and wake-ups took.
        r["rest_of_round_trip_us"] = round(r["round_trip_us"] - r["request_write_us"] - r["service_us"]
                                           - r["answer_write_us"], 2)
        r["stream_wait_us"] = us(d["stream-wait"])
        r["stream_wait_per_request_us"] = round(d["stream-wait"]["total-ns"] / 1000 / max(d["requests"], 1), 2)
        r["to_arrival_us"] = round(r["fault_thread_us"] + r["round_trip_us"] + r["payload_us"], 2)
    return r


def table(runs):
    per = median([r["blocktime_per_request_us"] for r in runs])
    rows = [("fault thread: fault read -> request's write called", "fault_thread_us"),
            ("round trip: that call -> answer's header read", "round_trip_us"),
            ("  the request's write call (destination)", "request_write_us"),
            ("  source: request read -> answer's write called", "service_us"),
            ("  source: the answer's write call", "answer_write_us"),
            ("  the rest: sockets, wake-ups, queueing", "rest_of_round_trip_us"),
            ("payload: header -> payload read", "payload_us"),
            ("sum: fault read -> the arrival blocktime counts", "to_arrival_us"),
            ("placement: UFFDIO_COPY, after the arrival", "placement_us"),
            ("answered by the stream: request's write -> arrival", "stream_wait_us"),
            ("  the same, spread over all requests", "stream_wait_per_request_us"),
            ("blocktime per request (query-migrate)", "blocktime_per_request_us"),
            ("fault latency, mean (postcopy-latency)", "fault_latency_us")]
    lines = [f"{'stage':56} {'mean us':>9} {'range':>15} {'share':>7}"]
    for label, key in rows:
        values = [r[key] for r in runs if r.get(key) is not None]
        if not values:
            continue
        m = median(values)
        share = f"{100 * m / per:5.1f} %" if per else ""
        lines.append(f"{label:56} {m:9.1f} {f'{min(values):g}-{max(values):g}':>15} {share:>7}")
    lines.append("per request, from the switch to the end (schedstat): run-queue wait / CPU time / times preempted")
    for _, name in PATH_THREADS:
        values = [[r.get(f"{name}_{k}") for r in runs] for k in ("runqueue_us", "cpu_us", "preempted")]
        if all(v is not None for v in values[0]):
            lines.append(f"  {name:14} {median(values[0]):8.1f} us {median(values[1]):8.1f} us {median(values[2]):8.3f}")
    lines.append("(source: {} of {} answers were followed by read-ahead, {} KiB in {} us)".format(
        median([r["readaheads"] for r in runs]), median([r["answered_source"] for r in runs]),
        median([r["readahead_kib"] for r in runs]), median([r["readahead_us"] for r in runs])))
    lines.append("(requests {}, answered {}, answered by the stream {}, left to the stream by the source {})".format(
        *(median([r[k] for r in runs]) for k in ("requests", "answered", "answered_by_stream", "left_to_stream"))))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, ".build/release/postcopy"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", default="1000M")
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--workload", default="random")
    ap.add_argument("--readahead", type=int, help="x-postcopy-readahead on the source (default: the host's, 16)")
    ap.add_argument("--warm", type=float, default=2.0, help="seconds the source's guest runs before migrate")
    ap.add_argument("--switch", type=float, default=1.0, help="seconds of precopy before migrate-start-postcopy")
    ap.add_argument("--cost", action="store_true", help="alternate each run with one without the breakdown")
    a = ap.parse_args()
    on, off = [], []
    for i in range(a.runs):
        for breakdown in ((True, False) if i % 2 == 0 else (False, True)) if a.cost else (True,):
            r = run_once(a, breakdown)
            print(json.dumps({"run": i + 1, **r}), flush=True)
            (on if breakdown else off).append(r)
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")
    print(f"{a.workload}, {a.memory}, {a.vcpus} vCPU, read-ahead {a.readahead if a.readahead is not None else 'default'}, "
          f"medians of {len(on)} runs")
    print(table(on))
    if a.cost:
        for label, runs in (("breakdown on ", on), ("breakdown off", off)):
            values = [r["blocktime_per_request_us"] for r in runs]
            print(f"{label}: blocktime per request {median(values)} us ({min(values):g}-{max(values):g}), "
                  f"requests {median([r['requests'] for r in runs])}")


if __name__ == "__main__":
    sys.exit(main())
