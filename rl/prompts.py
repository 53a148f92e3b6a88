"""RL prompts in a seeded, resumable order: records with a prompt and a gold answer, rendered with a chat template.

Records come from any `train.data` source (synthetic arithmetic, JSONL, Parquet) or a Python list (a task's
`train_records()`); each is rendered with the data config's chat template.
"""

from __future__ import annotations

import numpy as np

from train.data import DataConfig, load_records, render_prompt


class PromptSource:
    """Yields lists of records {'prompt_text', 'answer', ...} in a seeded permutation, epoch after epoch."""

    def __init__(self, cfg: DataConfig, records=None, seed: int = 0, limit: int | None = None):
        self.cfg, self.seed = cfg, seed
        self.records = load_records(cfg, records)
        self.n = len(self.records) if limit is None else min(limit, len(self.records))
        if self.n == 0:
            raise ValueError("the prompt source has no records")
        self.epoch, self.index = 0, 0

    def _order(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def take(self, k: int) -> list[dict]:
        out, order = [], self._order()
        for _ in range(k):
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order()
            rec = dict(self.records[int(order[self.index])])
            rec["prompt_text"] = render_prompt(self.cfg, rec[self.cfg.prompt_field])
            out.append(rec)
            self.index += 1
        return out

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
