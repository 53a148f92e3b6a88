"""Time and size bounds for scoring untrusted model output: a SIGALRM timer, an explosive-input pre-screen, and the
isolated scoring worker process.

math-verify (sympy) and reasoning-gym scorers can spend unbounded time in C code that no signal interrupts, so by
default they run in one persistent worker subprocess (`python -c 'import rl.sandbox as s; s._worker_main()'`) that is
killed and restarted when an item exceeds its wall-clock `timeout`; the worker also has an address-space limit so a huge
power fails with MemoryError instead of exhausting the machine. In-process scoring uses `_soft_timer` instead, which
only interrupts Python code and only on the main thread.

Protocol: the parent (trusted) writes length-prefixed pickled request tuples to the worker's stdin; the worker answers
one JSON line each on stdout. Ops: ('mv', gold, pred, soft_timeout), ('rg_load', name, ds_kwargs) and
('rg', name, ds_kwargs, entry, answer, soft_timeout); the scoring functions live in `rl.verifiers`.
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

from rl.reward_inputs import _finite

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


def _worker_main() -> None:  # pragma: no cover - runs in the subprocess
    """Worker loop: read length-prefixed pickled requests from the parent (trusted) on stdin, answer one JSON line
    each on stdout. Model text arrives only as str fields of a request and goes only to math-verify/reasoning-gym."""
    from rl.verifiers import _mv_score, _rg_dataset, _rg_score  # not at the top: rl.verifiers imports this module

    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    try:
        import resource

        limit = int(os.environ.get("RL_REWARD_WORKER_MEM", _WORKER_MEM_BYTES))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except Exception:
        pass
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    try:
        _mv_score("1/2", "0.5")  # warm math-verify's imports and caches before announcing readiness
    except Exception:
        pass
    out.write(b'{"ready": true}\n')
    stdin = sys.stdin.buffer
    datasets: dict = {}
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return
        (size,) = struct.unpack(">I", head)
        payload = stdin.read(size)
        if len(payload) < size:
            return
        result = 0.0
        try:
            req = pickle.loads(payload)
            op = req[0]
            if op == "mv":
                _, gold, pred, soft = req
                with _soft_timer(soft):
                    result = _mv_score(gold, pred)
            elif op == "rg_load":
                _, name, ds_kwargs = req
                _rg_dataset(datasets, name, ds_kwargs)
                result = 1.0
            elif op == "rg":
                _, name, ds_kwargs, entry, answer, soft = req
                with _soft_timer(soft):
                    result = _rg_score(datasets, name, ds_kwargs, entry, answer)
        except BaseException:  # includes _SoftTimeout, SystemExit from a scorer, MemoryError
            result = 0.0
        out.write((json.dumps({"r": _finite(result)}) + "\n").encode())


class _Worker:
    """One persistent scoring subprocess per parent process (re-created after a fork). `request` returns the float
    result, or None when the worker could not answer within the deadline (it is then killed and respawned)."""

    def __init__(self, startup_timeout: float = 60.0):
        self.startup_timeout = startup_timeout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self._buf = b""
        self._loaded: set = set()  # setup keys done in the current worker process
        self._pid = os.getpid()
        self.restarts = 0

    def _spawn(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # small virtual memory under
            env[var] = "1"  # the worker's address-space limit; scoring needs no threads
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "import rl.sandbox as s; s._worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, close_fds=True)
        self._ready, self._buf, self._loaded = False, b"", set()

    def _kill(self) -> None:
        proc, self._proc, self._ready, self._buf = self._proc, None, False, b""
        if proc is None:
            return
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
            self._proc, self._ready, self._buf, self._pid = None, False, b"", os.getpid()
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._spawn()
        if not self._ready:
            if self._readline(time.monotonic() + self.startup_timeout) is None:
                logger.warning("reward worker did not start within %.0f s", self.startup_timeout)
                self._kill()
                return False
            self._ready = True
        return True

    def warmup(self) -> bool:
        """Start the worker (if needed) and wait until it is ready; True on success."""
        with self._lock:
            try:
                return self._ensure()
            except Exception:
                logger.warning("reward worker failed to start", exc_info=True)
                self._kill()
                return False

    def _send(self, req: tuple, timeout: float) -> float:
        payload = pickle.dumps(req)
        self._proc.stdin.write(struct.pack(">I", len(payload)) + payload)
        self._proc.stdin.flush()
        line = self._readline(time.monotonic() + timeout)
        if line is None:
            raise TimeoutError
        return _finite(json.loads(line)["r"])

    def request(self, req: tuple, timeout: float, setup: tuple | None = None) -> float | None:
        """Send `req` and wait at most `timeout` s for its result. `setup=(key, setup_req)` is first sent, with the
        startup deadline, to each new worker process that has not run `key` yet (e.g. importing a dataset)."""
        with self._lock:
            try:
                if not self._ensure():
                    return None
                if setup is not None and setup[0] not in self._loaded:
                    if self._send(setup[1], self.startup_timeout) != 1.0:
                        logger.warning("reward worker setup %r failed; scoring 0.0", setup[0])
                        return None
                    self._loaded.add(setup[0])
                return self._send(req, timeout)
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

