"""Held-out evaluation of a policy: R1's pass@1 (averaged over k samples), unbiased pass@k, maj@k (cons@k).

    from rl.evaluate import evaluate, held_out_problems
    records = held_out_problems(seed=0, n=64)      # synthetic arithmetic, disjoint seed stream from training
    m = evaluate(cfg, params, tokenizer, records, k=8, sampling=eval_sampling(grpo_cfg.sampling),
                 template="User: {prompt}\\nAssistant:")
    m["pass@1"], m["pass@8"], m["maj@k"], m["by_difficulty"][3]["pass@1"]

Metrics (algorithms.md §5), for N problems with k samples each (T = 0.6, top-p 0.95 by default, as R1 reports):
- 'pass@1': mean over problems of c/k (c = correct samples) — R1's pass@1 "averaged over k samples".
- 'pass@k' (also under f'pass@{k}', and f'pass@{j}' for j = 2, 4, 8, ... < k): the unbiased estimator of Chen et al.
  2021, `pass_at_k(k, c, j)` averaged over problems.
- 'maj@k' (also f'maj@{k}'): majority vote over the k normalised extracted answers (`majority_answer`), judged by
  `score_fn` like every sample.
- 'format_rate' (mean `format_reward`), 'think_usage' (fraction of samples with a non-empty <think>…</think>),
  'answer_rate' (fraction with an extractable <answer>), 'response_len_mean' / 'response_len_max' (generated tokens,
  including the EOS / stop sequence), 'truncated_frac' (samples that ran out of max_new_tokens).
- 'by_difficulty': {difficulty: {'n', 'pass@1', 'pass@k', 'maj@k', 'response_len_mean'}} when records carry one.
- 'k', 'n_problems', 'n_samples'.

A sample is correct iff `score_fn` (default `rl.rewards.accuracy_reward`: integer match of the last <answer>) gives
>= 1. Completions come from `rl.rollout.rollout`, the GRPO loop's own path (same BOS, stop strings, think prefix,
decoding); only the temperature and top-p differ (`eval_sampling`).
"""

from __future__ import annotations

import logging
import numbers
from collections import Counter
from collections.abc import Callable, Sequence

from dataclasses import replace

import numpy as np

from rl.rewards import _as_int, accuracy_reward, format_reward
from rl.rollout import Sampling, rollout
from rl.tasks import R1_TEMPLATE
from train.data import synthetic_example, synthetic_problem

__all__ = [
    "EVAL_SAMPLING",
    "EVAL_SPAWN_KEY",
    "eval_sampling",
    "evaluate",
    "held_out_problems",
    "maj_at_k",
    "majority_answer",
    "normalize_answer",
    "pass_at_k",
    "seen_synthetic_prompts",
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


def majority_answer(answers: Sequence, k: int | None = None) -> str | None:
    """The most frequent normalised answer among the first k (all if k is None); None answers do not vote.

    Tie-break (fixed): among answers with the top count, the one whose FIRST occurrence comes earliest wins.
    Returns None when no answer votes."""
    votes = [a for a in (normalize_answer(x) for x in list(answers)[:k]) if a is not None]
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
# Held-out synthetic arithmetic

# Held-out problem i of seed s comes from np.random.default_rng(SeedSequence([s, i], spawn_key=(EVAL_SPAWN_KEY,))).
# Training's synthetic source uses SeedSequence([seed, index]) with no spawn key; a non-empty spawn key is mixed in
# as extra entropy words, so no (s, i) here reproduces any training stream: the draws are independent of training.
EVAL_SPAWN_KEY = 0x5EED_E7A1


def _eval_rng(seed: int, i: int):
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(i)], spawn_key=(EVAL_SPAWN_KEY,)))


def seen_synthetic_prompts(seed: int, size: int = 100_000, text_lines: bool = True) -> set[str]:
    """Expressions (like '12+7*3') that training's synthetic source with this seed and size contains: every record's
    prompt and, with `text_lines`, the 'Q: expr=? A: v' lines of its pretraining text. About 13 s per 100k records."""
    out = set()
    for i in range(int(size)):
        rec = synthetic_example(seed, i)
        out.add(rec["prompt"][len("What is "):-1])
        if text_lines:
            for line in rec["text"].split("\n"):
                out.add(line[len("Q: "):line.index("=?")])
    return out


def held_out_problems(seed: int = 0, n: int = 64, *, exclude: set[str] | frozenset = frozenset(),
                      max_tries: int | None = None) -> list[dict]:
    """n distinct synthetic arithmetic problems {'prompt': 'What is 12+7*3?', 'answer': '33', 'difficulty': 3}.

    Same distribution as `train.data.synthetic_problem` (2 or 3 terms, + - *), so 'difficulty' is the number of
    terms (2 or 3). Disjointness from training: problem i is drawn from its own seed stream (`EVAL_SPAWN_KEY`), which
    no training seed reproduces; but the problem space is small (there are only ~20k two-term expressions and
    training's 100k records cover most of them), so independent draws still repeat training problems. Pass
    `exclude=seen_synthetic_prompts(train_seed)` (| other seeds) to reject any expression that training contains;
    then the set is disjoint by content, at the cost of skewing towards 3-term problems.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out, seen = [], set()
    tries = max_tries if max_tries is not None else 1000 * n
    i = 0
    while len(out) < n:
        if i >= tries:
            raise RuntimeError(f"held_out_problems: only {len(out)} of {n} new problems after {tries} draws")
        expr, _, value = synthetic_problem(_eval_rng(seed, i))
        i += 1
        if expr in seen or expr in exclude:
            continue
        seen.add(expr)
        n_terms = sum(ch in "+-*" for ch in expr) + 1
        out.append({"prompt": f"What is {expr}?", "answer": str(value), "difficulty": n_terms})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def _render(rec: dict, template: str | None, data_cfg, prompt_field: str) -> str:
    if template is None and "prompt_text" in rec:
        return rec["prompt_text"]
    if template is None and data_cfg is not None:
        from train.data import render_prompt
        return render_prompt(data_cfg, rec[prompt_field])
    return (template or R1_TEMPLATE).format(prompt=rec[prompt_field])


def evaluate(cfg, params, tokenizer, records: Sequence[dict], *, k: int = 8, sampling: Sampling = EVAL_SAMPLING,
             max_prompt_len: int | None = None, template: str | None = None, data_cfg=None, rng=None,
             batch_size: int = 64, difficulty_key: str | None = None, score_fn: Callable = accuracy_reward,
             mesh=None, rules=None, details: bool = False) -> dict:
    """Sample k completions for each record with `rl.rollout.rollout` and score them (see the module doc).

    records: dicts with the prompt (field `data_cfg.prompt_field`, else 'prompt') and the gold 'answer'; the prompt is
    rendered with `template` (a format string with {prompt}) if given, else with `data_cfg`'s chat template, else a
    record's own 'prompt_text', else R1's template. `sampling` as the run trained with (`eval_sampling`). Prompts are
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
    prompt_field = data_cfg.prompt_field if data_cfg is not None else "prompt"
    texts = [_render(r, template, data_cfg, prompt_field) for r in records]
    out = rollout(cfg, params, texts, sampling, tokenizer, rng=rng, repeat=k, max_prompt_len=max_prompt_len,
                  batch_size=batch_size, mesh=mesh, rules=rules)
    n_prob, n_rows = len(records), len(records) * k
    rows = np.repeat(np.arange(n_prob), k)  # row r samples problem rows[r]; problem i owns rows [i*k, (i+1)*k)
    completions, answers, lengths, truncated = out.texts, out.answers, out.lengths, out.truncated
    golds = [records[rows[r]].get("answer") for r in range(n_rows)]
    correct = np.asarray([s >= 1.0 for s in score_fn(completions, answer=golds)], bool).reshape(n_prob, k)
    fmt = np.asarray(format_reward(completions), np.float64)
    think = np.asarray([think_used(c) for c in completions], np.float64)
    lengths_a = np.asarray(lengths, np.float64)

    c = correct.sum(axis=1)
    # maj@k: the majority answer, judged by the same correctness check as every sample (math-verify when the run
    # scores with it), not by string equality with the gold
    winners = [majority_answer(answers[i * k:(i + 1) * k]) for i in range(n_prob)]
    judged = score_fn([f"<answer>{w}</answer>" for w in winners], answer=[r.get("answer") for r in records])
    maj = np.asarray([float(w is not None and j >= 1.0) for w, j in zip(winners, judged)])
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
             "correct": int(c[i]), "majority": majority_answer(answers[i * k:(i + 1) * k]),
             "answers": answers[i * k:(i + 1) * k], "completions": completions[i * k:(i + 1) * k]}
            for i in range(n_prob)]
    return result
