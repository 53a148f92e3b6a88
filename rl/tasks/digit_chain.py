"""Digit chains: a task where written reasoning pays (the R1-Zero task at laptop scale).

    task = DigitChain()                       # fields: seeds, sizes, chain lengths and step sizes
    task.corpus()                             # base-training records, `reason_prob` of them worked
    task.train_records()                      # RL prompts; task.held_out(96): held-out problems
    digit_chain_steps(prompt, completion)     # (correct, written) reasoning steps
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from rl.tasks.base import SHORT_TEMPLATE, Task, register

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
                max_step: int = 2, slots: int = 0) -> dict:
    """Record {'prompt', 'answer', 'difficulty' (terms), 'reasoning' (worked response), 'direct' (answer only)}.

    The first term is a digit in [0, modulus); every later one is ±d with d in [1, max_step]. The worksheet is
    right-padded to `slots` terms (0: max_terms), so that longer chains can be posed in the same layout.
    """
    slots = slots or max_terms
    if not 2 <= min_terms <= max_terms <= slots or not 2 <= modulus <= 10 or not 1 <= max_step <= 9:
        raise ValueError(f"digit_chain: need 2 <= min_terms <= max_terms <= slots, 2 <= modulus <= 10, "
                         f"1 <= max_step <= 9; got {min_terms}, {max_terms}, {slots}, {modulus}, {max_step}")
    rng = np.random.default_rng([seed, index, 10])
    k = int(rng.integers(min_terms, max_terms + 1))
    digits = [int(rng.integers(0, modulus))] + [int(d) for d in rng.integers(1, max_step + 1, k - 1)]
    ops = ["+" if rng.random() < 0.5 else "-" for _ in range(k - 1)]
    value, steps = digits[0], [str(digits[0])]
    for op, d in zip(ops, digits[1:]):
        value = (value + d if op == "+" else value - d) % modulus
        steps.append(f" {op}{d}={value}")
    sheet = str(digits[0]) + "".join(f" {op}{d}=?" for op, d in zip(ops, digits[1:]))
    width = 1 + SLOT * (slots - 1)
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


@register
@dataclass(frozen=True)
class DigitChain(Task):
    """Digit-chain worksheets (`digit_chain`). Seeds are disjoint streams: the base's corpus (`corpus_seed`), the RL
    prompts (`prompt_seed`), the held-out problems (`held_out_seed`, `hard_seed`); 'difficulty' is the number of terms.

    Splits: 'in_distribution' (min_terms..max_terms terms, as trained) and, when the worksheet has more `slots` than
    `max_terms`, 'hard': chains of max_terms + 1..slots terms, longer than any problem the corpus or the RL prompts
    hold, posed in the same padded layout (length generalisation: every step is a known fact, but the model never
    wrote a chain this long)."""

    name = "digit_chain"
    template = SHORT_TEMPLATE
    correctness = "accuracy"
    rewards = ("format", "accuracy")

    corpus_seed: int = 1
    prompt_seed: int = 101
    held_out_seed: int = 2
    corpus_docs: int = 60_000  # base-training records
    reason_prob: float = 0.3  # fraction of base records that carry worked reasoning
    train_prompts: int = 20_000
    min_terms: int = 2
    max_terms: int = 6
    max_step: int = 2
    modulus: int = 10
    slots: int = 0  # worksheet width in terms (0: max_terms); more slots than max_terms opens the 'hard' split
    hard_seed: int = 3

    def __post_init__(self):
        seeds = {"task.corpus_seed": self.corpus_seed, "task.prompt_seed": self.prompt_seed,
                 "task.hard_seed": self.hard_seed}
        for name, seed in seeds.items():
            if seed == self.held_out_seed:
                raise ValueError(f"{name}: equals task.held_out_seed={seed}; held-out problems need their own seed")
        if self.hard_seed in (self.corpus_seed, self.prompt_seed):
            raise ValueError(f"task.hard_seed: {self.hard_seed} is also a training seed")
        if self.slots and self.slots < self.max_terms:
            raise ValueError(f"task.slots: must be 0 or >= task.max_terms={self.max_terms}, got {self.slots}")
        if not 0.0 <= self.reason_prob <= 1.0:
            raise ValueError(f"task.reason_prob: must be in [0, 1], got {self.reason_prob}")
        for name in ("corpus_docs", "train_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name}: must be >= 1, got {getattr(self, name)}")
        digit_chain(0, 0, **self.shape)  # validates the generator's knobs (the error names them)

    @property
    def shape(self) -> dict:
        return {"min_terms": self.min_terms, "max_terms": self.max_terms, "modulus": self.modulus,
                "max_step": self.max_step, "slots": self.slots}

    def corpus(self) -> list[dict]:
        return digit_chain_corpus(self.corpus_seed, self.corpus_docs, self.reason_prob, **self.shape)

    def train_records(self, prompts_cfg=None) -> list[dict]:
        return digit_chain_prompts(self.prompt_seed, self.train_prompts, **self.shape)

    def held_out(self, n: int) -> list[dict]:
        return digit_chain_prompts(self.held_out_seed, n, **self.shape)

    def hard(self, n: int) -> list[dict]:
        """n problems of max_terms + 1..slots terms in the same layout (ValueError when slots <= max_terms)."""
        if self.slots <= self.max_terms:
            raise ValueError(f"task.slots: the hard split needs more slots than task.max_terms={self.max_terms}, "
                             f"got {self.slots}")
        shape = {**self.shape, "min_terms": self.max_terms + 1, "max_terms": self.slots}
        return digit_chain_prompts(self.hard_seed, n, **shape)

    def splits(self, n: int) -> dict[str, list[dict]]:
        out = {"in_distribution": self.held_out(n)}
        if self.slots > self.max_terms:
            out["hard"] = self.hard(n)
        return out

    def worked(self, seed: int, n: int) -> list[dict]:
        """n worked records {'prompt', 'answer', 'difficulty', 'response'} from `seed` (cold-start traces)."""
        return [{**{k: r[k] for k in ("prompt", "answer", "difficulty")}, "response": r["reasoning"]}
                for r in (digit_chain(seed, i, **self.shape) for i in range(n))]

