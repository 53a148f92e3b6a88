"""Synthetic arithmetic: 2- or 3-term integer expressions with + - *, answered with worked steps.

    synthetic_example(seed, index)     # {'text', 'prompt', 'response', 'answer'}: the `synthetic` data source's record
    held_out_problems(seed, n)         # held-out problems from a seed stream no training seed reproduces
    Arithmetic()                       # the task: RL prompts from the prompts config's synthetic source
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rl.tasks.base import Task, register

_OPS = "+-*"


def _operand(rng, op):
    return int(rng.integers(0, 13)) if op == "*" else int(rng.integers(0, 100))


def _apply(a, op, b):
    return a + b if op == "+" else a - b if op == "-" else a * b


def synthetic_problem(rng) -> tuple[str, list[str], int]:
    """(expression, reasoning steps, value) of a random 2- or 3-term integer expression with + - *."""
    n = 2 if rng.random() < 0.5 else 3
    ops = [_OPS[int(rng.integers(0, 3))] for _ in range(n - 1)]
    nums = [_operand(rng, ops[0])] + [_operand(rng, op) for op in ops]
    expr = "".join(f"{x}{op}" for x, op in zip(nums, ops)) + str(nums[-1])
    if n == 2:
        v = _apply(nums[0], ops[0], nums[1])
        return expr, [f"{expr}={v}"], v
    a, b, c = nums
    o1, o2 = ops
    if o2 == "*" and o1 != "*":  # precedence: b*c first
        t = b * c
        v = _apply(a, o1, t)
        return expr, [f"{b}*{c}={t}", f"{a}{o1}{t}={v}"], v
    t = _apply(a, o1, b)
    v = _apply(t, o2, c)
    return expr, [f"{a}{o1}{b}={t}", f"{t}{o2}{c}={v}"], v


def synthetic_example(seed: int, index: int) -> dict[str, str]:
    """Record `index` of the synthetic source: deterministic in (seed, index).

    Keys: 'text' (1-8 lines like 'Q: 12+7*3=? A: 33'), 'prompt' ('What is 12+7*3?'),
    'response' ('<think>7*3=21, 12+21=33</think> <answer>33</answer>') and 'answer' ('33').
    """
    rng = np.random.default_rng([int(seed), int(index)])
    lines = []
    for _ in range(int(rng.integers(1, 9))):
        expr, _, v = synthetic_problem(rng)
        lines.append(f"Q: {expr}=? A: {v}")
    expr, steps, v = synthetic_problem(rng)
    return {"text": "\n".join(lines), "prompt": f"What is {expr}?",
            "response": f"<think>{', '.join(steps)}</think> <answer>{v}</answer>", "answer": str(v)}


# Held-out problem i of seed s comes from np.random.default_rng(SeedSequence([s, i], spawn_key=(EVAL_SPAWN_KEY,))).
# Training's synthetic source uses SeedSequence([seed, index]) with no spawn key; a non-empty spawn key is mixed in
# as extra entropy words, so no (s, i) here reproduces any training stream: the draws are independent of training.
EVAL_SPAWN_KEY = 0x5EED_E7A1


def _eval_rng(seed: int, i: int):
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(i)], spawn_key=(EVAL_SPAWN_KEY,)))


def seen_synthetic_prompts(seed: int, size: int = 100_000, text_lines: bool = True) -> set[str]:
    """Expressions (like '12+7*3') that training's synthetic source with this seed and size contains: every record's
    prompt and, with `text_lines`, the 'Q: expr=? A: v' lines of its pretraining text. About 13 s per 100k records."""
    out = set()
    for i in range(int(size)):
        rec = synthetic_example(seed, i)
        out.add(rec["prompt"][len("What is "):-1])
        if text_lines:
            for line in rec["text"].split("\n"):
                out.add(line[len("Q: "):line.index("=?")])
    return out


def held_out_problems(seed: int = 0, n: int = 64, *, exclude: set[str] | frozenset = frozenset(),
                      max_tries: int | None = None) -> list[dict]:
    """n distinct synthetic arithmetic problems {'prompt': 'What is 12+7*3?', 'answer': '33', 'difficulty': 3}.

    Same distribution as `synthetic_problem` (2 or 3 terms, + - *), so 'difficulty' is the number of
    terms (2 or 3). Disjointness from training: problem i is drawn from its own seed stream (`EVAL_SPAWN_KEY`), which
    no training seed reproduces; but the problem space is small (there are only ~20k two-term expressions and
    training's 100k records cover most of them), so independent draws still repeat training problems. Pass
    `exclude=seen_synthetic_prompts(train_seed)` (| other seeds) to reject any expression that training contains;
    then the set is disjoint by content, at the cost of skewing towards 3-term problems.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out, seen = [], set()
    tries = max_tries if max_tries is not None else 1000 * n
    i = 0
    while len(out) < n:
        if i >= tries:
            raise RuntimeError(f"held_out_problems: only {len(out)} of {n} new problems after {tries} draws")
        expr, _, value = synthetic_problem(_eval_rng(seed, i))
        i += 1
        if expr in seen or expr in exclude:
            continue
        seen.add(expr)
        n_terms = sum(ch in "+-*" for ch in expr) + 1
        out.append({"prompt": f"What is {expr}?", "answer": str(value), "difficulty": n_terms})
    return out


@register
@dataclass(frozen=True)
class Arithmetic(Task):
    """Synthetic arithmetic with an integer answer. RL prompts come from the prompts config's source (`synthetic`,
    or files of {'prompt', 'answer'}); held-out problems from `held_out_seed`'s own stream. The default task of an
    RLExperiment: its correctness (integer match of the last <answer>) also fits any integer-answer data set."""

    name = "arithmetic"
    template = "User: {prompt}\nAssistant:"
    correctness = "accuracy"
    rewards = ("format", "accuracy")

    held_out_seed: int = 0

    def held_out(self, n: int) -> list[dict]:
        return held_out_problems(self.held_out_seed, n)
