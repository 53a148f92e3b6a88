"""Verified reasoning traces: the SFT data of R1's later stages (algorithms.md §2).

    traces = verified_traces(cfg, params, tok, records, k=8, data_cfg=prompts_cfg, max_new_tokens=40)
    # [{'prompt': 'What is …', 'response': '<think>…</think> <answer>7</answer>', 'difficulty': 3}, …]

Rejection sampling (R1 stage 3) and distillation data: sample k completions per prompt with
`rl.evaluate.evaluate` (the same sampler, rendering and scoring as every evaluation), keep those that the task
scores correct AND the format reward scores 1 (and, with `require_think`, whose <think> is not empty: a
correct bare answer may be a guess — the counterpart of R1's readability filters on the CoT), drop duplicates
(after stripping whitespace), keep at most `max_per_problem` per prompt. A response is the completion as scored, stripped: an SFT record renders it back after
the same chat template and `response_sep`. `curate` applies the same filter to given responses (the cold start's
hand-written traces).
"""

from __future__ import annotations

from collections.abc import Sequence

from rl.evaluate import evaluate, think_used
from rl.rewards import format_reward


def curate(records: Sequence[dict], max_per_problem: int = 1, require_think: bool = False,
           task="arithmetic") -> list[dict]:
    """Records {'prompt', 'response', 'answer', …} -> {'prompt', 'response'[, 'difficulty']} of the verified ones:
    correct by the task (`rl.tasks.Task.correct`) and format reward 1 (and a non-empty <think> with `require_think`),
    responses stripped, duplicates (same prompt and response) dropped, at most `max_per_problem` per prompt, in
    input order."""
    from rl.tasks import get_task
    records = list(records)
    responses = [str(r["response"]).strip() for r in records]
    correct = get_task(task).correct(responses, records)
    ok = [a and f >= 1.0 and (think_used(c) or not require_think)
          for a, f, c in zip(correct, format_reward(responses), responses)]
    out, seen, per = [], set(), {}
    for rec, resp, good in zip(records, responses, ok):
        key = (rec["prompt"], resp)
        if not good or key in seen or per.get(rec["prompt"], 0) >= max_per_problem:
            continue
        seen.add(key)
        per[rec["prompt"]] = per.get(rec["prompt"], 0) + 1
        out.append({"prompt": rec["prompt"], "response": resp,
                    **({"difficulty": rec["difficulty"]} if "difficulty" in rec else {})})
    return out


def verified_traces(cfg, params, tokenizer, records: Sequence[dict], *, k: int = 8, max_per_problem: int = 1,
                    require_think: bool = False, task="arithmetic", **evaluate_kw) -> list[dict]:
    """k samples per record (prompt + gold 'answer'), filtered by `curate`. `evaluate_kw` go to rl.evaluate.evaluate
    (max_new_tokens, temperature, top_p, data_cfg or template, max_prompt_len, rng, mesh, batch_size, …).

    Returns [{'prompt', 'response', 'difficulty' (when the records have one)}], at most max_per_problem per prompt.
    """
    result = evaluate(cfg, params, tokenizer, records, k=k, details=True, task=task, **evaluate_kw)
    # each sample keeps its record's fields (the task's correctness may read more than 'answer': Countdown's numbers)
    samples = [{**rec, "prompt": p["prompt"], "answer": p["answer"], "response": c,
                **({"difficulty": p["difficulty"]} if "difficulty" in p else {})}
               for rec, p in zip(records, result["problems"]) for c in p["completions"]]
    return curate(samples, max_per_problem, require_think, task)
