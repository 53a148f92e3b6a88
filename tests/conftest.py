"""Test session setup: 8 fake CPU devices (sharding tests) before JAX initialises, float32 everywhere, cheap compiles."""

import importlib.util
import os
import shutil
import tempfile

# LLVM at -O1 instead of -O3: compiling is most of the suite's time (hundreds of programs, each run for milliseconds)
# and -O1 compiles about a third faster (tests/test_scan.py: 202 -> 132 CPU-s). Numbers move only at float rounding,
# and the subprocesses tests start inherit the flags, so both sides of a comparison are built alike. (-O0 is no faster
# than -O1 and moved the mesh-equality tests' parameters past their 1e-5 bound.)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole run, made by the first process (pytest itself, or its xdist
# controller) and inherited through the environment by the xdist workers and by every subprocess a test starts
# (experiment runs, kill-and-resume, two-process runs): they compile many identical programs, and compilation is
# most of the suite's time. A fresh directory per run, removed at the end, so each run still compiles everything
# once. The size limit turns on jax's file lock, so concurrent workers never read a half-written entry.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and importlib.util.find_spec("filelock") is not None:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="r1jax-test-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Whole files in the order xdist hands them out (--no-loadscope-reorder): files with a `slow` test first, then
    by how many tests a file holds, so the long runs start at once instead of ending the suite on one busy core."""
    files = {}
    for item in items:
        files.setdefault(item.path, []).append(item)

    def order(path):
        tests = files[path]
        return not any(t.get_closest_marker("slow") for t in tests), -len(tests)

    items[:] = [item for path in sorted(files, key=order) for item in files[path]]
