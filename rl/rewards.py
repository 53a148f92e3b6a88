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
text, adversarial nesting) gives 0.0, never an exception. math-verify (sympy), reasoning-gym and your own scorers
(`SandboxedReward`) run only in the sandboxed worker process of `rl.sandbox`: sealed by an audit hook that refuses
code execution, writes, imports, processes and sockets, with limits on memory, CPU, file size, open files and
processes, a wall-clock deadline per item and a budget per batch. Countdown and arithmetic are scored by our own AST
evaluator, never by a scorer that evaluates text.

Layout: input coercion and `extract_answer` live in `rl.reward_inputs`, the worker process and time bounds in
`rl.sandbox` (its policy in `rl.sandbox_policy`, the code screen in `rl.code_screen`), the sandboxed verifiers in
`rl.verifiers`; their public names are re-exported here.

Contents:
- `extract_answer(text)`: the stripped content of the last `<answer>...</answer>` (None if absent).
- `format_reward`, `accuracy_reward` (integer match), `arithmetic_reward` (answer may be an expression),
  `countdown_reward` (TinyZero), `math_verify_reward` / `MathVerifyReward`, `ReasoningGymReward`, `SandboxedReward`.
- `soft_overlong_penalty(lengths, max_len, cache_len)` (DAPO eq. 13) and the reward `OverlongPenalty`.
- `RandomReward(rate, seed)`: the random-reward control; `resolve_reward(name, seed)` reads config names ('random:0.3').
- `combine({name: (fn, weight)})` -> fn returning (totals, {name: per-completion values}).
"""

from __future__ import annotations

import logging
import math
import numbers as _numbers
import re
from collections.abc import Callable
from fractions import Fraction

import numpy as np

from rl.reward_inputs import (
    ANSWER_WINDOW, SandboxError, _column, _completions, _finite, _guarded, _is_seq, _text, extract_answer)
from rl.safe_eval import numbers_used, safe_eval
from rl.verifiers import MathVerifyReward, ReasoningGymReward, SandboxedReward, math_verify_reward

__all__ = [
    "ANSWER_WINDOW",
    "MathVerifyReward",
    "OverlongPenalty",
    "RandomReward",
    "ReasoningGymReward",
    "SandboxError",
    "SandboxedReward",
    "accuracy_reward",
    "arithmetic_reward",
    "combine",
    "countdown_reward",
    "extract_answer",
    "format_reward",
    "math_verify_reward",
    "resolve_reward",
    "soft_overlong_penalty",
]

logger = logging.getLogger(__name__)

_TRAILING_TOKENS = ("<eos>", "<pad>", "</s>", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>")


# ----------------------------------------------------------------------------------------------------------------
# Format


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
            except SandboxError:
                raise
            except Exception:
                logger.warning("reward component %r failed; scoring 0.0", name, exc_info=True)
                parts[name] = [0.0] * n
        totals = [sum(w * parts[name][i] for name, _, w in items) for i in range(n)]
        return totals, parts

    combined.__name__ = "combined_reward"
    return combined


class RandomReward:
    """The random-reward control (Spurious Rewards, Shao et al. 2025): 1.0 with probability `rate`, else 0.0, drawn
    independently for every completion from its own stream (`seed`), whatever the completion says. It carries no
    information about correctness, so any gain a policy makes under it comes from the optimiser (clipping, length
    bias), not from the task. Configs name it 'random:<rate>' (`resolve_reward`)."""

    def __init__(self, rate: float = 0.5, seed: int = 0):
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"random reward: rate must be in [0, 1], got {rate}")
        self.rate, self._rng = float(rate), np.random.default_rng([int(seed), 7919])
        self.__name__ = "random"

    def __call__(self, completions, **kwargs) -> list[float]:
        n = len(_completions(completions))
        return [float(x) for x in (self._rng.random(n) < self.rate)]


def resolve_reward(name: str, seed: int = 0) -> tuple[str, Callable]:
    """(metric name, reward fn) for a config's reward name: a key of REWARDS, or a parametrised one,
    'random:<rate>' (`RandomReward(rate, seed)`; 'random' alone is rate 0.5). Unknown names fail listing the known."""
    base, _, arg = str(name).partition(":")
    if base == "random":
        try:
            rate = float(arg) if arg else 0.5
        except ValueError:
            raise ValueError(f"rewards: {name!r}: the random reward's rate must be a number ('random:0.3')") from None
        return "random", RandomReward(rate, seed)
    if name not in REWARDS or arg:
        raise ValueError(f"rewards: unknown {name!r}; known: {sorted(REWARDS)} and 'random:<rate>'")
    return name, REWARDS[name]


# Rewards by name, for experiment configs (`rewards=("format", "accuracy")`). Add entries to register more.
REWARDS = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "arithmetic": arithmetic_reward,
    "countdown": countdown_reward,
    "math_verify": math_verify_reward,
}
