"""Library-backed verifiers: math-verify (`MathVerifyReward`, `math_verify_reward`), reasoning-gym
(`ReasoningGymReward`) and any scorer of your own (`SandboxedReward`).

All of them score untrusted answers with code that can run arbitrarily long or evaluate the answer as a program, so
they score only inside the sandboxed worker process of `rl.sandbox` (an audit hook refuses code execution, writes,
imports, processes and sockets; resource limits bound memory and CPU). Answers over a size cap, flagged by the
explosive pre-screen or by `rl.code_screen.code_risk` score 0.0 without being sent. Each item is bounded by `timeout`
seconds of wall clock (the worker is killed and restarted past it) and each call by `batch_timeout` (the items left
when it runs out score 0.0). Identical (answer, gold) pairs in one call are scored once.

Countdown and 24-game answers are arithmetic: reasoning-gym scores them with sympy's `parse_expr`, we score them with
our own AST evaluator (`rl.safe_eval`), on reasoning-gym's own scale (1.0 solved, 0.05 / 0.01 otherwise).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from rl.code_screen import code_risk
from rl.reward_inputs import _column, _finite, _guarded, extract_answer
from rl.sandbox import _explosive, _worker

__all__ = ["MathVerifyReward", "ReasoningGymReward", "SandboxedReward", "TESTED_TASKS", "math_verify_reward"]

logger = logging.getLogger(__name__)

# reasoning-gym tasks covered by the hostile-answer tests (tests/test_sandbox.py): one per kind of scorer (string
# compare, `eval` of the answer, sympy `parse_expr`, our own arithmetic). Any other task name works the same way.
TESTED_TASKS = ("basic_arithmetic", "chain_sum", "string_insertion", "spiral_matrix", "simple_integration",
                "polynomial_multiplication", "countdown", "puzzle24")


def _mv_score(gold: str, pred: str) -> float:
    """math-verify `verify(parse(gold), parse(pred))` with its own signal timeouts off (the caller bounds time)."""
    from math_verify import parse, verify

    g = parse(gold, parsing_timeout=None)
    p = parse(pred, parsing_timeout=None)
    if not g or not p:
        return 0.0
    return 1.0 if verify(g, p, timeout_seconds=None) else 0.0


class _Budget:
    """The per-batch time budget: `item(timeout)` is the wall clock the next item may use, 0 once it is spent."""

    def __init__(self, seconds: float | None, name: str):
        self.deadline = None if seconds is None else time.monotonic() + float(seconds)
        self.name, self.skipped = name, 0

    def item(self, timeout: float) -> float:
        if self.deadline is None:
            return timeout
        left = self.deadline - time.monotonic()
        if left <= 0.05:
            self.skipped += 1
            return 0.0
        return min(timeout, left)

    def report(self) -> None:
        if self.skipped:
            logger.warning("%s: batch budget spent, %d items scored 0.0 unscored", self.name, self.skipped)


class _SandboxedScorer:
    """Shared by the verifiers: the worker round trip with the per-item and per-batch budgets and a per-call cache."""

    def __init__(self, timeout: float, batch_timeout: float | None, name: str):
        self.timeout = float(timeout)
        self.batch_timeout = None if batch_timeout is None else float(batch_timeout)
        self.__name__ = name

    def warmup(self) -> bool:
        """Start (and seal) the worker ahead of the first call. Raises `SandboxError` if it cannot be sealed."""
        return _worker().warmup()

    def _ask(self, op: tuple, budget: _Budget, cache: dict, key) -> float:
        if key in cache:
            return cache[key]
        timeout = budget.item(self.timeout)
        if timeout <= 0:
            return 0.0
        r = _worker().request(op + (max(0.05, 0.8 * timeout),), timeout)
        cache[key] = 0.0 if r is None else r
        return cache[key]


class MathVerifyReward(_SandboxedScorer):
    """1.0 iff math-verify judges the extracted answer equal to the gold `answer` (`verify(parse(gold),
    parse(pred))`; order matters); 0.0 otherwise, for a missing answer, one over `max_chars` characters, one the
    `prescreen` flags as explosive (power towers, huge exponents/factorials), or any failure. Scored in the sandbox,
    `timeout` s per item, `batch_timeout` s per call."""

    def __init__(self, timeout: float = 2.0, *, batch_timeout: float | None = 60.0, max_chars: int = 2000,
                 prescreen: bool = True, extract: Callable[[Any], str | None] = extract_answer):
        super().__init__(timeout, batch_timeout, "math_verify_reward")
        self.max_chars, self.prescreen, self.extract = max_chars, prescreen, extract

    def score_one(self, pred, gold, budget: _Budget | None = None, cache: dict | None = None) -> float:
        if not isinstance(pred, str) or gold is None or len(pred) > self.max_chars or not pred.strip():
            return 0.0
        gold = gold if isinstance(gold, str) else str(gold)
        if len(gold) > 100_000 or (self.prescreen and _explosive(pred)):
            return 0.0
        budget = budget or _Budget(self.batch_timeout, self.__name__)
        return self._ask(("mv", gold, pred), budget, {} if cache is None else cache, (gold, pred))

    def __call__(self, completions, answer=None, **kwargs) -> list[float]:
        return _guarded(self._call)(completions, answer=answer)

    def _call(self, completions, answer=None) -> list[float]:
        golds = _column(answer, len(completions))
        budget, cache = _Budget(self.batch_timeout, self.__name__), {}
        out = [self.score_one(self.extract(c), g, budget, cache) for c, g in zip(completions, golds)]
        budget.report()
        return out


math_verify_reward = MathVerifyReward()


# ----------------------------------------------------------------------------------------------------------------
# reasoning-gym


def _rg_dataset(cache: dict, name: str, ds_kwargs: tuple):
    key = (name, ds_kwargs)
    if key not in cache:
        import reasoning_gym

        cache[key] = reasoning_gym.create_dataset(name, **dict(ds_kwargs))
    return cache[key]


def _rg_score(cache: dict, name: str, ds_kwargs: tuple, entry: dict, answer: str) -> float:
    score = _finite(_rg_dataset(cache, name, ds_kwargs).score_answer(answer, entry))
    return min(1.0, max(0.0, score))


def _own_countdown(answer: str, entry: dict) -> float:
    """reasoning-gym's countdown scale with our checker: 1.0 solved, 0.05 an answer that is not, 0.01 none."""
    from rl.rewards import _countdown_ok

    if not answer or not answer.strip():
        return 0.01
    meta = entry.get("metadata") or {}
    return 1.0 if _countdown_ok(answer, meta.get("numbers"), meta.get("target")) else 0.05


def _own_puzzle24(answer: str, entry: dict) -> float:
    """reasoning-gym's 24-game scale with our checker: 1.0 iff the four given numbers make 24, else 0.01."""
    from rl.rewards import _countdown_ok

    meta = entry.get("metadata") or {}
    return 1.0 if answer and _countdown_ok(answer, meta.get("numbers"), 24) else 0.01


_OWN_SCORERS: dict[str, Callable[[str, dict], float]] = {"countdown": _own_countdown, "puzzle24": _own_puzzle24}


class ReasoningGymReward(_SandboxedScorer):
    """Scores with reasoning-gym's own `dataset.score_answer(answer, entry)` in the sandbox, clipped to [0, 1]
    (Countdown and the 24 game with our own arithmetic checker instead, in-process).

    The batch carries, per completion, either the dataset 'entry' (a dict as returned by `dataset[i]`) or its
    'index' into `reasoning_gym.create_dataset(dataset_name, size=size, seed=seed, **config)`. The answer is
    `extract_answer(completion)`; a missing answer, one over `max_answer_chars`, one that `code_risk` flags, or one the
    explosive pre-screen flags scores 0.0, as does any exception. The dataset is registered with the worker at
    construction (a sealed worker imports nothing, so a new dataset restarts it once)."""

    def __init__(self, dataset_name: str, *, size: int = 500, seed: int = 0, timeout: float = 2.0,
                 batch_timeout: float | None = 60.0, max_answer_chars: int = 10_000, prescreen: bool = True,
                 **config):
        super().__init__(timeout, batch_timeout, f"reasoning_gym_{dataset_name}")
        self.dataset_name = dataset_name
        self._ds_kwargs = tuple(sorted({"size": size, "seed": seed, **config}.items()))
        self.max_answer_chars, self.prescreen = max_answer_chars, prescreen
        self._own = _OWN_SCORERS.get(dataset_name)
        self._cache: dict = {}
        if self._own is None:
            _worker().register("datasets", (dataset_name, self._ds_kwargs))

    @property
    def dataset(self):
        return _rg_dataset(self._cache, self.dataset_name, self._ds_kwargs)

    def warmup(self) -> bool:
        return True if self._own is not None else super().warmup()

    def score_one(self, answer, entry, budget: _Budget | None = None, cache: dict | None = None) -> float:
        if not isinstance(answer, str) or not isinstance(entry, dict) or len(answer) > self.max_answer_chars:
            return 0.0
        if self._own is not None:
            return min(1.0, max(0.0, _finite(self._own(answer, entry))))
        if code_risk(answer) or (self.prescreen and _explosive(answer)):
            return 0.0
        budget = budget or _Budget(self.batch_timeout, self.__name__)
        key = (answer, repr(entry)[:100_000])
        return self._ask(("rg", self.dataset_name, self._ds_kwargs, entry, answer), budget,
                         {} if cache is None else cache, key)

    def __call__(self, completions, entry=None, index=None, **kwargs) -> list[float]:
        return _guarded(self._call)(completions, entry=entry, index=index)

    def _call(self, completions, entry=None, index=None) -> list[float]:
        n = len(completions)
        budget, cache, out = _Budget(self.batch_timeout, self.__name__), {}, []
        for c, e, i in zip(completions, _column(entry, n), _column(index, n)):
            if e is None and i is not None:
                try:
                    e = self.dataset[int(i)]
                except Exception:
                    e = None
            out.append(self.score_one(extract_answer(c), e, budget, cache))
        budget.report()
        return out


class SandboxedReward(_SandboxedScorer):
    """Your own scorer, run in the sandbox: `SandboxedReward('my_pkg.scoring:score', fields=('answer',))` calls
    `score(extracted_answer, *[batch[f][i] for f in fields]) -> float` inside the sealed worker, with the same bounds
    as the other verifiers. The module is imported before the worker seals (registering it restarts a running worker
    once); field values must be picklable. Answers that `code_risk` flags are still sent: the hook is what guards them
    here (set `screen=True` to refuse them before sending)."""

    def __init__(self, target: str, *, fields: tuple[str, ...] = ("answer",), timeout: float = 2.0,
                 batch_timeout: float | None = 60.0, max_answer_chars: int = 10_000, screen: bool = False,
                 extract: Callable[[Any], str | None] = extract_answer):
        module, sep, fn = target.partition(":")
        if not sep or not module or not fn.isidentifier():
            raise ValueError(f"SandboxedReward target must be 'module:function', got {target!r}")
        super().__init__(timeout, batch_timeout, f"sandboxed_{fn}")
        self.target, self.fields, self.extract = target, tuple(fields), extract
        self.max_answer_chars, self.screen = max_answer_chars, screen
        _worker().register("modules", module)

    def __call__(self, completions, **batch) -> list[float]:
        return _guarded(self._call)(completions, **batch)

    def _call(self, completions, **batch) -> list[float]:
        n = len(completions)
        columns = [_column(batch.get(f), n) for f in self.fields]
        budget, cache, out = _Budget(self.batch_timeout, self.__name__), {}, []
        for i, c in enumerate(completions):
            answer = self.extract(c)
            too_long = not isinstance(answer, str) or len(answer) > self.max_answer_chars
            if too_long or (self.screen and code_risk(answer)):
                out.append(0.0)
                continue
            args = (answer,) + tuple(col[i] for col in columns)
            out.append(self._ask(("call", self.target, args), budget, cache, repr(args)[:100_000]))
        budget.report()
        return out
