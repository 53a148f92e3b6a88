"""Prompt sources for RL: records with a prompt and a gold answer, drawn in a seeded, resumable order.

Records come from any `train.data` source (synthetic arithmetic, JSONL, Parquet) or a Python list; each is
rendered with the data config's chat template (R1's template for R1-Zero runs).
"""

from __future__ import annotations

import numpy as np

from train.data import DataConfig, load_records, render_prompt

R1_TEMPLATE = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves "
               "it. The assistant first thinks about the reasoning process in the mind and then provides the user "
               "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
               "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
               "<answer> answer here </answer>. User: {prompt}. Assistant:")


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


def encode_prompts(tokenizer, texts: list[str], width: int, bos: bool = True):
    """Right-padded int32 [len(texts), width] and lengths; prompts longer than `width` keep their end."""
    ids = [([tokenizer.bos_id] if bos and tokenizer.bos_id is not None else []) + tokenizer.encode(t) for t in texts]
    ids = [x[-width:] for x in ids]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    out = np.full((len(ids), width), pad, np.int32)
    for i, x in enumerate(ids):
        out[i, :len(x)] = x
    return out, np.asarray([len(x) for x in ids], np.int32)
