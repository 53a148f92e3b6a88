"""Prompt sources for RL: records with a prompt and a gold answer, drawn in a seeded, resumable order.

Records come from any `train.data` source (synthetic arithmetic, JSONL, Parquet) or a Python list; each is
rendered with the data config's chat template (R1's template for R1-Zero runs).
"""

from __future__ import annotations

import re

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


# ---- digit chains: a task where written reasoning pays ----------------------------------------------------------
# "3 +5=? -9=? +2=?  (mod 10)": a worksheet of signed digits, summed mod 10. The worked response fills the
# blanks in order, "<think>3 +5=8 -9=9 +2=1</think> <answer>1</answer>"; a direct one is
# "<think></think> <answer>1</answer>". Why this layout (tiny-r1-zero-lessons.md, lesson 1: the written steps
# must be near-perfect or RL learns to stop reasoning):
# - every step is one of 40 facts (a ± d mod 10, d in 1..max_step=2) whose three inputs sit at FIXED distances: the previous
#   running value 5 tokens back, and the op and digit exactly at the matching prompt slot, because the worksheet
#   is right-padded to `max_terms` slots, so prompt slot j and reasoning step j are the same number of tokens
#   apart in every problem (one byte per character, one RoPE offset per input: the easiest thing attention learns);
# - small steps keep each fact learnable by gradient descent: the result is a ±1/±2 neighbour of the running
#   value, so it correlates with each input on its own. With d in 0..9, (a + d) mod 10 is independent of a and
#   of d separately (an XOR-like table): a measured 1.8M-parameter base stayed at chance on it (value tokens 11 %
#   right after 300 steps) while it copied ops and digits perfectly;
# - the direct answer to a k-term chain needs all k-1 steps done silently, which a tiny model cannot do beyond
#   two or three terms, so a base that reasons in some samples has pass@k >> pass@1 on long chains.
# 'difficulty' is the number of terms.

SLOT = 5  # characters per term after the first: " +5=?" in the prompt, " +5=8" in the reasoning


def digit_chain(seed: int, index: int, min_terms: int = 2, max_terms: int = 6, modulus: int = 10,
                max_step: int = 2) -> dict:
    """Record {'prompt', 'answer', 'difficulty' (terms), 'reasoning' (worked response), 'direct' (answer only)}.

    The first term is a digit in [0, modulus); every later one is ±d with d in [1, max_step].
    """
    if not 2 <= min_terms <= max_terms or not 2 <= modulus <= 10 or not 1 <= max_step <= 9:
        raise ValueError(f"digit_chain: need 2 <= min_terms <= max_terms, 2 <= modulus <= 10, 1 <= max_step <= 9; "
                         f"got {min_terms}, {max_terms}, {modulus}, {max_step}")
    rng = np.random.default_rng([seed, index, 10])
    k = int(rng.integers(min_terms, max_terms + 1))
    digits = [int(rng.integers(0, modulus))] + [int(d) for d in rng.integers(1, max_step + 1, k - 1)]
    ops = ["+" if rng.random() < 0.5 else "-" for _ in range(k - 1)]
    value, steps = digits[0], [str(digits[0])]
    for op, d in zip(ops, digits[1:]):
        value = (value + d if op == "+" else value - d) % modulus
        steps.append(f" {op}{d}={value}")
    sheet = str(digits[0]) + "".join(f" {op}{d}=?" for op, d in zip(ops, digits[1:]))
    width = 1 + SLOT * (max_terms - 1)
    return {"prompt": f"{sheet:<{width}} (mod {modulus})", "answer": str(value), "difficulty": k,
            "reasoning": f"<think>{''.join(steps)}</think> <answer>{value}</answer>",
            "direct": f"<think></think> <answer>{value}</answer>"}


def digit_chain_corpus(seed: int, n: int, reason_prob: float, **kw) -> list[dict]:
    """Base-training records {'prompt', 'response'}: the worked response with probability `reason_prob`, else
    the bare answer. r1_zero trains them as kind="sft" (loss on the response only): the prompt's random digits
    cannot be predicted, so their loss carries no signal (a base trained this way learned every step; the
    comparison with whole-document loss was not run cleanly)."""
    rng = np.random.default_rng([seed, 11])
    docs = []
    for i in range(n):
        rec = digit_chain(seed, i, **kw)
        docs.append({"prompt": rec["prompt"],
                     "response": rec["reasoning"] if rng.random() < reason_prob else rec["direct"]})
    return docs


def digit_chain_prompts(seed: int, n: int, **kw) -> list[dict]:
    """RL / evaluation prompts {'prompt', 'answer', 'difficulty'}; use disjoint seeds for train and held-out."""
    return [{k: v for k, v in digit_chain(seed, i, **kw).items() if k in ("prompt", "answer", "difficulty")}
            for i in range(n)]


_STEP = re.compile(r" ([+-])(\d)=(\d)")


def digit_chain_steps(prompt: str, completion: str, max_chars: int = 4096) -> tuple[int, int]:
    """(correct steps, written steps) of a completion's worked reasoning against the prompt's worksheet.

    A written step j is correct iff it restates the prompt's j-th op and digit and its value is the previous
    running value (the first term, then the previous step's value as written) ± that digit mod the modulus —
    so a step is judged on its own, given the model's previous line (lesson 5: track the reasoning path's
    accuracy, not the loss). Only the first <think>…</think> is read; input is cut at `max_chars`.
    """
    m = re.match(r"(\d)((?: [+-]\d=\?)*)\s*\(mod (\d+)\)", prompt)
    if not isinstance(completion, str) or m is None:
        return 0, 0
    modulus, terms = int(m.group(3)), re.findall(r"([+-])(\d)", m.group(2))
    text = completion[:max_chars]
    start, end = text.find("<think>"), text.find("</think>")
    if start < 0 or end < start:
        return 0, 0
    body = text[start + len("<think>"):end]
    if not body.startswith(m.group(1)):
        return 0, len(_STEP.findall(body))
    value, good, written = int(m.group(1)), 0, 0
    for j, (op, d, v) in enumerate(_STEP.findall(body)):
        written += 1
        want = (value + int(d) if op == "+" else value - int(d)) % modulus
        good += j < len(terms) and (op, d) == terms[j] and int(v) == want
        value = int(v)
    return good, written


# ---- Countdown (TinyZero's task), generated by reasoning-gym -------------------------------------------------------

def countdown_prompts(seed: int, n: int, min_numbers: int = 3, max_numbers: int = 4, max_value: int = 20,
                      min_target: int = 10, max_target: int = 50) -> list[dict]:
    """RL / evaluation prompts {'prompt', 'numbers', 'target', 'difficulty' (how many numbers), 'solution'}:
    reasoning-gym's `countdown` generator (reproducible from `seed`), every problem solvable by construction
    ('solution' is its expression). Score completions with REWARDS['countdown'] (our AST-bounded checker, fields
    'numbers' and 'target'), never with a scorer that evaluates the answer as text (reasoning-gym's own calls sympy's
    `parse_expr`; `ReasoningGymReward('countdown')` therefore scores with our checker on reasoning-gym's scale, and
    the two agree on honest answers: tests/test_tasks.py, tests/test_sandbox.py). No pretraining corpus or
    experiment uses Countdown yet."""
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
