"""Helpers the benchmarks share: CPU count, medians, machine-wide busy time, HLO instruction metadata."""

from __future__ import annotations

import os
import re
import statistics

_HZ = os.sysconf("SC_CLK_TCK")


def n_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def med(xs):
    return statistics.median(xs)


def machine_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy (user+nice+system+irq+softirq+steal), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:  # not Linux: no contention accounting
        return float("nan")
    return (sum(v) - v[3] - v[4]) / _HZ


def hlo_op_meta(hlo: str) -> dict[str, tuple[str, str]]:
    """{HLO instruction name: (its shape, its op_name metadata)} from a compiled module's text; profiler trace
    events are named after these instructions."""
    meta = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
        if m and m.group(1) not in meta:
            on = re.search(r'op_name="([^"]*)"', line)
            meta[m.group(1)] = (m.group(2), on.group(1) if on else "")
    return meta
