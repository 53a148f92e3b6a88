"""Held-out evaluation of a policy: R1's pass@1 (averaged over k samples), unbiased pass@k, maj@k (cons@k).

    from rl.evaluate import evaluate
    task = DigitChain()
    m = evaluate(cfg, params, tokenizer, task.held_out(96), k=8, task=task, sampling=eval_sampling(grpo_cfg.sampling),
                 template=task.template)
    m["pass@1"], m["pass@8"], m["maj@k"], m["by_difficulty"][3]["pass@1"]

Metrics (algorithms.md §5), for N problems with k samples each (T = 0.6, top-p 0.95 by default, as R1 reports):
- 'pass@1': mean over problems of c/k (c = correct samples) — R1's pass@1 "averaged over k samples".
- 'pass@k' (also under f'pass@{k}', and f'pass@{j}' for j = 2, 4, 8, ... < k): the unbiased estimator of Chen et al.
  2021, `pass_at_k(k, c, j)` averaged over problems.
- 'maj@k' (also f'maj@{k}'): majority vote over the k extracted answers grouped by the task's equivalence
  (`Task.vote_key`, first-occurrence tie-break); correct iff the winning answer's samples are.
- 'format_rate' (mean `format_reward`), 'think_usage' (fraction of samples with a non-empty <think>…</think>),
  'answer_rate' (fraction with an extractable <answer>), 'response_len_mean' / 'response_len_max' (generated tokens,
  including the EOS / stop sequence), 'truncated_frac' (samples that ran out of max_new_tokens).
- 'by_difficulty': {difficulty: {'n', 'pass@1', 'pass@k', 'maj@k', 'response_len_mean'}} when records carry one.
- 'k', 'n_problems', 'n_samples'.

A sample is correct iff the task says so (`Task.correct`: its correctness reward gives >= 1; the default task,
arithmetic, matches the last <answer> as an integer). Completions come from `rl.rollout.rollout`, the GRPO loop's own path (same BOS, stop strings, think prefix,
decoding); only the temperature and top-p differ (`eval_sampling`).
"""

from __future__ import annotations

import logging
import numbers
from collections import Counter
from collections.abc import Sequence

from dataclasses import replace

import numpy as np

from rl.rewards import _as_int, format_reward
from rl.rollout import Sampling, rollout

__all__ = [
    "EVAL_SAMPLING",
    "eval_sampling",
    "evaluate",
    "maj_at_k",
    "majority_answer",
    "normalize_answer",
    "pass_at_k",
    "think_used",
]

log = logging.getLogger(__name__)

EVAL_SAMPLING = Sampling(temperature=0.6, top_p=0.95, max_new_tokens=48)  # R1's evaluation settings


def eval_sampling(train: Sampling, temperature: float = 0.6, top_p: float = 0.95) -> Sampling:
    """The held-out sampling for a run trained with `train`: R1's temperature and top-p, everything else (lengths,
    stop strings, think prefix, BOS) as in training, so that evaluation scores what training optimises."""
    return replace(train, temperature=temperature, top_p=top_p, top_k=0, greedy=False)


# ----------------------------------------------------------------------------------------------------------------
# Estimators


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), computed
    as the stable product `1.0 if n - c < k else 1 - prod_{i=n-c+1}^{n} (1 - k/i)`. Requires 0 <= c <= n, 1 <= k <= n."""
    n, c, k = int(n), int(c), int(k)
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def normalize_answer(answer) -> str | None:
    """An extracted answer in canonical form for voting: integers as the accuracy reward reads them ('+3', ' 3 ',
    '3.0', '1,000' -> '3', '3', '3', '1000'); anything else stripped. None, non-strings (other than numbers) and
    blank answers -> None (no vote)."""
    if answer is None or isinstance(answer, bool):
        return None
    v = _as_int(answer)
    if v is not None:
        return str(v)
    if isinstance(answer, numbers.Real):
        answer = str(answer)
    if not isinstance(answer, str):
        return None
    s = answer.strip()
    return s or None


def majority_answer(answers: Sequence, k: int | None = None, key=normalize_answer) -> str | None:
    """The most frequent answer class (`key`, default `normalize_answer`) among the first k (all if k is None);
    None classes do not vote.

    Tie-break (fixed): among classes with the top count, the one whose FIRST occurrence comes earliest wins.
    Returns None when no answer votes."""
    votes = [a for a in (key(x) for x in list(answers)[:k]) if a is not None]
    if not votes:
        return None
    counts = Counter(votes)  # insertion order = order of first occurrence
    best = max(counts.values())
    return next(a for a in counts if counts[a] == best)


def maj_at_k(answers: Sequence, gold, k: int | None = None) -> float:
    """1.0 iff the majority vote (`majority_answer`, first-occurrence tie-break) over the first k answers equals the
    normalised gold; 0.0 otherwise, including when every answer is None."""
    pred, g = majority_answer(answers, k), normalize_answer(gold)
    return 1.0 if pred is not None and g is not None and pred == g else 0.0


def think_used(text) -> bool:
    """Whether `text` holds a `<think>` … `</think>` pair (the first '<think>', the first '</think>' after it) with
    non-blank content between them."""
    if not isinstance(text, str):
        return False
    start = text.find("<think>")
    if start < 0:
        return False
    end = text.find("</think>", start + len("<think>"))
    return end >= 0 and bool(text[start + len("<think>"):end].strip())


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def _render(rec: dict, template: str | None, data_cfg, prompt_field: str, task) -> str:
    if template is None and "prompt_text" in rec:
        return rec["prompt_text"]
    if template is None and data_cfg is not None:
        from train.data import render_prompt
        return render_prompt(data_cfg, rec[prompt_field])
    return (template or task.template).format(prompt=rec[prompt_field])


def evaluate(cfg, params, tokenizer, records: Sequence[dict], *, k: int = 8, sampling: Sampling = EVAL_SAMPLING,
             max_prompt_len: int | None = None, template: str | None = None, data_cfg=None, rng=None,
             batch_size: int = 64, difficulty_key: str | None = None, task="arithmetic",
             mesh=None, rules=None, details: bool = False) -> dict:
    """Sample k completions for each record with `rl.rollout.rollout` and score them (see the module doc).

    records: dicts with the prompt (field `data_cfg.prompt_field`, else the task's) and the gold 'answer' (and any
    field the task's correctness reward reads); the prompt is rendered with `template` (a format string with
    {prompt}) if given, else with `data_cfg`'s chat template, else a record's own 'prompt_text', else the task's
    template. `task`: a `rl.tasks.Task` or registered name; it judges every sample and groups maj@k's votes. `sampling` as the run trained with (`eval_sampling`). Prompts are
    right-padded to `max_prompt_len` tokens (default: the longest encoded prompt) and rows go through the sampler
    `batch_size` at a time (one shape, one compile). `rng` defaults to key 0.
    `difficulty_key`: record field for the per-difficulty breakdown; None uses 'difficulty' when every record has it.
    `details=True` adds 'problems': per problem its prompt, gold, difficulty, correct count, answers and completions.
    """
    records = list(records)
    if not records:
        raise ValueError("evaluate: no records")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    from rl.tasks import get_task
    task = get_task(task)
    prompt_field = data_cfg.prompt_field if data_cfg is not None else task.prompt_field
    texts = [_render(r, template, data_cfg, prompt_field, task) for r in records]
    out = rollout(cfg, params, texts, sampling, tokenizer, rng=rng, repeat=k, max_prompt_len=max_prompt_len,
                  batch_size=batch_size, mesh=mesh, rules=rules)
    n_prob, n_rows = len(records), len(records) * k
    rows = np.repeat(np.arange(n_prob), k)  # row r samples problem rows[r]; problem i owns rows [i*k, (i+1)*k)
    completions, answers, lengths, truncated = out.texts, out.answers, out.lengths, out.truncated
    correct = task.correct(completions, [records[i] for i in rows]).reshape(n_prob, k)
    fmt = np.asarray(format_reward(completions), np.float64)
    think = np.asarray([think_used(c) for c in completions], np.float64)
    lengths_a = np.asarray(lengths, np.float64)

    c = correct.sum(axis=1)
    # maj@k: the most frequent answer class under the task's equivalence; it is right iff its samples are (they are
    # equivalent, so the first one speaks for all), judged by the task's correctness like every sample
    keys = [[task.vote_key(a, records[i]) for a in answers[i * k:(i + 1) * k]] for i in range(n_prob)]
    winners = [majority_answer(ks_i, key=lambda x: x) for ks_i in keys]
    maj = np.asarray([float(w is not None and correct[i, keys[i].index(w)]) for i, w in enumerate(winners)])
    ks = sorted({j for j in (2 ** p for p in range(k.bit_length())) if j <= k} | {k})
    per_k = {j: np.asarray([pass_at_k(k, int(ci), j) for ci in c]) for j in ks}

    def summary(sel):
        rsel = np.repeat(sel, k)
        return {"n": int(sel.sum()), "pass@1": float(per_k[1][sel].mean()), "pass@k": float(per_k[k][sel].mean()),
                "maj@k": float(maj[sel].mean()), "response_len_mean": float(lengths_a[rsel].mean())}

    result = {
        "pass@1": float(per_k[1].mean()),
        **{f"pass@{j}": float(per_k[j].mean()) for j in ks},
        "pass@k": float(per_k[k].mean()),
        f"maj@{k}": float(maj.mean()),
        "maj@k": float(maj.mean()),
        "k": k,
        "n_problems": n_prob,
        "n_samples": n_rows,
        "format_rate": float(fmt.mean()),
        "think_usage": float(think.mean()),
        "answer_rate": float(np.mean([a is not None for a in answers])),
        "response_len_mean": float(lengths_a.mean()),
        "response_len_max": int(lengths_a.max()),
        "truncated_frac": float(np.mean(truncated)),
    }
    key = difficulty_key
    if key is None and all("difficulty" in r for r in records):
        key = "difficulty"
    if key is not None:
        diffs = [r.get(key) for r in records]
        levels = sorted(set(diffs), key=lambda d: (d is None, str(type(d)), d if d is not None else 0))
        result["by_difficulty"] = {d: summary(np.asarray([x == d for x in diffs])) for d in levels}
    if details:
        result["problems"] = [
            {"prompt": records[i].get(prompt_field), "answer": records[i].get("answer"),
             **({"difficulty": records[i].get(key)} if key is not None else {}),
             "correct": int(c[i]), "majority": winners[i],
             "answers": answers[i * k:(i + 1) * k], "completions": completions[i * k:(i + 1) * k]}
            for i in range(n_prob)]
    return result
