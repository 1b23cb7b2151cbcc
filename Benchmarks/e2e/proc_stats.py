"""Per-thread figures from /proc, shared by the e2e scripts that time a host's threads."""

import os


def tasks(pid):
    """The thread ids of process `pid`; none once it has exited."""
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def cpu_ticks(stat_path):
    """(thread or process name, user + system ticks) from a /proc stat file."""
    with open(stat_path) as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    return stat[stat.index("(") + 1:stat.rindex(")")], int(fields[11]) + int(fields[12])
