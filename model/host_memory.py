"""Keep XLA:CPU's per-call scratch memory mapped between calls (glibc malloc settings + synchronous CPU dispatch).

Every call of a compiled XLA:CPU program mallocs one scratch buffer for its temporaries (72 MiB for
small_qwen2's SwiGLU fwd+bwd on a [4096, 256] batch; hundreds of MiB for a train step) and frees it on return.
glibc serves requests above 32 MiB with a fresh `mmap` and hands them back with `munmap`, so each call
page-faults its whole scratch buffer in again: 19,000 minor faults and 28 ms of kernel time per call of that MLP
(docs/benchmarks.md). PyTorch avoids this with its caching allocator; MaxText on TPU VMs preloads tcmalloc.

`keep_freed_host_memory()`, applied when `model` is imported, does two things that only pay together:
- glibc: no `mmap` for large blocks (`M_MMAP_MAX=0`) and no trimming of the heap's free top below 2 GiB
  (`M_TRIM_THRESHOLD`), so a freed scratch buffer stays in the heap for the next call;
- jax: `jax_cpu_enable_async_dispatch=False`, so a single-device program runs on the calling (main) thread and
  allocates from glibc's main heap. With async dispatch it runs on a worker thread, whose per-thread arena
  holds at most 64 MiB per heap and maps anything larger afresh whatever the settings.
Measured on an Intel Xeon (2 cores), `python -m bench.train --no-torch`: small_qwen2 4,650 -> 5,290 tok/s (+14 %),
the tiny MoE 7,490 -> 8,930 (+19 %), compile time and losses unchanged; either setting alone gains nothing. An
earlier variant with one malloc arena for all threads (`M_ARENA_MAX=1`) gained 3-6 % and made XLA's
multi-threaded compiler 40 % slower (lock contention); this one leaves the arenas alone.

What it costs: the process keeps its peak heap instead of returning it to the OS; and on CPU, Python waits for
each single-device computation, so work dispatched "in the background" (grpo.off_policy_steps' next rollout)
runs before the caller continues rather than beside it (multi-device programs stay asynchronous). The numbers
do not change. Off with `R1JAX_HOST_MALLOC=off`; skipped on other C libraries, when a GPU/TPU jax plugin is
installed (the device allocator holds the big buffers there), when the environment sets any `MALLOC_*` glibc
setting or `JAX_CPU_ENABLE_ASYNC_DISPATCH` itself, or when jax's backends were created before `import model`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")

_applied: bool | None = None


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.environ.get("R1JAX_HOST_MALLOC", "") == "off":
        return "R1JAX_HOST_MALLOC=off"
    if any(k.startswith("MALLOC_") for k in os.environ) or "JAX_CPU_ENABLE_ASYNC_DISPATCH" in os.environ:
        return "MALLOC_* or JAX_CPU_ENABLE_ASYNC_DISPATCH set in the environment"
    if any(importlib.util.find_spec(p) is not None for p in ACCELERATOR_PLUGINS):
        return "an accelerator plugin is installed"
    from jax._src import xla_bridge  # private: jax has no public "backends created?" query
    if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
        return "jax's backends already exist (the dispatch setting applies only before they are created)"
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
    import jax
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not all(libc.mallopt(p, v) == 1 for p, v in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))):
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    _applied = True
    return True
