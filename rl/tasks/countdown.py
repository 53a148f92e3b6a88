"""Countdown (TinyZero's task): reach a target with + - * / over given numbers, each used once.

Problems come from reasoning-gym's generator (reproducible from a seed, solvable by construction); answers are
scored by our own AST-bounded checker (`rl.rewards.countdown_reward`), never by a scorer that evaluates text.
"""

from __future__ import annotations

from dataclasses import dataclass

from rl.tasks.base import R1_TEMPLATE, Task, register


def countdown_prompts(seed: int, n: int, min_numbers: int = 3, max_numbers: int = 4, max_value: int = 20,
                      min_target: int = 10, max_target: int = 50) -> list[dict]:
    """RL / evaluation prompts {'prompt', 'numbers', 'target', 'difficulty' (how many numbers), 'solution'}:
    reasoning-gym's `countdown` generator (reproducible from `seed`), every problem solvable by construction
    ('solution' is its expression). Score completions with REWARDS['countdown'] (our AST-bounded checker, fields
    'numbers' and 'target'), never with a scorer that evaluates the answer as text (reasoning-gym's own calls sympy's
    `parse_expr`; `ReasoningGymReward('countdown')` therefore scores with our checker on reasoning-gym's scale, and
    the two agree on honest answers: tests/test_tasks.py, tests/test_sandbox.py)."""
    import reasoning_gym
    ds = reasoning_gym.create_dataset("countdown", seed=int(seed), size=int(n), min_numbers=min_numbers,
                                      max_numbers=max_numbers, min_value=1, max_value=max_value,
                                      min_target=min_target, max_target=max_target)
    out = []
    for e in ds:
        nums, target = [int(x) for x in e["metadata"]["numbers"]], int(e["metadata"]["target"])
        out.append({"prompt": f"Using {' '.join(map(str, nums))} once each with + - * /, make {target}.",
                    "numbers": nums, "target": target, "difficulty": len(nums), "solution": e["answer"]})
    return out


@register
@dataclass(frozen=True)
class Countdown(Task):
    """Countdown prompts from `prompt_seed`, held-out problems from `held_out_seed` with any prompt that the first
    `train_prompts` training problems contain removed (the problem space is small). 'difficulty' = how many numbers.
    maj@k votes by value: every valid equation that reaches the target is one answer."""

    name = "countdown"
    template = R1_TEMPLATE
    correctness = "countdown"
    rewards = ("format", "countdown")

    prompt_seed: int = 101
    held_out_seed: int = 2
    train_prompts: int = 2_000
    min_numbers: int = 3
    max_numbers: int = 4
    max_value: int = 20
    min_target: int = 10
    max_target: int = 50

    def __post_init__(self):
        if self.prompt_seed == self.held_out_seed:
            raise ValueError(f"task.prompt_seed: equals task.held_out_seed={self.held_out_seed}")
        if not 2 <= self.min_numbers <= self.max_numbers:
            raise ValueError(f"task.min_numbers: need 2 <= min_numbers <= max_numbers, got {self.min_numbers}, "
                             f"{self.max_numbers}")
        if not 1 <= self.min_target <= self.max_target:
            raise ValueError(f"task.min_target: need 1 <= min_target <= max_target, got {self.min_target}, "
                             f"{self.max_target}")

    def _prompts(self, seed: int, n: int) -> list[dict]:
        return countdown_prompts(seed, n, self.min_numbers, self.max_numbers, self.max_value, self.min_target,
                                 self.max_target)

    def train_records(self, prompts_cfg=None) -> list[dict]:
        return self._prompts(self.prompt_seed, self.train_prompts)

    def held_out(self, n: int) -> list[dict]:
        seen = {r["prompt"] for r in self.train_records()}
        out, size = [], n
        while len(out) < n:
            out = [r for r in self._prompts(self.held_out_seed, size) if r["prompt"] not in seen][:n]
            size *= 2
            if size > 64 * n + 1024:
                raise RuntimeError(f"countdown: only {len(out)} held-out problems outside the training set")
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
