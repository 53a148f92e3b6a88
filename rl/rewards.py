"""Rule-based rewards for GRPO: plain composable callables over untrusted model output.

Signature (TRL style): `fn(completions: list[str], **batch_fields) -> list[float]`, one float per completion.
Batch fields: 'answer' (gold), and for Countdown 'numbers' and 'target'. A field may be given per completion (a list as
long as `completions`) or once for the whole batch (a scalar, or for 'numbers' a flat list of ints); other fields
(e.g. TRL's 'prompts', 'completion_ids') are ignored unless a reward asks for them.

Convention (R1-Zero template, algorithms.md §2): a completion is the text generated after the prompt's 'Assistant:',
and must itself hold the whole `<think> ... </think> <answer> ... </answer>`. If a template ends the prompt with
'<think>', prepend '<think>' to each completion before scoring.

Safety contract of every reward here: the completion is untrusted input. Nothing calls eval/exec/compile on it;
arithmetic goes through `rl.safe_eval`; parsing is bounded in size and time; garbage in (None, non-str, megabytes of
text, adversarial nesting) gives 0.0, never an exception. math-verify (sympy) and reasoning-gym scorers can spend
unbounded time in C code that no signal interrupts, so by default they run in one persistent worker subprocess
(`python -c 'import rl.rewards as r; r._worker_main()'`) that is killed and restarted when an item exceeds its
wall-clock `timeout`; the worker also has an address-space limit so a huge power fails with MemoryError instead of
exhausting the machine. `isolate=False` scores in-process instead: on the main thread with a `setitimer` bound that
only interrupts Python code, elsewhere with no time bound (only the input caps and the pre-screen).

Contents:
- `extract_answer(text)`: the stripped content of the last `<answer>...</answer>` (None if absent).
- `format_reward`, `accuracy_reward` (integer match), `arithmetic_reward` (answer may be an expression),
  `countdown_reward` (TinyZero), `math_verify_reward` / `MathVerifyReward`, `ReasoningGymReward`.
- `soft_overlong_penalty(lengths, max_len, cache_len)` (DAPO eq. 13) and the reward `OverlongPenalty`.
- `combine({name: (fn, weight)})` -> fn returning (totals, {name: per-completion values}).
"""

from __future__ import annotations

import ast
import atexit
import json
import logging
import math
import numbers as _numbers
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
from collections.abc import Callable
from contextlib import contextmanager
from fractions import Fraction
from typing import Any

from rl.safe_eval import numbers_used, safe_eval

__all__ = [
    "ANSWER_WINDOW",
    "MathVerifyReward",
    "OverlongPenalty",
    "ReasoningGymReward",
    "accuracy_reward",
    "arithmetic_reward",
    "combine",
    "countdown_reward",
    "extract_answer",
    "format_reward",
    "math_verify_reward",
    "soft_overlong_penalty",
]

logger = logging.getLogger(__name__)

ANSWER_WINDOW = 10_000  # extract_answer looks only at the last this many characters
_TRAILING_TOKENS = ("<eos>", "<pad>", "</s>", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>")


# ----------------------------------------------------------------------------------------------------------------
# Input coercion


def _text(c) -> str | None:
    """The completion's text: a str, a chat message {'content': str}, or a list of messages (the last one counts)."""
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        c = c.get("content")
        return c if isinstance(c, str) else None
    if isinstance(c, (list, tuple)) and c:
        return _text(c[-1])
    return None


def _completions(completions) -> list:
    if completions is None or isinstance(completions, (str, bytes, dict)):
        return [completions] if completions is not None else []
    try:
        return list(completions)
    except Exception:
        return []


def _is_seq(x) -> bool:
    return not isinstance(x, (str, bytes, dict)) and hasattr(x, "__len__") and hasattr(x, "__getitem__")


def _column(value, n: int, *, nested: bool = False) -> list:
    """`value` as one entry per completion: a per-completion sequence of length n is used as is; a scalar (or, when
    `nested`, a flat sequence of scalars) is shared by all; a length-1 sequence is broadcast; anything else -> None."""
    if value is None:
        return [None] * n
    if not _is_seq(value):
        return [value] * n
    try:
        seq = list(value)
    except Exception:
        return [None] * n
    if nested and not any(_is_seq(v) for v in seq):
        return [seq] * n
    if len(seq) == n:
        return seq
    if len(seq) == 1:
        return seq * n
    return [None] * n


def _finite(x) -> float:
    try:
        x = float(x)
    except Exception:
        return 0.0
    return x if math.isfinite(x) else 0.0


def _guarded(fn):
    """Make a reward never raise: any exception gives 0.0 for the whole batch; outputs become finite floats."""

    def wrapper(completions, *args, **kwargs):
        items = _completions(completions)
        try:
            out = fn(items, *args, **kwargs)
            out = [_finite(v) for v in out]
            if len(out) != len(items):
                raise ValueError(f"{fn.__name__} returned {len(out)} values for {len(items)} completions")
            return out
        except Exception:
            logger.warning("reward %s failed; scoring the batch 0.0", getattr(fn, "__name__", fn), exc_info=True)
            return [0.0] * len(items)

    wrapper.__name__ = fn.__name__
    wrapper.__qualname__ = fn.__qualname__
    wrapper.__doc__ = fn.__doc__
    wrapper.__wrapped__ = fn
    return wrapper


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction and format


def extract_answer(text) -> str | None:
    """Stripped content of the LAST complete `<answer>...</answer>` within the last `ANSWER_WINDOW` characters of
    `text`; None if there is none (or `text` is not a str). Linear time (two `rfind`s, no regex)."""
    text = _text(text)
    if text is None:
        return None
    s = text[-ANSWER_WINDOW:]
    end = s.rfind("</answer>")
    if end < 0:
        return None
    start = s.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return s[start + len("<answer>"):end].strip()


def _strip_trailing(s: str) -> str:
    s = s.rstrip()
    for _ in range(64):  # bounded: strip end-of-sequence markers a decoder may leave
        for tok in _TRAILING_TOKENS:
            if s.endswith(tok):
                s = s[: -len(tok)].rstrip()
                break
        else:
            return s
    return s


def _well_formed(text) -> bool:
    text = _text(text)
    if text is None:
        return False
    s = _strip_trailing(text).lstrip()
    if not (s.startswith("<think>") and s.endswith("</answer>")):
        return False
    if any(s.count(t) != 1 for t in ("<think>", "</think>", "<answer>", "</answer>")):
        return False
    close_think, open_answer = s.find("</think>"), s.find("<answer>")
    if not close_think < open_answer or s[close_think + len("</think>"):open_answer].strip():
        return False
    return bool(s[open_answer + len("<answer>"):-len("</answer>")].strip())


@_guarded
def format_reward(completions, **kwargs) -> list[float]:
    """1.0 iff the completion is `<think>R</think> <answer>A</answer>`: only whitespace before `<think>`, between
    `</think>` and `<answer>`, and after `</answer>` (where trailing end markers such as '<eos>' are also allowed);
    each of the four tags exactly once; A not blank (R may be). Else 0.0. Linear time."""
    return [1.0 if _well_formed(c) else 0.0 for c in completions]


# ----------------------------------------------------------------------------------------------------------------
# Integer / arithmetic / Countdown

_INT_RE = re.compile(r"\s*([+-]?)\s*(\d{1,64}|\d{1,3}(?:,\d{3}){1,21})(?:\.0*)?\s*")


def _as_int(x) -> int | None:
    """'+3', ' 3 ', '3.0', '1,000', 3, numpy.int64(3) and 3.0 -> 3; anything else (including bool) -> None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, _numbers.Integral):
        return int(x)
    if isinstance(x, _numbers.Real):
        x = float(x)
        return int(x) if math.isfinite(x) and x == int(x) else None
    if not isinstance(x, str) or len(x) > 128:
        return None
    m = _INT_RE.fullmatch(x)
    if not m:
        return None
    v = int(m.group(2).replace(",", ""))
    return -v if m.group(1) == "-" else v


@_guarded
def accuracy_reward(completions, answer=None, **kwargs) -> list[float]:
    """1.0 iff the extracted answer and the gold `answer` are the same integer after normalisation ('+3', ' 3 ',
    '3.0' all mean 3); a gold that is not an integer is compared as a stripped string. Else 0.0."""
    out = []
    for c, gold in zip(completions, _column(answer, len(completions))):
        pred = extract_answer(c)
        if pred is None or gold is None:
            out.append(0.0)
            continue
        g = _as_int(gold)
        if g is not None:
            out.append(1.0 if _as_int(pred) == g else 0.0)
        else:
            out.append(1.0 if isinstance(gold, str) and len(pred) <= 1000 and pred == gold.strip() else 0.0)
    return out


def _gold_value(gold) -> Fraction | None:
    if isinstance(gold, bool):
        return None
    if isinstance(gold, (_numbers.Integral, Fraction)):
        return Fraction(gold)
    if isinstance(gold, _numbers.Real):
        gold = float(gold)
        return Fraction(repr(gold)) if math.isfinite(gold) else None
    return safe_eval(str(gold)) if isinstance(gold, str) else None


@_guarded
def arithmetic_reward(completions, answer=None, allow_pow: bool = False, **kwargs) -> list[float]:
    """1.0 iff the extracted answer is an arithmetic expression (see `rl.safe_eval`) whose exact value equals the
    gold `answer` (itself a number or expression); else 0.0. Note: this also credits restating the question's
    expression as the answer; use `accuracy_reward` when the model must produce the number itself."""
    out = []
    for c, gold in zip(completions, _column(answer, len(completions))):
        pred = extract_answer(c)
        g = _gold_value(gold)
        v = safe_eval(pred, allow_pow=bool(allow_pow)) if pred is not None else None
        out.append(1.0 if v is not None and g is not None and v == g else 0.0)
    return out


@_guarded
def countdown_reward(completions, numbers=None, target=None, format_score: float = 0.0, **kwargs) -> list[float]:
    """TinyZero Countdown: 1.0 iff the extracted answer is an equation over + - * / ( ) that uses each of `numbers`
    exactly once (all of them, integer literals only) and evaluates (via `safe_eval`) to `target` within 1e-5.
    Otherwise `format_score` if an answer was extracted (TinyZero uses 0.1), else 0.0. `numbers` is a list of ints
    per completion, or one flat list for the whole batch."""
    n = len(completions)
    out = []
    for c, nums, tgt in zip(completions, _column(numbers, n, nested=True), _column(target, n)):
        eq = extract_answer(c)
        if eq is None:
            out.append(0.0)
            continue
        out.append(1.0 if _countdown_ok(eq, nums, tgt) else _finite(format_score))
    return out


def _countdown_ok(eq: str, nums, tgt) -> bool:
    if nums is None or tgt is None or not _is_seq(nums):
        return False
    given = [_as_int(x) for x in nums]
    if any(g is None for g in given):
        return False
    used = numbers_used(eq)
    if not used or any(type(u) is not int for u in used) or sorted(used) != sorted(given):
        return False
    value = safe_eval(eq)
    t = _gold_value(tgt)
    if value is None or t is None:
        return False
    return abs(float(value) - float(t)) < 1e-5


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
            [sys.executable, "-c", "import rl.rewards as r; r._worker_main()"],
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


# ----------------------------------------------------------------------------------------------------------------
# math-verify


def _mv_score(gold: str, pred: str) -> float:
    """math-verify `verify(parse(gold), parse(pred))` with its own signal timeouts off (the caller bounds time)."""
    from math_verify import parse, verify

    g = parse(gold, parsing_timeout=None)
    p = parse(pred, parsing_timeout=None)
    if not g or not p:
        return 0.0
    return 1.0 if verify(g, p, timeout_seconds=None) else 0.0


class MathVerifyReward:
    """1.0 iff math-verify judges the extracted answer equal to the gold `answer` (`verify(parse(gold),
    parse(pred))`; order matters); 0.0 otherwise, for a missing answer, one over `max_chars` characters, one the
    `prescreen` flags as explosive (power towers, huge exponents/factorials), or any failure.

    Each item is bounded by `timeout` seconds of wall clock: with `isolate=True` (default) it runs in the shared worker
    process, which is killed past the deadline (the next call then waits for a restart, ~1 s); with `isolate=False`
    it runs in-process under a SIGALRM timer (main thread only; it cannot interrupt C code)."""

    def __init__(self, timeout: float = 2.0, *, isolate: bool = True, max_chars: int = 2000, prescreen: bool = True,
                 extract: Callable[[Any], str | None] = extract_answer):
        self.timeout, self.isolate, self.max_chars, self.prescreen = float(timeout), isolate, max_chars, prescreen
        self.extract = extract
        self.__name__ = "math_verify_reward"

    def warmup(self) -> bool:
        """Start the worker ahead of the first call (no-op in-process)."""
        return _worker().warmup() if self.isolate else True

    def score_one(self, pred, gold) -> float:
        if not isinstance(pred, str) or gold is None or len(pred) > self.max_chars or not pred.strip():
            return 0.0
        gold = gold if isinstance(gold, str) else str(gold)
        if len(gold) > 100_000 or (self.prescreen and _explosive(pred)):
            return 0.0
        if self.isolate:
            r = _worker().request(("mv", gold, pred, max(0.05, 0.8 * self.timeout)), self.timeout)
            return 0.0 if r is None else r
        try:
            with _soft_timer(self.timeout):
                return _mv_score(gold, pred)
        except BaseException as e:  # _SoftTimeout is a BaseException; let Ctrl-C through
            if isinstance(e, KeyboardInterrupt):
                raise
            return 0.0

    def __call__(self, completions, answer=None, **kwargs) -> list[float]:
        return _guarded(self._call)(completions, answer=answer)

    def _call(self, completions, answer=None) -> list[float]:
        golds = _column(answer, len(completions))
        return [self.score_one(self.extract(c), g) for c, g in zip(completions, golds)]


math_verify_reward = MathVerifyReward()


# ----------------------------------------------------------------------------------------------------------------
# reasoning-gym

# Callables a reasoning-gym answer may name when it parses as Python (several scorers pass the answer to `eval` or
# sympy's `parse_expr`, which evaluates it). Anything else that could run code is refused before scoring.
_SAFE_CALLS = frozenset({
    "abs", "min", "max", "round", "sqrt", "exp", "log", "ln", "sin", "cos", "tan", "asin", "acos", "atan", "sinh",
    "cosh", "tanh", "Abs", "Rational", "Integer", "Float", "Symbol", "Matrix"})
_SAFE_NODES = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare,
               ast.IfExp, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.Subscript, ast.Slice, ast.operator,
               ast.unaryop, ast.boolop, ast.cmpop, ast.Call, ast.keyword)
_IDENT_CALL = re.compile(r"([A-Za-z_]\w{0,63})\(")
_EXPR_CALL = re.compile(r"[)\]}'\"]\(")


def _code_risk(answer: str) -> bool:
    """True if `answer` could run code when a scorer evaluates it as Python or through sympy's `parse_expr` (whose
    namespace holds all of sympy and the builtin functions, and whose transformations turn e.g. '3!' into a call, so
    text that is not Python may still run). Anything with '__' is refused. Valid Python is walked with a node whitelist
    (no attributes, lambdas, comprehensions, f-strings, walrus; calls only of `_SAFE_CALLS` by name). Other text, with
    whitespace, backslashes and '#' comments removed, is refused if it calls any name outside `_SAFE_CALLS` or calls
    an expression (')(' ']('). So free text such as 'option (A)' scores 0.0 when it is not valid Python."""
    if "__" in answer:
        return True
    try:
        tree = ast.parse(answer.strip(), mode="eval")
    except Exception:
        tree = None
    if tree is not None:
        for node in ast.walk(tree):
            if not isinstance(node, _SAFE_NODES):
                return True
            if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _SAFE_CALLS):
                return True
        return False
    t = re.sub(r"[\s\\]+", "", re.sub(r"#[^\n]*", "", answer))
    if _EXPR_CALL.search(t):
        return True
    return any(m.group(1) not in _SAFE_CALLS for m in _IDENT_CALL.finditer(t))


def _rg_dataset(cache: dict, name: str, ds_kwargs: tuple):
    key = (name, ds_kwargs)
    if key not in cache:
        import reasoning_gym

        cache[key] = reasoning_gym.create_dataset(name, **dict(ds_kwargs))
    return cache[key]


def _rg_score(cache: dict, name: str, ds_kwargs: tuple, entry: dict, answer: str) -> float:
    score = _finite(_rg_dataset(cache, name, ds_kwargs).score_answer(answer, entry))
    return min(1.0, max(0.0, score))


class ReasoningGymReward:
    """Scores with reasoning-gym's own `dataset.score_answer(answer, entry)`, clipped to [0, 1].

    The batch carries, per completion, either the dataset 'entry' (a dict as returned by `dataset[i]`) or its
    'index' into `reasoning_gym.create_dataset(dataset_name, size=size, seed=seed, **config)`. The answer is
    `extract_answer(completion)`; a missing answer, one over `max_answer_chars`, one that `_code_risk` flags (several
    reasoning-gym scorers call `eval`/`sympy.parse_expr` on the answer), or one the explosive pre-screen flags scores
    0.0, as does any exception. Time per item is bounded as in `MathVerifyReward` (`timeout`, `isolate`)."""

    def __init__(self, dataset_name: str, *, size: int = 500, seed: int = 0, timeout: float = 2.0,
                 isolate: bool = True, max_answer_chars: int = 10_000, prescreen: bool = True, **config):
        self.dataset_name = dataset_name
        self._ds_kwargs = tuple(sorted({"size": size, "seed": seed, **config}.items()))
        self.timeout, self.isolate = float(timeout), isolate
        self.max_answer_chars, self.prescreen = max_answer_chars, prescreen
        self._cache: dict = {}
        self.__name__ = f"reasoning_gym_{dataset_name}"

    @property
    def dataset(self):
        return _rg_dataset(self._cache, self.dataset_name, self._ds_kwargs)

    def warmup(self) -> bool:
        return _worker().warmup() if self.isolate else True

    def score_one(self, answer, entry) -> float:
        if not isinstance(answer, str) or not isinstance(entry, dict) or len(answer) > self.max_answer_chars:
            return 0.0
        if _code_risk(answer) or (self.prescreen and _explosive(answer)):
            return 0.0
        if self.isolate:
            req = ("rg", self.dataset_name, self._ds_kwargs, entry, answer, max(0.05, 0.8 * self.timeout))
            setup = (("rg", self.dataset_name, self._ds_kwargs), ("rg_load", self.dataset_name, self._ds_kwargs))
            r = _worker().request(req, self.timeout, setup=setup)
            return 0.0 if r is None else min(1.0, max(0.0, r))
        try:
            with _soft_timer(self.timeout):
                return _rg_score(self._cache, self.dataset_name, self._ds_kwargs, entry, answer)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            return 0.0

    def __call__(self, completions, entry=None, index=None, **kwargs) -> list[float]:
        return _guarded(self._call)(completions, entry=entry, index=index)

    def _call(self, completions, entry=None, index=None) -> list[float]:
        n = len(completions)
        entries = _column(entry, n)
        indices = _column(index, n)
        out = []
        for c, e, i in zip(completions, entries, indices):
            if e is None and i is not None:
                try:
                    e = self.dataset[int(i)]
                except Exception:
                    e = None
            out.append(self.score_one(extract_answer(c), e))
        return out


# ----------------------------------------------------------------------------------------------------------------
# Length penalty and combination


def soft_overlong_penalty(lengths, max_len: int, cache_len: int) -> list[float]:
    """DAPO eq. 13 per length L: 0 if L <= max_len - cache_len; ((max_len - cache_len) - L) / cache_len in the soft
    band up to max_len (from 0 down to -1); -1 beyond max_len. A non-numeric length gives 0.0."""
    out = []
    for L in _completions(lengths):
        try:
            L = float(L)
            if not math.isfinite(L):
                raise ValueError
        except Exception:
            out.append(0.0)
            continue
        threshold = max_len - cache_len
        if L <= threshold:
            out.append(0.0)
        elif L <= max_len and cache_len > 0:
            out.append((threshold - L) / cache_len)
        else:
            out.append(-1.0)
    return out


class OverlongPenalty:
    """Reward wrapper of `soft_overlong_penalty`: lengths (in tokens) come from the batch field 'completion_lengths',
    else the lengths of 'completion_ids' (TRL passes these); with neither, 0.0."""

    def __init__(self, max_len: int, cache_len: int):
        self.max_len, self.cache_len = int(max_len), int(cache_len)
        self.__name__ = "overlong_penalty"

    def __call__(self, completions, completion_lengths=None, completion_ids=None, **kwargs) -> list[float]:
        return _guarded(self._call)(completions, completion_lengths=completion_lengths, completion_ids=completion_ids)

    def _call(self, completions, completion_lengths=None, completion_ids=None) -> list[float]:
        n = len(completions)
        if completion_lengths is not None:
            lengths = _column(completion_lengths, n)
        elif completion_ids is not None:
            lengths = [len(ids) if _is_seq(ids) else None for ids in _column(completion_ids, n, nested=True)]
        else:
            return [0.0] * n
        return soft_overlong_penalty(lengths, self.max_len, self.cache_len)


def combine(rewards: dict[str, tuple[Callable, float]]) -> Callable[..., tuple[list[float], dict[str, list[float]]]]:
    """`combine({'format': (format_reward, 0.1), 'accuracy': (accuracy_reward, 1.0)})` returns
    `fn(completions, **batch) -> (totals, components)`: `components[name]` holds that reward's unweighted values
    and `totals[i] = sum(weight * components[name][i])`. A component that raises, or returns the wrong number of values
    or non-finite ones, contributes 0.0 for the affected items (logged) instead of failing the batch."""
    items = [(str(name), fn, float(weight)) for name, (fn, weight) in rewards.items()]

    def combined(completions, **batch):
        comps = _completions(completions)
        n = len(comps)
        parts: dict[str, list[float]] = {}
        for name, fn, _ in items:
            try:
                vals = list(fn(comps, **batch))
                if len(vals) != n:
                    raise ValueError(f"returned {len(vals)} values for {n} completions")
                parts[name] = [_finite(v) for v in vals]
            except Exception:
                logger.warning("reward component %r failed; scoring 0.0", name, exc_info=True)
                parts[name] = [0.0] * n
        totals = [sum(w * parts[name][i] for name, _, w in items) for i in range(n)]
        return totals, parts

    combined.__name__ = "combined_reward"
    return combined


# Rewards by name, for experiment configs (`rewards=("format", "accuracy")`). Add entries to register more.
REWARDS = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "arithmetic": arithmetic_reward,
    "countdown": countdown_reward,
    "math_verify": math_verify_reward,
}
