"""Library-backed verifiers: math-verify (`MathVerifyReward`, `math_verify_reward`) and reasoning-gym
(`ReasoningGymReward`, with the `_code_risk` screen for scorers that evaluate the answer as Python).

Both score untrusted answers with third-party code that can run arbitrarily long, so each item is bounded by `timeout`
seconds of wall clock: by default in the isolated worker process of `rl.sandbox`, or in-process under its SIGALRM timer
(`isolate=False`). Answers over a size cap or flagged by the explosive pre-screen score 0.0 without being parsed.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from typing import Any

from rl.reward_inputs import _column, _finite, _guarded, extract_answer
from rl.sandbox import _explosive, _soft_timer, _worker

__all__ = ["MathVerifyReward", "ReasoningGymReward", "math_verify_reward"]


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

