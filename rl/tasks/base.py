"""What a task is: its records, its held-out split, its prompt template, its answer check and its rewards.

    task = get_task("digit_chain")                # or DigitChain(max_terms=8): tasks are frozen dataclasses
    task.train_records(prompts_cfg)               # RL prompts [{'prompt', 'answer', ...}] (None: prompts_cfg's source)
    task.held_out(96)                             # held-out problems, disjoint from training by construction
    task.splits(96)                               # {split name: held-out problems}: 'in_distribution' (+ 'hard')
    task.correct(completions, records)            # [bool]: the task's correctness (pass@k, maj@k, `accuracy`)
    task.vote_key(answer, record)                 # maj@k's equivalence class of an extracted answer

A task's instance fields (seeds, sizes, generator knobs) are part of the experiment config, so they print in
config.json and override from the command line (`task.max_terms=8`). Its class attributes are what the task is:
`template` (the chat template its prompts are rendered with), `prompt_field`, `correctness` (the name in
`rl.rewards.REWARDS` of the reward that judges a completion correct; the GRPO loop logs it as `accuracy`, evaluation
scores pass@k and maj@k with it) and `rewards` (the rewards an R1-Zero run of the task trains with).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

R1_TEMPLATE = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves "
               "it. The assistant first thinks about the reasoning process in the mind and then provides the user "
               "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
               "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
               "<answer> answer here </answer>. User: {prompt}. Assistant:")

# R1's template without its instruction preamble (~400 byte-level tokens a prompt for a tiny model); the tags are
# taught by the base's corpus instead
SHORT_TEMPLATE = "User: {prompt} Assistant:"


@dataclass(frozen=True)
class Task:
    """Base class; subclasses set the class attributes and implement `held_out` (and `train_records` when their
    prompts are generated rather than read from the prompts config's source)."""

    name: ClassVar[str] = "task"
    template: ClassVar[str] = R1_TEMPLATE
    prompt_field: ClassVar[str] = "prompt"
    correctness: ClassVar[str] = "accuracy"
    rewards: ClassVar[tuple[str, ...]] = ("format", "accuracy")

    # ---- records ------------------------------------------------------------------------------------------------
    def train_records(self, prompts_cfg=None) -> list[dict] | None:
        """RL prompts with their gold answers, or None when `prompts_cfg`'s own source (synthetic, files) has them."""
        return None

    def held_out(self, n: int) -> list[dict]:
        """The first n held-out problems ({prompt_field, 'answer', ...}; 'difficulty' when the task grades them)."""
        raise NotImplementedError(f"task {self.name!r} has no held-out split")

    def splits(self, n: int) -> dict[str, list[dict]]:
        """Every held-out split, n problems each: 'in_distribution' (`held_out`), plus any harder split a task adds."""
        return {"in_distribution": self.held_out(n)}

    def corpus(self) -> list[dict] | None:
        """Base-training records for a base stage whose data source is 'memory'; None when the task has none."""
        return None

    # ---- judging ------------------------------------------------------------------------------------------------
    def fields(self, records: Sequence[dict]) -> dict[str, list]:
        """The reward keyword arguments of `records` (every field, by name, one entry per record)."""
        keys = sorted({k for r in records for k in r})
        return {k: [r.get(k) for r in records] for k in keys}

    def correct(self, completions: Sequence[str], records: Sequence[dict]) -> np.ndarray:
        """[n] bool: completion i is a correct answer to records[i] (the `correctness` reward gives >= 1)."""
        from rl.rewards import REWARDS
        scores = REWARDS[self.correctness](list(completions), **self.fields(records))
        return np.asarray([s >= 1.0 for s in scores], bool)

    def vote_key(self, answer, record: dict) -> str | None:
        """The equivalence class of an extracted answer for maj@k (None: no vote). Default: integers as the accuracy
        reward reads them ('+3', '3.0', '1,000' -> '3', '3', '1000'), anything else stripped."""
        from rl.evaluate import normalize_answer
        return normalize_answer(answer)


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def get_task(task: Task | str) -> Task:
    """A Task instance from an instance or a registered name (an unknown name fails listing the known ones)."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"task: unknown {task!r}; known: {sorted(TASKS)}")
    return TASKS[task]()
