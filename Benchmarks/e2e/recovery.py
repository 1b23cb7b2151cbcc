#!/usr/bin/env python3
"""Postcopy recovery under repeated network failures: how long each recovery takes, and
whether the guest arrives whole.

Each run starts a destination and a source `postcopy host`, puts `postcopy x-fault-proxy`
between them and migrates through it. After one precopy pass it switches to postcopy
(max-postcopy-bandwidth 100 MB/s, so postcopy lasts), and from the first postcopy-active
on it makes the proxy refuse new connections for --refuse-for seconds and reset every open
one, every --cut-every seconds, until the source reports completed. Both sides pause
(postcopy-paused) at each cut; then
  --mode auto    nobody types anything: the source reconnects by itself;
  --mode manual  as an operator would, with QEMU's commands: x-postcopy-recover-timeout 0
                 on the source; at each pause `migrate-recover` on the destination to a
                 fresh port, the proxy retargeted there, and `migrate` with resume: true
                 on the source (once the proxy accepts again).

A recovery's time runs from the moment a reconnection could succeed (the proxy's
`accepting` after the cut, or the pause itself when no refusal lay between) to the
source's next postcopy-active; both come from timestamps on the same clock (the QMP
MIGRATION events' and the proxy's "t"). A thread asks query-migrate on both monitors
every 100 ms and keeps the slowest answer: a monitor must stay responsive while paused.
At the end both sides must be completed and the destination's x-check-memory ok.

  python3 Benchmarks/e2e/recovery.py --binary .build/release/postcopy --runs 5 \\
      --mode auto --memory 1000M --workload random

Prints one line per run, the medians over runs, and a JSON summary as the last line.
Exits non-zero if any run failed; a failed run's logs are kept and their path printed.
"""
import argparse
import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


class RunFailed(Exception):
    pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(condition, timeout, what, interval=0.02):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RunFailed(f"no {what} within {timeout:g} s")
        time.sleep(interval)


class Monitor:
    """One QMP connection: commands one at a time; events kept as they come, with their time."""

    def __init__(self, path, name, timeout=30.0):
        self.name = name
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise RunFailed(f"{name}: no QMP monitor at {path} within {timeout:g} s")
                time.sleep(0.05)
        self.file = self.sock.makefile("rb")
        greeting = json.loads(self.file.readline())
        if "QMP" not in greeting:
            raise RunFailed(f"{name}: not a QMP greeting: {greeting}")
        self.replies = queue.Queue()
        self.events = []
        self.changed = threading.Condition()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        self("qmp_capabilities")

    def _read(self):
        try:
            for line in self.file:
                message = json.loads(line)
                if "event" in message:
                    with self.changed:
                        self.events.append(message)
                        self.changed.notify_all()
                else:
                    self.replies.put(message)
        except (OSError, ValueError):
            pass
        self.replies.put(None)

    def __call__(self, command, **arguments):
        with self.lock:
            message = {"execute": command}
            if arguments:
                message["arguments"] = arguments
            try:
                self.sock.sendall(json.dumps(message).encode() + b"\n")
                reply = self.replies.get(timeout=60)
            except OSError as error:
                raise RunFailed(f"{self.name}: {command}: {error}")
            except queue.Empty:
                raise RunFailed(f"{self.name}: no answer to {command} within 60 s")
        if reply is None:
            raise RunFailed(f"{self.name}: the monitor closed during {command}")
        if "error" in reply:
            raise RunFailed(f"{self.name}: {command}: {reply['error'].get('desc', reply['error'])}")
        return reply["return"]

    def statuses(self):
        """[(time, status)] of every MIGRATION event so far."""
        with self.changed:
            return [(e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6, e["data"]["status"])
                    for e in self.events if e["event"] == "MIGRATION"]

    def status(self):
        s = self.statuses()
        return s[-1][1] if s else None

    def count(self, status):
        return sum(1 for _, s in self.statuses() if s == status)

    def wait_status(self, status, timeout, after=0):
        """The time of the first MIGRATION event `status` among events after the first `after`."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for e in self.events[after:]:
                    if e["event"] == "MIGRATION" and e["data"]["status"] == status:
                        return e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RunFailed(f"{self.name}: no {status} within {timeout:g} s (statuses: {[s for _, s in self.statuses()]})")
                self.changed.wait(left)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class FaultProxy:
    """`postcopy x-fault-proxy` in front of the destination, driven through its stdin."""

    def __init__(self, binary, target_port, log):
        self.proc = subprocess.Popen([binary, "x-fault-proxy", "--listen", "127.0.0.1:0", "--to", f"127.0.0.1:{target_port}"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self.events = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = self.wait("listening")["port"]

    def _read(self):
        for line in self.proc.stdout:
            with self.changed:
                self.events.append(json.loads(line))
                self.changed.notify_all()

    def send(self, *commands):
        try:
            self.proc.stdin.write("".join(c + "\n" for c in commands).encode())
            self.proc.stdin.flush()
        except OSError as error:
            raise RunFailed(f"proxy: {error} (it exited {self.proc.poll()})")

    def wait(self, name, after=0, timeout=10.0):
        """The first event `name` among events after the first `after`."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for e in self.events[after:]:
                    if e["event"] == name:
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RunFailed(f"proxy: no {name} event within {timeout:g} s")
                self.changed.wait(left)

    def named(self, name):
        with self.changed:
            return [e for e in self.events if e["event"] == name]

    def accepting(self):
        """Whether new connections go through now (the last of refusing/accepting)."""
        with self.changed:
            states = [e["event"] for e in self.events if e["event"] in ("refusing", "accepting")]
        return not states or states[-1] == "accepting"

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class Poller(threading.Thread):
    """query-migrate on each monitor every 100 ms, on connections of its own, keeping the
    slowest answer per side: what a management tool would wait while the migration is paused."""

    def __init__(self, monitors):
        super().__init__(daemon=True)
        self.monitors = monitors
        self.slowest = {side: 0.0 for side in monitors}
        self.error = None
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            began = time.monotonic()
            for side, monitor in self.monitors.items():
                asked = time.perf_counter()
                try:
                    monitor("query-migrate")
                except RunFailed as error:
                    self.error = str(error)
                    return
                self.slowest[side] = max(self.slowest[side], time.perf_counter() - asked)
            self.stopped.wait(max(0.0, 0.1 - (time.monotonic() - began)))

    def stop(self):
        self.stopped.set()
        self.join(timeout=70)


def passes(path):
    try:
        with open(path, "rb") as f:
            return f.read().count(b"B")
    except FileNotFoundError:
        return 0


def recovery_times(statuses, accepting_times):
    """Seconds from each chance to reconnect to the source's postcopy-active that ended the pause."""
    times, paused_at = [], None
    for t, status in statuses:
        if status == "postcopy-paused" and paused_at is None:
            paused_at = t
        elif status == "postcopy-active" and paused_at is not None:
            opened = [a for a in accepting_times if paused_at <= a <= t]
            times.append(t - (opened[-1] if opened else paused_at))
            paused_at = None
    return times


def run_once(a, number):
    work = tempfile.mkdtemp(prefix=f"recovery-{number}-")
    dport = free_port()
    procs, monitors, proxy, poller = [], [], None, None
    paths = {r: {"qmp": f"{work}/{r}.qmp", "serial": f"{work}/{r}.serial", "log": f"{work}/{r}.log"} for r in ("src", "dst")}

    def host(role):
        command = [a.binary, "host", "--memory", a.memory, "--vcpus", str(a.vcpus), "--workload", a.workload,
                   "--qmp", paths[role]["qmp"], "--serial", paths[role]["serial"]]
        if role == "dst":
            command += ["--incoming", f"tcp:127.0.0.1:{dport}"]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(paths[role]["log"], "wb"))
        procs.append(proc)
        return proc

    def monitor(role, name):
        m = Monitor(paths[role]["qmp"], name)
        monitors.append(m)
        return m

    try:
        for r in paths:
            open(paths[r]["serial"], "wb").close()
        host("dst")
        host("src")
        dst, src = monitor("dst", "destination"), monitor("src", "source")
        proxy = FaultProxy(a.binary, dport, open(f"{work}/proxy.log", "wb"))
        wait_for(lambda: passes(paths["src"]["serial"]) >= 1, 60, "workload pass on the source")

        capabilities = [{"capability": "postcopy-ram", "state": True}, {"capability": "events", "state": True}]
        for side in (src, dst):
            side("migrate-set-capabilities", capabilities=capabilities)
        # Precopy at full speed, so its first pass ends soon, and never finishing by itself
        # (downtime-limit 0): the run is about postcopy, which at 100 MB/s lasts through many cuts.
        src("migrate-set-parameters", **{"max-bandwidth": 100_000_000_000, "downtime-limit": 0,
                                         "max-postcopy-bandwidth": a.postcopy_bandwidth})
        if a.mode == "manual":
            src("migrate-set-parameters", **{"x-postcopy-recover-timeout": 0})

        poller = Poller({"source": monitor("src", "source (poll)"), "destination": monitor("dst", "destination (poll)")})
        poller.start()
        started = time.monotonic()
        src("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
        wait_for(lambda: src("query-migrate").get("ram", {}).get("dirty-sync-count", 0) >= 2
                 or src.status() in ("completed", "failed", "cancelled"), 120, "first precopy pass")
        src("migrate-start-postcopy")
        src.wait_status("postcopy-active", 60)

        rounds, next_cut = 0, time.monotonic() + a.cut_every
        handled_source_pauses = 0
        recovered_destination_pauses = 0
        deadline = started + a.timeout
        while src.status() not in ("completed", "failed", "cancelled"):
            if poller.error:
                raise RunFailed(poller.error)
            now = time.monotonic()
            if now > deadline:
                raise RunFailed(f"not completed within {a.timeout:g} s (source statuses: {[s for _, s in src.statuses()]})")
            if now >= next_cut:
                # The refusal first: a source that reconnects the moment it sees the reset is refused too.
                proxy.send(f"refuse {a.refuse_for}", "cut")
                rounds += 1
                next_cut += a.cut_every
            if a.mode == "manual" and src.count("postcopy-paused") > handled_source_pauses:
                # The destination listens again once per pause of its own (a resume the proxy
                # refused leaves it listening); wait for that pause if it has not come yet.
                if dst.count("postcopy-paused") == recovered_destination_pauses:
                    wait_for(lambda: dst.count("postcopy-paused") > recovered_destination_pauses
                             or dst.status() != "postcopy-active", 10, "pause of the destination")
                if dst.count("postcopy-paused") > recovered_destination_pauses:
                    port = free_port()
                    dst("migrate-recover", uri=f"tcp:127.0.0.1:{port}")
                    recovered_destination_pauses = dst.count("postcopy-paused")
                    seen = len(proxy.events)
                    proxy.send(f"target 127.0.0.1:{port}")
                    proxy.wait("target", after=seen)
                wait_for(proxy.accepting, 10, "end of the proxy's refusal")
                handled_source_pauses = src.count("postcopy-paused")
                src("migrate", uri=f"tcp:127.0.0.1:{proxy.port}", resume=True)
            time.sleep(0.01)
        info = src("query-migrate")
        if info.get("status") != "completed":
            raise RunFailed(f"the source's migration ended {info.get('status')}: {info.get('error-desc', 'no error given')}")
        wait_for(lambda: dst.status() == "completed", 60, "completed on the destination")
        wall = time.monotonic() - started
        poller.stop()
        if poller.error:
            raise RunFailed(poller.error)

        dst("stop")
        check = dst("x-check-memory")
        recoveries = recovery_times(src.statuses(), [e["t"] for e in proxy.named("accepting")])
        figures = {
            "total_s": round(info.get("total-time", wall * 1000) / 1000, 2),
            "cut_rounds": rounds,
            "connections_cut": len(proxy.named("cut")),
            "pauses": src.count("postcopy-paused"),
            "recoveries": len(recoveries),
            "recovery_median_ms": round(statistics.median(recoveries) * 1000, 1) if recoveries else None,
            "recovery_max_ms": round(max(recoveries) * 1000, 1) if recoveries else None,
            "slowest_answer_source_ms": round(poller.slowest["source"] * 1000, 1),
            "slowest_answer_destination_ms": round(poller.slowest["destination"] * 1000, 1),
            "memory_ok": bool(check.get("ok")),
        }
        if not figures["memory_ok"]:
            raise RunFailed(f"the destination's memory check failed: {json.dumps(check)[:500]}")
        if not recoveries:
            raise RunFailed(f"postcopy ended before any recovery ({rounds} cut rounds): lower --cut-every or "
                            "--postcopy-bandwidth so the cuts land in postcopy")
        shutil.rmtree(work, ignore_errors=True)
        return figures
    except RunFailed as error:
        tails = []
        for name in ("src", "dst", "proxy"):
            try:
                with open(f"{work}/{name}.log", "rb") as f:
                    tails.append(f"--- {name}.log (last lines)\n" + b"".join(f.readlines()[-8:]).decode(errors="replace"))
            except OSError:
                pass
        raise RunFailed(f"{error}\nlogs in {work}\n" + "\n".join(tails)) from None
    finally:
        if poller is not None:
            poller.stopped.set()
        if proxy is not None:
            proxy.stop()
        for m in monitors:
            m.close()
        for p in procs:
            p.kill()
            p.wait()


def median(values):
    values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return round(statistics.median(values), 2) if values else None


def describe(f):
    return (f"total {f['total_s']} s, {f['cut_rounds']} cut rounds ({f['connections_cut']} connections), "
            f"{f['recoveries']} recoveries: median {f['recovery_median_ms']} ms, max {f['recovery_max_ms']} ms; "
            f"slowest monitor answer: source {f['slowest_answer_source_ms']} ms, destination {f['slowest_answer_destination_ms']} ms; "
            f"memory check {'ok' if f['memory_ok'] else 'FAILED'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, ".build", "release", "postcopy"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mode", choices=["auto", "manual"], default="auto")
    ap.add_argument("--memory", default="1000M")
    ap.add_argument("--workload", default="random")
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--cut-every", type=float, default=1.5, help="seconds between cuts, from the first postcopy-active on")
    ap.add_argument("--refuse-for", type=float, default=0.3, help="seconds the proxy refuses new connections after each cut")
    ap.add_argument("--postcopy-bandwidth", type=int, default=100_000_000, help="the source's max-postcopy-bandwidth, bytes/s")
    ap.add_argument("--timeout", type=float, default=300, help="seconds a run may take from migrate to completed")
    a = ap.parse_args()
    if not os.access(a.binary, os.X_OK):
        ap.error(f"{a.binary}: no such executable (build it: swift build -c release)")

    runs, failures = [], 0
    for i in range(1, a.runs + 1):
        try:
            figures = run_once(a, i)
        except RunFailed as error:
            failures += 1
            print(f"run {i}: FAILED: {error}", flush=True)
            continue
        runs.append(figures)
        print(f"run {i}: {describe(figures)}", flush=True)
    summary = {"mode": a.mode, "memory": a.memory, "workload": a.workload, "runs": a.runs, "failed": failures}
    if runs:
        keys = ["total_s", "cut_rounds", "connections_cut", "recoveries", "recovery_median_ms", "recovery_max_ms",
                "slowest_answer_source_ms", "slowest_answer_destination_ms"]
        summary["medians"] = {k: median([r[k] for r in runs]) for k in keys}
        summary["medians"]["memory_ok"] = all(r["memory_ok"] for r in runs)
        print(f"medians over {len(runs)} runs: {describe(summary['medians'])}")
    summary["per_run"] = runs
    print(json.dumps(summary))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
