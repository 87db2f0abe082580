"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`, so this folder is on sys.path)."""

from __future__ import annotations


def cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from ``/proc/stat``; None where there is none."""
    try:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)
