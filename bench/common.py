"""Helpers the benchmarks share: the CPU, CPU count, medians, machine-wide busy time, HLO instruction metadata."""

from __future__ import annotations

import os
import re
import statistics

_HZ = os.sysconf("SC_CLK_TCK")


_ISA = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve")


def cpu_name() -> str:
    """The CPU model and the ISA extensions that decide which matmul kernels run ('Intel Xeon ... [avx512f amx]'),
    so that figures from different machines are never read as if equal."""
    import platform
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key == "model name":
                    model = line.split(":", 1)[1].strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return f"{model} [{' '.join(f for f in _ISA if f in flags) or 'no listed ISA flags'}]"


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
