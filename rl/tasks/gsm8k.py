"""GSM8K: grade-school maths word problems whose solutions end in '#### <number>', read from local files.

    gsm8k_gold("... #### 1,234")                  # '1234'
    gsm8k_records(prompts_cfg, "test.parquet")   # [{'question', 'answer': gold number}]
    GSM8K(eval_path="data/gsm8k/test.parquet")   # the task: prompts from prompts.path, held-out from eval_path
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from rl.tasks.base import R1_TEMPLATE, Task, register

_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def gsm8k_gold(answer: str) -> str:
    """The final number of a GSM8K solution: the text after its last '####', without thousands separators, a
    leading '$' or a trailing '.' ('... #### 1,234' -> '1234', '#### -5' -> '-5'). A solution that is already a
    bare number is returned normalised the same way. Anything else raises ValueError (TypeError if not a str)."""
    if not isinstance(answer, str):
        raise TypeError(f"GSM8K answer must be a string, got {type(answer).__name__}")
    tail = answer.rsplit("####", 1)[-1]
    gold = tail.strip().replace(",", "").removeprefix("$").removesuffix(".").strip()
    if not _NUMBER.fullmatch(gold):
        what = "has no final '#### <number>'" if "####" not in answer else f"ends in '#### {tail.strip()[:40]}'"
        raise ValueError(f"GSM8K answer {what}, not a number: {answer[-80:]!r}")
    return gold.removeprefix("+")


def _source_of(path: str, fallback: str) -> str:
    """'jsonl' / 'parquet' from a file's extension; a directory (or other name) keeps `fallback`."""
    ext = os.path.splitext(path)[1].lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "parquet"}.get(ext, fallback)


def gsm8k_records(cfg: DataConfig, path: str, limit: int = 0) -> list[dict]:
    """Rows of a GSM8K file as {prompt_field: question, 'answer': gold number}; the first `limit` if > 0."""
    from train.data import load_records

    if not os.path.exists(path):
        raise FileNotFoundError(f"GSM8K file {path!r} does not exist")
    src = dataclasses.replace(cfg, source=_source_of(path, cfg.source), path=path)
    rows = load_records(src)
    n = len(rows) if limit <= 0 else min(limit, len(rows))
    out = []
    for i in range(n):
        row = rows[i]
        try:
            gold = gsm8k_gold(row["answer"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: row {i}: {e}") from None
        out.append({cfg.prompt_field: row[cfg.prompt_field], "answer": gold})
    return out


@register
@dataclass(frozen=True)
class GSM8K(Task):
    """Training prompts from the prompts config's file (`prompts.path`, Parquet or JSONL, a 'question' and a worked
    'answer' per row), held-out problems from `eval_path` (GSM8K's test split). Answers are judged by math-verify
    against the gold number; maj@k votes by numeric value ('72', '72.0', '$72' are one answer)."""

    name = "gsm8k"
    template = R1_TEMPLATE
    prompt_field = "question"
    correctness = "math_verify"
    rewards = ("format", "math_verify")

    eval_path: str = "data/gsm8k/test.parquet"

    def train_records(self, prompts_cfg=None) -> list[dict]:
        if prompts_cfg is None:
            raise ValueError("task gsm8k: training records come from prompts.path; pass the prompts config")
        return gsm8k_records(prompts_cfg, prompts_cfg.path)

    def held_out(self, n: int) -> list[dict]:
        from train.data import DataConfig
        if not self.eval_path:
            raise ValueError("task.eval_path: empty; set it to GSM8K's test split or set eval.problems=0")
        cfg = DataConfig(kind="prompts", source="memory", prompt_field=self.prompt_field, tokenizer="byte",
                         chat_template=self.template)
        return gsm8k_records(cfg, self.eval_path, n)

    def vote_key(self, answer, record: dict) -> str | None:
        if not isinstance(answer, str) or len(answer) > 64:
            return None
        s = answer.strip().replace(",", "").removeprefix("$").removesuffix(".").strip()
        if not _NUMBER.fullmatch(s):
            return s or None
        try:
            return format(Decimal(s).normalize(), "f")
        except InvalidOperation:
            return s
