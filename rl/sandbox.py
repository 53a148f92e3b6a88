"""Time and size bounds for scoring untrusted model output, and the sandboxed scoring worker process.

math-verify (sympy) and reasoning-gym scorers can spend unbounded time in C code that no signal interrupts, and some
of them evaluate the answer as code (`eval`, sympy's `parse_expr`), so they run only in one persistent worker
subprocess (`python -c 'import rl.sandbox as s; s._worker_main()'`):

- started in its own session and process group (killed as a group), in an empty temporary directory, with a scrubbed
  environment and no inherited file descriptors;
- it imports and warms up everything it will need (math-verify, the registered reasoning-gym datasets, the modules
  of registered custom scorers), then seals itself (`rl.sandbox_policy.seal`: an audit hook that refuses code
  execution, writes, imports, processes and sockets, and resource limits on memory, CPU, file size, open files and
  processes) before it announces readiness; if sealing fails it reports the error and exits, and the parent raises
  `SandboxError` instead of scoring;
- each item has a wall-clock deadline (the parent kills and restarts the worker past it) and a CPU budget (the
  kernel stops the worker past it); each reward call also has a per-batch budget (`rl.verifiers`).

Registering a new dataset or scorer module after the worker started restarts it (a sealed worker imports nothing).

Protocol: the parent (trusted) writes length-prefixed pickled messages to the worker's stdin: first the spec
{'datasets': [(name, ds_kwargs)], 'modules': [name], 'mem': bytes}, then requests (id, op, ...). The worker answers
one JSON line each on stdout: {'ready': true} or {'error': str} once, then {'id', 'r', 'v'} (v: refused events).
Ops: ('mv', gold, pred, soft_timeout), ('rg', name, ds_kwargs, entry, answer, soft_timeout) and
('call', 'module:function', args, soft_timeout); the scoring functions live in `rl.verifiers`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import pickle
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from rl.reward_inputs import SandboxError, _finite

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Time bounds: a SIGALRM timer (main thread only) and the isolated worker process


class _SoftTimeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so that library `except Exception` blocks do not swallow it."""


@contextmanager
def _soft_timer(seconds: float | None):
    """Interrupt Python code running past `seconds` with `_SoftTimeout`. A no-op off the main thread, when seconds is
    None, or when a real-time interval timer is already armed (someone else's). Cannot interrupt long C calls."""
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if usable:
        try:
            usable = signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        except Exception:
            usable = False
    if not usable:
        yield
        return

    def handler(signum, frame):
        raise _SoftTimeout()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_EXPLOSIVE = [  # applied after whitespace runs are collapsed to one space, so each regex runs in linear time
    re.compile(r"(?:\^|\*\*) ?[{(]? ?[+-]? ?\d{4}"),  # exponent with 4+ digits
    re.compile(r"\d{4,} ?!"),  # factorial of a 4+ digit number
    re.compile(r"(?:\^|\*\*) ?[{(]? ?[+-]? ?\w{1,16} ?(?:\^|\*\*)"),  # a^b^c towers
    re.compile(r"(?:\^|\*\*) ?\{[^{}]{0,64}(?:\^|\*\*)"),  # a^{b^c}
    re.compile(r"(?:\^|\*\*) ?\([^()]{0,64}(?:\^|\*\*)"),  # a**(b**c)
]


def _explosive(s: str) -> bool:
    """Heuristic pre-screen for inputs that make sympy compute astronomically large numbers (power towers, huge
    exponents or factorials). Linear-time regexes over a length-capped string."""
    if s.count("^") + s.count("**") > 6:
        return True
    s = re.sub(r"\s+", " ", s)
    return any(p.search(s) for p in _EXPLOSIVE)


_WORKER_MEM_BYTES = 4 << 30
_WARM_MV = [("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("x^2+1", "x**2 + 1"), ("\\boxed{3}", "3!"), ("[1, 2]", "(1,2]"),
            ("x = 2", "2"), ("50\\%", "0.5"), ("\\sqrt{2}", "sqrt(2)"), ("\\{1, 2\\}", "{1,2}"), ("1e3", "1000")]


def _warm_up(spec: dict) -> dict:
    """Import and exercise everything the sealed worker will need (a sealed worker imports nothing)."""
    import importlib

    from rl.verifiers import _mv_score, _rg_dataset

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    for gold, pred in _WARM_MV:
        try:
            _mv_score(gold, pred)
        except Exception:
            pass
    datasets: dict = {}
    for name, ds_kwargs in spec.get("datasets", ()):
        ds = _rg_dataset(datasets, name, ds_kwargs)
        entry = ds[0]
        for answer in (entry.get("answer"), "0", "['a', 'b']", "[[1, 0], [0, 1]]", "x + 1", ""):
            try:
                ds.score_answer(answer, entry)
            except Exception:
                pass
    for module in spec.get("modules", ()):
        importlib.import_module(module)
    return datasets


def _call(target: str, args: tuple) -> float:
    module, _, fn = target.partition(":")
    return getattr(sys.modules[module], fn)(*args)


def _worker_main() -> None:  # pragma: no cover - runs in the subprocess
    """Worker loop: read the spec, warm up, seal, then answer length-prefixed pickled requests from the parent
    (trusted) with one JSON line each. Model text arrives only as str fields of a request."""
    from rl import sandbox_policy
    from rl.verifiers import _mv_score, _rg_score

    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    stdin = sys.stdin.buffer

    def read():
        head = stdin.read(4)
        if len(head) < 4:
            return None
        (size,) = struct.unpack(">I", head)
        payload = stdin.read(size)
        return pickle.loads(payload) if len(payload) == size else None

    def write(obj) -> None:
        out.write((json.dumps(obj) + "\n").encode())

    try:
        spec = read() or {}
        datasets = _warm_up(spec)
        sandbox_policy.seal(mem_bytes=int(spec.get("mem", _WORKER_MEM_BYTES)))
    except BaseException as e:
        write({"error": f"{type(e).__name__}: {e}"})
        return
    write({"ready": True})
    while True:
        req = read()
        if req is None:
            return
        rid, op, result = req[0], req[1], 0.0
        try:
            soft = float(req[-1])
            sandbox_policy.cpu_budget(soft + 1.0)
            with _soft_timer(soft):
                if op == "mv":
                    result = _mv_score(req[2], req[3])
                elif op == "rg":
                    result = _rg_score(datasets, req[2], req[3], req[4], req[5])
                elif op == "call":
                    result = _call(req[2], req[3])
        except BaseException:  # includes _SoftTimeout, SandboxViolation, SystemExit from a scorer, MemoryError
            result = 0.0
        refused, sandbox_policy.violations[:] = list(sandbox_policy.violations[:8]), []
        write({"id": rid, "r": _finite(result), "v": refused})


class _Worker:
    """One persistent sandboxed scoring subprocess per parent process (re-created after a fork). `request` returns
    the float result, or None when the worker could not answer within the deadline (it is then killed and
    respawned). `register` adds a dataset or scorer module to what every new worker loads before sealing."""

    def __init__(self, startup_timeout: float = 60.0):
        self.startup_timeout = startup_timeout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self._buf = b""
        self._spec: dict = {"datasets": [], "modules": []}
        self._spawned_spec: dict | None = None
        self._pid = os.getpid()
        self._next_id = 0
        self._tmp: str | None = None
        self.restarts = 0
        self.violations: list[str] = []  # events the sandbox refused, most recent last (capped)

    def register(self, kind: str, item) -> None:
        """Add `item` to the spec's `kind` ('datasets': (name, ds_kwargs); 'modules': a module name)."""
        with self._lock:
            if item not in self._spec[kind]:
                self._spec[kind] = self._spec[kind] + [item]

    def _spawn(self) -> None:
        import tempfile

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self._tmp = tempfile.mkdtemp(prefix="r1jax-sandbox-")
        paths = [root] + [os.path.abspath(p or ".") for p in sys.path if os.path.isdir(p or ".")]
        env = {"PATH": "/usr/bin:/bin", "HOME": self._tmp, "TMPDIR": self._tmp, "LANG": "C.UTF-8",
               "PYTHONPATH": os.pathsep.join(paths),
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1"}
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # small virtual memory under
            env[var] = "1"  # the worker's address-space limit; scoring needs no threads
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-c", "import os, sys; sys.path[:0] = os.environ['PYTHONPATH'].split(os.pathsep); "
             "import rl.sandbox as s; s._worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=self._tmp,
            close_fds=True, start_new_session=True)
        self._ready, self._buf = False, b""
        self._spawned_spec = {k: list(v) for k, v in self._spec.items()}
        self._write(dict(self._spawned_spec, mem=int(os.environ.get("RL_REWARD_WORKER_MEM", _WORKER_MEM_BYTES))))

    def _write(self, obj) -> None:
        payload = pickle.dumps(obj)
        self._proc.stdin.write(struct.pack(">I", len(payload)) + payload)
        self._proc.stdin.flush()

    def _kill(self) -> None:
        proc, self._proc, self._ready, self._buf = self._proc, None, False, b""
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: nothing it started outlives it
            except Exception:
                pass
            try:
                proc.kill()
                proc.wait(timeout=5)
            except Exception:
                pass
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except Exception:
                    pass
        if self._tmp is not None:
            import shutil

            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                self._kill()

    def _readline(self, deadline: float) -> bytes | None:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None  # the worker died
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def _ensure(self) -> bool:
        if self._pid != os.getpid():  # forked child: the inherited pipes belong to the parent's worker
            self._proc, self._ready, self._buf, self._pid, self._tmp = None, False, b"", os.getpid(), None
        if self._proc is not None and self._spawned_spec != self._spec:
            self._kill()  # a sealed worker cannot load what was registered since it started
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._spawn()
        if not self._ready:
            line = self._readline(time.monotonic() + self.startup_timeout)
            if line is None:
                logger.warning("reward worker did not start within %.0f s", self.startup_timeout)
                self._kill()
                return False
            msg = json.loads(line)
            if "error" in msg:
                self._kill()
                raise SandboxError(f"the scoring sandbox could not be set up: {msg['error']}")
            self._ready = True
        return True

    def warmup(self) -> bool:
        """Start the worker (if needed) and wait until it is sealed and ready; True on success. Raises
        `SandboxError` if the worker cannot seal itself."""
        with self._lock:
            try:
                return self._ensure()
            except SandboxError:
                raise
            except Exception:
                logger.warning("reward worker failed to start", exc_info=True)
                self._kill()
                return False

    def request(self, req: tuple, timeout: float) -> float | None:
        """Send `req` (op, ...) and wait at most `timeout` s for its result. Raises `SandboxError` if the worker
        cannot seal itself; returns None when it fails or misses the deadline (it is then restarted)."""
        with self._lock:
            try:
                if not self._ensure():
                    return None
                self._next_id += 1
                self._write((self._next_id,) + tuple(req))
                line = self._readline(time.monotonic() + timeout)
                if line is None:
                    raise TimeoutError
                msg = json.loads(line)
                if msg.get("id") != self._next_id:
                    raise RuntimeError("reward worker answered out of turn")
                if msg.get("v"):
                    self.violations = (self.violations + list(msg["v"]))[-64:]
                    logger.warning("scoring sandbox refused: %s", "; ".join(msg["v"])[:300])
                return _finite(msg["r"])
            except SandboxError:
                raise
            except Exception:
                # Deadline passed or the worker broke: kill it and start a fresh one now, so that its import time
                # overlaps with whatever the caller does next.
                self.restarts += 1
                self._kill()
                try:
                    self._spawn()
                except Exception:
                    self._proc = None
                return None


_WORKER: _Worker | None = None
_WORKER_LOCK = threading.Lock()


def _worker() -> _Worker:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _Worker()
            atexit.register(_WORKER.close)
        return _WORKER

