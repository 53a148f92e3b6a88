"""Countdown (TinyZero's task): reach a target with + - * / over given numbers, each used once.

Problems come from reasoning-gym's generator (reproducible from a seed, solvable by construction); answers are
scored by our own AST-bounded checker (`rl.rewards.countdown_reward`), never by a scorer that evaluates text.

    task = Countdown()                        # 3 numbers 1-9, targets 1-9 (fields)
    task.corpus()                             # base-training records, `reason_prob` of them a worked search
    task.train_records(); task.held_out(96)   # RL prompts and held-out problems: disjoint problem classes
    task.worked(seed, n)                      # worked searches (cold-start traces)
    countdown_search(numbers, target)         # (search lines, answer) of the canonical search, or None

The worked format (a search a 1.8M-parameter byte-level model can learn; tiny-r1-zero-lessons.md, lesson 1): for the
pairs (a, b | c), (a, c | b), (b, c | a) of the prompt's numbers a b c, larger first, and for each first operation in
the order + - * / (- only between different numbers, / only when it divides), one line writes the pair's value X and
then X with the third number z by what can still reach the target (below it + and *, above it - and /, at it *),
each value written out; a value outside 1-9 is written as '>9' or '<1' and abandoned:

    Make 2 from 7 3 6.
    <think>2: 7+3>9 2: 7-3=4 -6<1 2: 7*3>9 2: 7+6>9 2: 7-6=1 +3=4 *3=3 2: 7*6>9 2: 6+3=9 -7=2</think> <answer>(6+3)-7</answer>

Every value that is not the target is a failed attempt; the search stops at the first that is, and the answer copies
that line. Every written step is one single-token fact about two single digits (their sum, difference, product or
quotient as one digit, or the mark that it leaves 1-9), its operands a few characters back or at fixed offsets in
the prompt (which has a fixed width: a one-digit target and three one-digit numbers). Why so small: a first design
with targets 10-30 and two-digit values (`7*3=21 +3=24`) left a base at 67 % right on single-digit-pair facts and
23 % on two-digit ones after 300 steps, its searches less accurate than its guesses (9 % vs 16 %), and GRPO then
dropped the search (think usage 0.55 -> 0.17), as the lessons predict. The search finds an equation for ~89 % of
problems at targets 1-9 (the rest need a value above 9 on the way). The direct response is
`<think></think> <answer>(6+3)-7</answer>`: the same answer, found silently, a guess on a problem not seen before.
The corpus, the RL prompts and the held-out problems are disjoint classes of problems (numbers as a multiset and the
target, hashed), so neither a direct answer nor an RL prompt can be remembered from the corpus.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import numpy as np

from rl.tasks.base import SHORT_TEMPLATE, Task, register


def countdown_prompts(seed: int, n: int, min_numbers: int = 3, max_numbers: int = 4, max_value: int = 20,
                      min_target: int = 10, max_target: int = 50) -> list[dict]:
    """RL / evaluation prompts {'prompt', 'numbers', 'target', 'difficulty' (how many numbers), 'solution'}:
    reasoning-gym's `countdown` generator (reproducible from `seed`), every problem solvable by construction
    ('solution' is its expression). Score completions with REWARDS['countdown'] (our AST-bounded checker, fields
    'numbers' and 'target'), never with a scorer that evaluates the answer as text (reasoning-gym's own calls sympy's
    `parse_expr`; `ReasoningGymReward('countdown')` therefore scores with our checker on reasoning-gym's scale, and
    the two agree on honest answers: tests/test_tasks.py, tests/test_sandbox.py)."""
    return [dict(r, numbers=list(r["numbers"])) for r in
            _rg_prompts(int(seed), int(n), min_numbers, max_numbers, max_value, min_target, max_target)]


@functools.lru_cache(maxsize=32)
def _rg_prompts(seed, n, min_numbers, max_numbers, max_value, min_target, max_target) -> tuple[dict, ...]:
    # reasoning-gym's generator costs ~1.6 ms a problem (sympy): a corpus is generated once per process
    import reasoning_gym
    ds = reasoning_gym.create_dataset("countdown", seed=int(seed), size=int(n), min_numbers=min_numbers,
                                      max_numbers=max_numbers, min_value=1, max_value=max_value,
                                      min_target=min_target, max_target=max_target)
    out = []
    for e in ds:
        nums, target = [int(x) for x in e["metadata"]["numbers"]], int(e["metadata"]["target"])
        out.append({"prompt": f"Make {target} from {' '.join(map(str, nums))}.",
                    "numbers": tuple(nums), "target": target, "difficulty": len(nums), "solution": e["answer"]})
    return tuple(out)


# ---- the worked search -----------------------------------------------------------------------------------------

FIRST_OPS = "+-*/"  # the pair's operation, in search order
LOW, HIGH = 1, 9  # values the search writes out; others are marked "<1" / ">9" and abandoned


def _apply(x: int, op: str, y: int) -> int:
    return {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]


def _step(x: int, op: str, y: int) -> tuple[int | None, str]:
    """(value, text) of one step 'x op y': '=v' for a value in [LOW, HIGH], else '>9' / '<1' (value None)."""
    v = _apply(x, op, y)
    return (v, f"={v}") if LOW <= v <= HIGH else (None, f">{HIGH}" if v > HIGH else f"<{LOW}")


def countdown_search(numbers, target: int) -> tuple[list[str], str] | None:
    """The canonical search over (x op y) op z for three numbers: (its lines, the answer '(x op y) op z'), or None
    when no equation of that shape whose values stay in [LOW, HIGH] reaches `target` (about 1 problem in 9 at
    targets 1-9). The lines are the worked trace up to and including the line that reaches the target."""
    if len(numbers) != 3:
        raise ValueError(f"countdown_search: the worked search is defined for 3 numbers, got {list(numbers)}")
    a, b, c = (int(v) for v in numbers)
    target = int(target)
    lines = []
    for x, y, z in ((a, b, c), (a, c, b), (b, c, a)):
        x, y = max(x, y), min(x, y)
        for op1 in FIRST_OPS:
            if (op1 == "-" and x == y) or (op1 == "/" and x % y):
                continue  # no zero, no fractions
            value, text = _step(x, op1, y)
            line = f"{target}: {x}{op1}{y}{text}"  # each line restates the target it is compared with
            if value is not None:
                # only what can reach the target: below it + and *, above it - and / (exact), at it * (by 1)
                for op2 in ("+*" if value < target else "-/" if value > target else "*"):
                    if op2 == "/" and value % z:
                        continue
                    result, text = _step(value, op2, z)
                    line += f" {op2}{z}{text}"
                    if result == target:
                        return lines + [line], f"({x}{op1}{y}){op2}{z}"
            lines.append(line)
    return None


def countdown_worked(numbers, target: int) -> str | None:
    """The worked response '<think>lines</think> <answer>(x op y) op z</answer>', or None (no search solution)."""
    found = countdown_search(numbers, target)
    if found is None:
        return None
    lines, answer = found
    return f"<think>{' '.join(lines)}</think> <answer>{answer}</answer>"


def countdown_direct(rec: dict) -> str:
    """The answer-only response: the search's answer (reasoning-gym's solution when the search has none)."""
    found = countdown_search(rec["numbers"], rec["target"]) if len(rec["numbers"]) == 3 else None
    answer = found[1] if found else rec["solution"].replace(" ", "")
    return f"<think></think> <answer>{answer}</answer>"


def problem_class(numbers, target: int, classes: int) -> int:
    """The problem's class in [0, classes): a stable hash of the numbers as a multiset and the target (the same
    problem with its numbers reordered is in the same class)."""
    key = ",".join(map(str, sorted(int(v) for v in numbers))) + f"={int(target)}"
    return zlib.crc32(key.encode()) % classes


STREAM = 1_000_000  # reasoning-gym seeds per task seed (Countdown._prompts)

# classes of problems (problem_class mod Countdown.classes): held-out, RL prompts, corpus (the rest)
HELD_OUT, PROMPTS = 0, 1


@register
@dataclass(frozen=True)
class Countdown(Task):
    """Countdown problems from reasoning-gym's generator, one seed per stream: the base's corpus (`corpus_seed`), the
    RL prompts (`prompt_seed`), the held-out problems (`held_out_seed`). The three streams also hold disjoint classes
    of problems (`problem_class` mod `classes`: 0 held-out, 1 RL prompts, the rest corpus), as the problem space is
    small (~550 multisets-and-targets at 3 numbers 1-9, targets 1-9). 'difficulty' = how many numbers. maj@k votes by value: every
    valid equation that reaches the target is one answer."""

    name = "countdown"
    template = SHORT_TEMPLATE
    correctness = "countdown"
    rewards = ("format", "countdown")

    corpus_seed: int = 1
    prompt_seed: int = 101
    held_out_seed: int = 2
    corpus_docs: int = 20_000  # base-training records, drawn from a pool of
    corpus_pool: int = 2_000  # corpus-class problems
    reason_prob: float = 0.3  # fraction of base records that carry a worked search
    train_prompts: int = 2_000
    classes: int = 4  # problem classes: 0 held-out, 1 RL prompts, 2.. corpus
    min_numbers: int = 3
    max_numbers: int = 3
    max_value: int = 9
    min_target: int = 1
    max_target: int = 9

    def __post_init__(self):
        seeds = {"task.corpus_seed": self.corpus_seed, "task.prompt_seed": self.prompt_seed}
        for name, seed in seeds.items():
            if seed == self.held_out_seed:
                raise ValueError(f"{name}: equals task.held_out_seed={seed}; held-out problems need their own seed")
        if self.corpus_seed == self.prompt_seed:
            raise ValueError(f"task.corpus_seed: equals task.prompt_seed={self.prompt_seed}")
        if not 2 <= self.min_numbers <= self.max_numbers:
            raise ValueError(f"task.min_numbers: need 2 <= min_numbers <= max_numbers, got {self.min_numbers}, "
                             f"{self.max_numbers}")
        if not 1 <= self.min_target <= self.max_target:
            raise ValueError(f"task.min_target: need 1 <= min_target <= max_target, got {self.min_target}, "
                             f"{self.max_target}")
        if not 0.0 <= self.reason_prob <= 1.0:
            raise ValueError(f"task.reason_prob: must be in [0, 1], got {self.reason_prob}")
        if self.classes < 3:
            raise ValueError(f"task.classes: must be >= 3 (held-out, RL prompts, corpus), got {self.classes}")
        for name in ("corpus_docs", "corpus_pool", "train_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name}: must be >= 1, got {getattr(self, name)}")

    def _prompts(self, seed: int, n: int) -> list[dict]:
        # reasoning-gym draws problem i of seed s from Random(s + i): seeds s and s + 1 are the same stream shifted by
        # one problem, so each of our seeds reads its own stretch of a million problems
        return countdown_prompts(STREAM * seed, n, self.min_numbers, self.max_numbers, self.max_value,
                                 self.min_target, self.max_target)

    def _class(self, rec: dict) -> int:
        return problem_class(rec["numbers"], rec["target"], self.classes)

    def _draw(self, seed: int, n: int, keep) -> list[dict]:
        """The first n problems of stream `seed` whose class passes `keep`, each with its gold 'answer'."""
        share = max(sum(map(keep, range(self.classes))), 1) / self.classes  # classes are about equally likely
        out, size = [], int(n / share * 1.3) + 16
        while True:
            out = [r for r in self._prompts(seed, size) if keep(self._class(r))][:n]
            if len(out) == n:
                break
            if size > 64 * n + 1024:
                raise RuntimeError(f"countdown: only {len(out)} problems of the wanted class in stream {seed}")
            size *= 2
        for r in out:
            r["answer"] = countdown_direct(r)[len("<think></think> <answer>"):-len("</answer>")]
        return out

    def train_records(self, prompts_cfg=None) -> list[dict]:
        return self._draw(self.prompt_seed, self.train_prompts, lambda c: c == PROMPTS)

    def held_out(self, n: int) -> list[dict]:
        return self._draw(self.held_out_seed, n, lambda c: c == HELD_OUT)

    def corpus(self) -> list[dict]:
        """Base-training records {'prompt', 'response'}: `corpus_docs` draws (with replacement) from the first
        `corpus_pool` corpus-class problems of stream `corpus_seed` (reasoning-gym's generator costs ~2 ms a problem
        and the problem space is small: the pool holds most of it), each the worked search with probability
        `reason_prob`, else the answer alone (also when the search finds no equation: rare)."""
        pool = self._draw(self.corpus_seed, self.corpus_pool, lambda c: c > PROMPTS)
        worked = [countdown_worked(r["numbers"], r["target"]) if len(r["numbers"]) == 3 else None for r in pool]
        rng = np.random.default_rng([self.corpus_seed, 11])
        docs = []
        for i, use in zip(rng.integers(0, len(pool), self.corpus_docs), rng.random(self.corpus_docs)):
            response = worked[i] if use < self.reason_prob and worked[i] else countdown_direct(pool[i])
            docs.append({"prompt": pool[i]["prompt"], "response": response})
        return docs

    def worked(self, seed: int, n: int) -> list[dict]:
        """n worked records {'prompt', 'numbers', 'target', 'answer', 'difficulty', 'response'} from stream `seed`
        (cold-start traces): corpus-class problems the search solves, never held-out ones."""
        out, size = [], n + n // 8 + 4  # the search solves ~99.8 % of problems
        while len(out) < n:
            out = []
            for r in self._draw(seed, size, lambda c: c > PROMPTS):
                resp = countdown_worked(r["numbers"], r["target"])
                if resp is not None:
                    out.append({**{k: r[k] for k in ("prompt", "numbers", "target", "answer", "difficulty")},
                                "response": resp})
            out = out[:n]
            size *= 2
        return out

    def vote_key(self, answer, record: dict) -> str | None:
        from rl.evaluate import normalize_answer
        from rl.rewards import countdown_reward
        key = normalize_answer(answer)
        if key is None:
            return None
        ok = countdown_reward([f"<answer>{key}</answer>"], numbers=[record.get("numbers")],
                              target=[record.get("target")])[0]
        return f"={record.get('target')}" if ok >= 1.0 else key
