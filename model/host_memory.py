"""Opt-in: keep XLA:CPU's per-call scratch memory mapped between calls (glibc malloc settings).

Every call of a compiled XLA:CPU program mallocs one scratch buffer for its temporaries (72 MiB for
small_qwen2's SwiGLU fwd+bwd on a [4096, 256] batch; hundreds of MiB for a train step) and frees it on return.
glibc serves requests above 32 MiB with a fresh `mmap` and hands them back with `munmap`, and XLA's worker
threads allocate from per-thread arenas that do the same for anything larger than their 64 MiB heaps, so each
call page-faults its whole scratch buffer in again: 19,000 minor faults and 28 ms of kernel time per call of
that MLP (72 ms -> 54 ms without them, on an Intel Xeon, 2 cores; docs/benchmarks.md). PyTorch avoids this
with its caching allocator; MaxText on TPU VMs preloads tcmalloc.

`keep_freed_host_memory()` makes glibc keep freed memory for reuse: one arena (`M_ARENA_MAX=1`, so XLA's
threads share the main heap), no `mmap` for large blocks (`M_MMAP_MAX=0`; glibc still falls back to `mmap`
when the heap cannot grow) and no trimming of the heap's free top below 2 GiB (`M_TRIM_THRESHOLD`).

It is opt-in (`R1JAX_HOST_MALLOC=keep` in the environment; applied when `model` is imported, before jax starts
its CPU threads, since a thread keeps the arena it first allocated from) because it is a trade: one arena makes
XLA's multi-threaded compiler contend on malloc's lock, so compiling gets ~40 % slower (bench.train: tiny
11.9 -> 17.2 s to the first step, small 8.2 -> 11.5 s; the test suite 17.7 -> 22.3 min), while steps get 3-6 %
faster (small_qwen2 5,273 -> 5,453 tok/s) and stop being slowed by a neighbour's allocations. It pays for long
runs whose per-call scratch exceeds 32 MiB (batch x seq x hidden large enough), not for short tiny ones. The
cost otherwise: the process keeps its peak heap instead of returning it to the OS. It does nothing on other C
libraries, when a GPU/TPU jax plugin is installed (the device allocator holds the big buffers there), or when
the environment sets any `MALLOC_*` glibc setting of its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")

_applied: bool | None = None


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.environ.get("R1JAX_HOST_MALLOC", "") != "keep":
        return "R1JAX_HOST_MALLOC is not 'keep'"
    if any(k.startswith("MALLOC_") for k in os.environ):
        return "MALLOC_* set in the environment"
    if any(importlib.util.find_spec(p) is not None for p in ACCELERATOR_PLUGINS):
        return "an accelerator plugin is installed"
    return None


def keep_freed_host_memory() -> bool:
    """Apply the settings once per process; True when they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if _skip_reason() is not None:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl has mallopt with other semantics
    except (OSError, AttributeError):
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _applied = all(libc.mallopt(p, v) == 1 for p, v in
                   ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return _applied
