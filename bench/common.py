"""What the benchmarks share: the machine (CPU model and ISA, CPU count, the kernel libraries each side runs), timing
(wall and CPU seconds, medians), clean-round detection on a shared machine (machine-wide busy time from /proc/stat),
the measured float32 matmul peak, and the command line a run is reproduced with.

Every bench script starts with the same three lines after its imports of the standard library: run as
`python bench/x.py`, Python puts bench/ first on sys.path, where bench/train.py would shadow the `train` package
(and `bench` itself would not be importable); the lines put the repository root there instead, so `python -m bench.x`
and `python bench/x.py` behave alike.
"""

from __future__ import annotations

import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_OTHERS = 0.10  # default: a timed call is "clean" if other processes used < 10 % of the machine meanwhile
_HZ = os.sysconf("SC_CLK_TCK")
_ISA = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve")


# ---- the machine ----------------------------------------------------------------------------------------

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


def _torch_libs() -> str:
    try:
        import torch
    except ImportError:
        return "torch not installed"
    shown = torch.__config__.show()
    onednn = next((ln.split("MKL-DNN", 1)[1].split("(")[0].strip() for ln in shown.splitlines() if "MKL-DNN" in ln),
                  "version unknown")
    mkl = next((ln.split("Library Version", 1)[1].split("-")[0].strip() for ln in shown.splitlines()
                if "Math Kernel Library Version" in ln), None)
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        isa = "?"
    return (f"torch {torch.__version__}: oneDNN {onednn} {'available' if torch.backends.mkldnn.is_available() else 'NOT available'}"
            f", {'MKL ' + mkl if mkl else 'no MKL'}, CPU capability {isa}, {torch.get_num_threads()} threads")


def kernel_libs(torch: bool = True) -> str:
    """One line naming the kernel libraries each side runs: jax/jaxlib, the XLA backend and the XLA_FLAGS in effect
    (which pick XLA:CPU's kernels and threading); with `torch`, its version, oneDNN (mkldnn) version and whether it
    is available, MKL, the CPU capability ATen dispatches to and its thread count."""
    import jax
    import jaxlib
    side = (f"jax {jax.__version__} / jaxlib {jaxlib.__version__}, backend {jax.default_backend()} "
            f"({jax.devices()[0].device_kind}, {jax.device_count()} devices), "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    return f"kernels: {side}" + (f"; {_torch_libs()}" if torch else "")


def header(name: str, torch: bool = True) -> None:
    """Print the bench's header: which CPU it ran on and the kernel libraries each side used."""
    print(f"# {name} on {cpu_name()}, {n_cpus()} CPUs", flush=True)
    print(f"# {kernel_libs(torch)}", flush=True)


def command(module: str, argv: list[str] | None) -> str:
    """The command line that reproduces this run (with XLA_FLAGS when set)."""
    env = os.environ.get("XLA_FLAGS")
    args = sys.argv[1:] if argv is None else argv
    return ((f"XLA_FLAGS={shlex.quote(env)} " if env else "") + f"python -m {module} "
            + " ".join(shlex.quote(a) for a in args)).strip()


# ---- timing ---------------------------------------------------------------------------------------------

def med(xs):
    return statistics.median(xs)


def timed(fn, rounds: int, warmup: int = 1, cpu: list | None = None) -> list[float]:
    """Wall seconds per call of `fn()` (which must block until its result is ready), after `warmup` calls.
    If `cpu` is a list, this process's CPU seconds per call (all threads) are appended to it: on a machine
    shared with other jobs they vary far less than wall time."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(rounds):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    return out


def first_and_median(fn, n: int) -> tuple[float, float]:
    """(seconds of the first call, compilation included; median seconds of `n` later calls); fn blocks on its results."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    return first, med(timed(fn, n, warmup=0))


# ---- measuring on a shared machine ----------------------------------------------------------------------

def machine_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy (user+nice+system+irq+softirq+steal), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:  # not Linux: no contention accounting
        return float("nan")
    return (sum(v) - v[3] - v[4]) / _HZ


@dataclass
class Sample:
    wall: float  # seconds
    cpu: float  # CPU-seconds of the measured process, all threads
    others: float  # fraction of the machine's CPU capacity used by other processes (and steal) meanwhile
    value: Any = None  # what the call returned

    def clean(self, max_others: float = MAX_OTHERS) -> bool:
        return not self.others > max_others  # nan (no /proc/stat) counts as clean


def measure(fn) -> Sample:
    """Call fn() once: its wall and CPU seconds, and how busy the rest of the machine was meanwhile."""
    b0, c0, t0 = machine_busy_s(), time.process_time(), time.perf_counter()
    out = fn()
    t, c, b = time.perf_counter() - t0, time.process_time() - c0, machine_busy_s() - b0
    return Sample(t, c, max(0.0, (b - c) / ((os.cpu_count() or 1) * t)), out)


def pick(samples: list[Sample], need: int, max_others: float = MAX_OTHERS) -> tuple[list[Sample], bool]:
    """The clean samples if there are at least `need` (and >= 1), else all of them; and whether clean."""
    clean = [x for x in samples if x.clean(max_others)]
    return (clean, True) if len(clean) >= max(need, 1) else (samples, False)


def wait_quiet(max_wait: float, window: float = 0.5, max_busy: float = MAX_OTHERS) -> bool:
    """Wait (at most max_wait seconds) until the machine was < max_busy busy for one `window`; True if so."""
    deadline = time.perf_counter() + max_wait
    while True:
        b0 = machine_busy_s()
        time.sleep(window)
        if (machine_busy_s() - b0) / ((os.cpu_count() or 1) * window) < max_busy:
            return True
        if time.perf_counter() > deadline:
            return False


# ---- the float32 matmul peak ----------------------------------------------------------------------------

class MatmulPeak:
    """GFLOP/s of `jax.jit(jnp.dot)` on float32 n x n. A sample times `reps` back-to-back dots (so one sample
    lasts long enough for /proc/stat's 10 ms ticks); the peak is the median over clean samples. Benches take a
    few samples first and one more in every timed round, so the peak sees the same machine load as the rounds."""

    def __init__(self, n: int = 2048, reps: int = 4):
        import jax
        import jax.numpy as jnp
        self.n, self.reps = n, reps
        self.flops = 2 * n ** 3 * reps  # per sample
        self.a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        self.b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
        self.dot = jax.jit(jnp.dot)
        self.samples: list[Sample] = []

    def _run(self):
        for _ in range(self.reps):
            self.dot(self.a, self.b).block_until_ready()

    def sample(self, runs: int = 1, warmup: int = 0) -> Sample:
        for _ in range(warmup):
            self._run()
        for _ in range(runs):
            self.samples.append(measure(self._run))
        return self.samples[-1]

    def gflops_of(self, x: Sample, cpu: bool = False) -> float:
        return self.flops / (x.cpu if cpu else x.wall) / 1e9

    def stats(self, max_others: float = MAX_OTHERS, need: int = 3) -> dict:
        """gflops (median wall), per_cpu_s (GFLOP per CPU-second), max, n of `of` samples used, clean."""
        xs, clean = pick(self.samples, need, max_others)
        return {"gflops": med([self.gflops_of(x) for x in xs]), "per_cpu_s": med([self.gflops_of(x, True) for x in xs]),
                "max": max(self.gflops_of(x) for x in self.samples), "n": len(xs), "of": len(self.samples),
                "clean": clean}

    def label(self) -> str:
        return f"`jax.jit(jnp.dot)` {self.n}², {self.reps} dots per sample"


def torch_peak(n: int = 2048, runs: int = 9) -> float:
    """GFLOP/s of torch.mm on float32 n x n (median of `runs` after 2 warm-ups), for reference."""
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / med(timed(lambda: torch.mm(a, b), runs, warmup=2)) / 1e9
