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


# ---- digit chains: a task where written reasoning pays ----------------------------------------------------------
# "What is 3+5-9+2 mod 10?" Each written step (one digit op mod 10) is one of 200 facts, learnable to ~100 %
# by a tiny model; the direct answer to a k-term chain needs all k-1 steps done silently, which a tiny
# model cannot, so its guesses sit near chance (10 %). A base that reasons in some of its samples has
# pass@k >> pass@1 on long chains: exactly what R1-Zero-style RL can sharpen (tiny-r1-zero-lessons.md).

def digit_chain(seed: int, index: int, min_terms: int = 2, max_terms: int = 6) -> dict:
    """Record {'prompt', 'answer', 'difficulty' (terms), 'reasoning' (the worked response), 'direct'}."""
    rng = np.random.default_rng([seed, index, 10])
    k = int(rng.integers(min_terms, max_terms + 1))
    digits = [int(d) for d in rng.integers(0, 10, k)]
    ops = ["+" if rng.random() < 0.5 else "-" for _ in range(k - 1)]
    value, steps = digits[0], []
    for op, d in zip(ops, digits[1:]):
        new = (value + d if op == "+" else value - d) % 10
        steps.append(f"{value}{op}{d}={new}")
        value = new
    expr = str(digits[0]) + "".join(f"{op}{d}" for op, d in zip(ops, digits[1:]))
    return {"prompt": f"What is {expr} mod 10?", "answer": str(value), "difficulty": k,
            "reasoning": f"<think>{' '.join(steps)}</think> <answer>{value}</answer>",
            "direct": f"<think></think> <answer>{value}</answer>"}


def digit_chain_corpus(seed: int, n: int, reason_prob: float, template: str, **kw) -> list[dict]:
    """Pretraining documents: the chat-formatted problem with a worked (prob `reason_prob`) or bare answer."""
    rng = np.random.default_rng([seed, 11])
    docs = []
    for i in range(n):
        rec = digit_chain(seed, i, **kw)
        response = rec["reasoning"] if rng.random() < reason_prob else rec["direct"]
        docs.append({"text": template.format(prompt=rec["prompt"]) + " " + response})
    return docs


def digit_chain_prompts(seed: int, n: int, **kw) -> list[dict]:
    """RL / evaluation prompts {'prompt', 'answer', 'difficulty'}; use disjoint seeds for train and held-out."""
    return [{k: v for k, v in digit_chain(seed, i, **kw).items() if k in ("prompt", "answer", "difficulty")}
            for i in range(n)]
