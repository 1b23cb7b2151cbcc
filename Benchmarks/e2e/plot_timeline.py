#!/usr/bin/env python3
"""Draws an x-timeline file as an SVG.

    plot_timeline.py SRC.jsonl [--other DST.jsonl] -o OUT.svg [--title TEXT]

Record the files with `migrate_set_parameter x-timeline PATH` on each host before the
migration (one JSON line every 10 ms, see Sources/Postcopy/Stats/Timeline.swift). The two
files are laid over each other by their wall clocks. Panels, top to bottom: throughput per
channel, pages left, page requests per second, fault latency (destination), vCPUs blocked on
a missing page (destination). Vertical lines mark the precopy passes, the switch to
postcopy, pauses and recoveries, and the end.

Needs matplotlib: scripts/setup.sh --bench installs it.
"""
import argparse
import json
import sys

try:
    import matplotlib
    matplotlib.use("svg")
    import matplotlib.pyplot as plt
    import numpy as np
except ImportError:
    sys.exit("plot_timeline.py needs matplotlib: run scripts/setup.sh --bench (or pip install matplotlib)")

# Rates are taken over this many seconds: one 10 ms sample holds a few frames at most.
RATE_WINDOW = 0.05

MARKERS = {  # event -> (colour, line style, label)
    "postcopy-active": ("tab:red", "-", "switch to postcopy"),
    "postcopy-paused": ("tab:orange", "-", "paused"),
    "postcopy-recover": ("tab:green", "-", "recovering"),
    "completed": ("black", "-", "completed"),
    "failed": ("black", "--", "failed"),
    "cancelled": ("black", "--", "cancelled"),
}


def load(path):
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines:
        sys.exit(f"{path}: no timeline lines")
    return lines


def seconds(lines, t0):
    """Each line's time in seconds from t0 (ms, wall clock); within a file, t-ms is finer."""
    first = lines[0]["wall-ms"] - lines[0]["t-ms"]
    return np.array([(first + line["t-ms"] - t0) / 1000 for line in lines])


def rate(t, values):
    """Per second, over RATE_WINDOW."""
    values = np.asarray(values, dtype=float)
    back = np.searchsorted(t, t - RATE_WINDOW)
    back = np.minimum(back, np.arange(len(t)) - 1).clip(0)
    dt = t - t[back]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(dt > 0, (values - values[back]) / dt, 0.0)
    return r


def channels(lines):
    """Per channel name, its byte counts (multifd lanes numbered)."""
    lanes = max(len(line["bytes"]["multifd"]) for line in lines)
    named = {"main": [line["bytes"]["main"] for line in lines],
             "urgent": [line["bytes"]["urgent"] for line in lines]}
    for i in range(lanes):
        named[f"multifd {i}"] = [line["bytes"]["multifd"][i] if i < len(line["bytes"]["multifd"]) else 0 for line in lines]
    return {name: counts for name, counts in named.items() if counts[-1] > 0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("timeline", help="an x-timeline file (usually the source's)")
    parser.add_argument("--other", help="the other side's x-timeline file (usually the destination's)")
    parser.add_argument("-o", "--output", required=True, help="the SVG to write")
    parser.add_argument("--title", help="a title for the figure")
    args = parser.parse_args()

    sides = [load(args.timeline)] + ([load(args.other)] if args.other else [])
    t0 = min(lines[0]["wall-ms"] - lines[0]["t-ms"] for lines in sides)
    times = [seconds(lines, t0) for lines in sides]
    primary, t = sides[0], times[0]
    # Latency and blocked vCPUs are the destination's; requests too when it is there.
    dest = next(((lines, ts) for lines, ts in zip(sides, times) if lines[0]["side"] == "destination"), None)

    fig, axes = plt.subplots(5, 1, sharex=True, figsize=(10, 11), height_ratios=[3, 2, 2, 2, 1.3])
    throughput, left, requests, latency, blocked = axes

    verb = "sent" if primary[0]["side"] == "source" else "received"
    for name, counts in channels(primary).items():
        throughput.plot(t, rate(t, counts) * 8 / 1e9, label=f"{name} ({verb})", linewidth=1)
    for lines, ts in zip(sides[1:], times[1:]):
        total = np.sum(list(channels(lines).values()), axis=0)
        other_verb = "sent" if lines[0]["side"] == "source" else "received"
        throughput.plot(ts, rate(ts, total) * 8 / 1e9, "--", color="grey", linewidth=1, label=f"all channels ({other_verb}, {lines[0]['side']})")
    throughput.set_ylabel("Gbit/s")
    throughput.legend(loc="upper right", fontsize=8)

    for lines, ts in zip(sides, times):
        left.plot(ts, [line["remaining-pages"] for line in lines], label=lines[0]["side"], linewidth=1)
    left.set_ylabel("pages left")
    left.legend(loc="upper right", fontsize=8)

    req_lines, req_t = dest if dest else (primary, t)
    requests.plot(req_t, rate(req_t, [line["requests"] for line in req_lines]), linewidth=1, color="tab:purple")
    requests.set_ylabel("requests/s")

    if dest:
        lines, ts = dest
        for key, style in (("p50", ":"), ("p99", "-"), ("max", "--")):
            latency.plot(ts, [line["latency-us"][key] for line in lines], style, linewidth=1, label=key)
        latency.set_yscale("symlog", linthresh=10)
        latency.legend(loc="upper left", fontsize=8)
        blocked.step(ts, [line["blocked-vcpus"] for line in lines], where="post", linewidth=1, color="tab:brown")
    latency.set_ylabel("fault latency\nso far (µs)")
    blocked.set_ylabel("vCPUs blocked")
    blocked.yaxis.get_major_locator().set_params(integer=True)
    blocked.set_xlabel("seconds")

    # Markers from the source's file (or the only one); the destination's status lags by a frame.
    marked = next(((lines, ts) for lines, ts in zip(sides, times) if lines[0]["side"] == "source"), (primary, t))
    drawn = set()
    for line, x in zip(*marked):
        for event in line.get("events", []):
            if event.startswith("pass "):
                style = ("grey", ":", "precopy pass")
            elif event in MARKERS:
                style = MARKERS[event]
            else:
                continue
            colour, dash, label = style
            for ax in axes:
                ax.axvline(x, color=colour, linestyle=dash, linewidth=0.8,
                           label=None if label in drawn or ax is not blocked else label)
            drawn.add(label)
    blocked.legend(loc="upper right", fontsize=8, ncol=len(drawn) or 1)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(args.title or f"x-timeline: {args.timeline}" + (f" and {args.other}" if args.other else ""))
    fig.tight_layout()
    fig.savefig(args.output)


if __name__ == "__main__":
    main()
