"""The GRPO loop: sample G answers per prompt, score them with rules, reinforce what worked.

One iteration (algorithms.md §1):
    prompts -> rl.sampler.generate (the training params, the same forward) -> rewards (+ soft overlong
    penalty) -> [dynamic sampling: keep groups whose rewards differ, refill] -> advantages ->
    old log-probs (used only when μ > 1 or several mini-batches: in float32 the sampler's own, which equal a
    teacher-forced pass to ~1e-7 per token; with another compute dtype a teacher-forced pass, because in bf16 the
    sampler's per-sequence mean log-ratio is off by 2.6e-4 (small qwen2) to 4.5e-4 (tiny V3), above GSPO's clip
    range) and reference log-probs (teacher-forced; β > 0 or log_kl)
    -> μ passes of mini-batch updates through train.step.Trainer with the GRPO objective.
The RL state (params, optimizer, step, reference params, RNG, prompt order) checkpoints and resumes like
pretraining. Metrics go to run_dir/metrics.jsonl each step.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np

from rl.evaluate import think_used
from rl.grpo import ADVANTAGES, policy_objective, token_mean
from rl.logprobs import completion_logprobs
from rl.rollout import finish_rollout, launch_rollout
from rl.prompts import PromptSource
from rl.rewards import format_reward
from sharding import batch_sharding, make_mesh, use_rules
from sharding.distributed import from_host, to_host
from train.checkpoint import key_data, key_from_data
from train.config import LossConfig
from train.data import load_tokenizer, validate_vocab
from train.loop import abstract_state, load_base_params
from train.run import Run, RunError
from train.step import Trainer

log = logging.getLogger(__name__)


def reward_function(names, weights, seed: int = 0):
    from rl.rewards import combine, resolve_reward
    named = [resolve_reward(n, seed) for n in names]
    return combine({key: (fn, w) for (key, fn), w in zip(named, weights)})


class GRPO:
    def __init__(self, exp, records=None):
        self.exp, g = exp, exp.grpo
        self.tok = load_tokenizer(exp.prompts.tokenizer)
        validate_vocab(self.tok, exp.model.vocab_size)
        self.mesh = make_mesh(exp.mesh)
        self.trainer = Trainer(exp.model, exp.optim, LossConfig(), self.mesh, loss_fn=self._loss)
        self.task = exp.task
        if records is None and exp.prompts.source == "memory":
            records = self.task.train_records(exp.prompts)
        self.source = PromptSource(exp.prompts, records, seed=exp.seed)
        self.reward = reward_function(exp.reward_names, exp.weights, exp.seed)
        self.batch = g.prompts_per_step * g.num_generations
        self._queue = deque()  # off_policy_steps: (step sampled at, records, pending rollout)
        # teacher-forced log-probs of a rollout batch, split over the data axes like the train step's batch
        # (unsharded inputs would make every device score the whole batch)
        t = self.trainer
        rows = lambda ndim: batch_sharding(t.mesh, t.rules, ndim)
        # keep_sampling_mask: scores (old, reference) over the sampler's kept tokens too (args gain the floors)
        self._mask_kw = {"vocab_limit": self.tok.vocab_size} if g.keep_sampling_mask else {}

        def score(params, prompts, prompt_lens, completions, floors=None):
            return completion_logprobs(exp.model, params, prompts, prompt_lens, completions, g.sampling.temperature,
                                       floors=floors, **self._mask_kw)
        self._score_fn = jax.jit(score, in_shardings=(t.param_sharding, rows(2), rows(1), rows(2))
                                 + ((rows(2),) if g.keep_sampling_mask else ()))

    def _score(self, params, *args):
        t = self.trainer
        args = [from_host(a, batch_sharding(t.mesh, t.rules, np.ndim(a))) for a in args]
        with use_rules(t.mesh, t.rules):
            return self._score_fn(params, *args)

    # ---- the objective, inside the jitted train step ----------------------------------------------------------
    def _loss(self, params, batch, denominator, n_micro):
        g = self.exp.grpo
        routing = batch.get("routing")  # the sampler's experts (MoE models)
        logp, entropy, aux = completion_logprobs(self.exp.model, params, batch["prompts"], batch["prompt_lens"],
                                                 batch["completions"], g.sampling.temperature, with_entropy=True,
                                                 routing=routing if g.keep_routing else None,
                                                 floors=batch.get("floors"), **self._mask_kw)
        # π_old = π_θ on the first mini-batch after sampling: exactly ratio 1 there
        old = jnp.where(batch["first"][:, None] > 0, jax.lax.stop_gradient(logp), batch["old_logp"])
        loss, metrics = policy_objective(g, logp, old, batch.get("ref_logp"), batch["adv"], batch["loss_mask"],
                                         batch.get("behavior_logp"))
        metrics["entropy"] = token_mean(jax.lax.stop_gradient(entropy), batch["loss_mask"])
        # the sampler and the trainer run one forward on the same parameters: on the first mini-batch (before any
        # update) their log-probs of the sampled tokens differ only by numerics (logged as `logprob_mismatch`)
        metrics["logprob_mismatch"] = token_mean(jnp.abs(jax.lax.stop_gradient(logp) - batch["sampler_logp"]),
                                                 batch["loss_mask"])
        if routing is not None:
            metrics["router_disagreement"] = router_disagreement(routing, aux["routing"], batch["prompts"].shape[1],
                                                                 batch["loss_mask"])
        return loss, metrics, aux.get("expert_load")

    # ---- rollouts -----------------------------------------------------------------------------------------------
    def _launch(self, params, rng):
        """Take the next prompts and dispatch their sampling (returns at once: JAX dispatches asynchronously)."""
        g = self.exp.grpo
        recs = self.source.take(g.prompts_per_step)
        return recs, launch_rollout(self.exp.model, params, [r["prompt_text"] for r in recs], g.sampling, self.tok,
                                    rng=rng, repeat=g.num_generations, max_prompt_len=self.exp.max_prompt_len,
                                    mesh=self.mesh, rules=self.trainer.rules,
                                    with_routing=self.exp.model.moe is not None)

    def _sample(self, params, rng):
        return self._finish(*self._launch(params, rng))

    def _finish(self, recs, pending):
        """Wait for a launched rollout, score it: the rollout batch as the update step reads it."""
        g = self.exp.grpo
        out = finish_rollout(pending)
        fields = {k: [r.get(k) for r in recs for _ in range(g.num_generations)] for k in recs[0]}
        total, parts = self.reward(out.texts, **fields)
        rewards = np.asarray(total, np.float32)
        # `accuracy` is the task's correctness, never the total reward: its reward if the run trains with it
        if self.task.correctness in parts:
            correct = np.asarray(parts[self.task.correctness]) >= 1.0
        else:
            correct = self.task.correct(out.texts, [r for r in recs for _ in range(g.num_generations)])
        if g.overlong_cache:
            from rl.rewards import soft_overlong_penalty
            rewards = rewards + np.asarray(soft_overlong_penalty(out.lengths, g.sampling.max_new_tokens,
                                                                 g.overlong_cache))
        return {"prompts": out.prompts, "prompt_lens": out.prompt_lens, "completions": out.tokens,
                "logprobs": out.logprobs, "lengths": out.lengths, "truncated": out.truncated, "rewards": rewards,
                "correct": np.asarray(correct, np.float32),
                "parts": {k: np.asarray(v, np.float32) for k, v in parts.items()}, "texts": out.texts,
                **({"routing": out.routing} if out.routing is not None else {}),
                # with keep_sampling_mask the sampler's log-probs are over its kept set, as the trainer's will be
                **({"floors": out.floors, "logprobs": out.kept_logprobs} if g.keep_sampling_mask else {})}

    def rollout(self, params, rng):
        """A full rollout batch; with dynamic sampling, groups with equal rewards are replaced while possible."""
        g = self.exp.grpo
        rng, key = jax.random.split(rng)
        roll = self._sample(params, key)
        zero_std = _zero_std(roll["rewards"], g.num_generations)
        frac_zero = float(zero_std.mean())
        for _ in range(g.max_resample_rounds if g.dynamic_sampling else 0):
            if not zero_std.any():
                break
            rng, key = jax.random.split(rng)
            extra = self._sample(params, key)
            ok = ~_zero_std(extra["rewards"], g.num_generations)
            slots, donors = np.flatnonzero(zero_std), np.flatnonzero(ok)
            for s, d in zip(slots, donors):
                _copy_group(roll, extra, s, d, g.num_generations)
                zero_std[s] = False
        roll["zero_std_frac"] = frac_zero
        return roll, rng

    # ---- one iteration ------------------------------------------------------------------------------------------
    def pipelined(self, params, rng, step: int):
        """grpo.off_policy_steps = N >= 1: keep N + 1 rollouts in flight. This step's rollout was launched N steps
        ago (the first N steps use rollouts of the initial parameters); the one for step + N is launched now, on a
        copy of the current parameters (the update donates their buffers), and samples while this step trains.
        Returns (rollout, rng, staleness in steps)."""
        g = self.exp.grpo
        while len(self._queue) < g.off_policy_steps + 1:
            rng, key = jax.random.split(rng)
            copy = jax.block_until_ready(jax.tree.map(jnp.copy, params))
            self._queue.append((step, *self._launch(copy, key)))
        sampled_at, recs, pending = self._queue.popleft()
        roll = self._finish(recs, pending)
        roll["zero_std_frac"] = float(_zero_std(roll["rewards"], g.num_generations).mean())
        return roll, rng, step - sampled_at

    def iteration(self, state, ref, rng, step: int = 0):
        g, G = self.exp.grpo, self.exp.grpo.num_generations
        t0 = time.perf_counter()
        if g.off_policy_steps:
            roll, rng, staleness = self.pipelined(state["params"], rng, step)
        else:
            (roll, rng), staleness = self.rollout(state["params"], rng), 0
        t_roll = time.perf_counter() - t0
        adv = np.asarray(ADVANTAGES[g.advantage](jnp.asarray(roll["rewards"]).reshape(-1, G), g.std_eps)).reshape(-1)
        n = roll["completions"].shape[1]
        mask = (np.arange(n)[None, :] < roll["lengths"][:, None]).astype(np.float32)
        if g.mask_truncated:
            mask *= ~roll["truncated"][:, None]
        batch = {"prompts": roll["prompts"], "prompt_lens": roll["prompt_lens"], "completions": roll["completions"],
                 "adv": adv.astype(np.float32), "loss_mask": mask, "first": np.zeros(self.batch, np.float32),
                 "sampler_logp": np.asarray(roll["logprobs"], np.float32),
                 **({"routing": roll["routing"]} if "routing" in roll else {}),
                 **({"floors": roll["floors"]} if g.keep_sampling_mask else {})}
        args = (roll["prompts"], roll["prompt_lens"], roll["completions"]) + (
            (roll["floors"],) if g.keep_sampling_mask else ())
        t1 = time.perf_counter()
        needs_old = g.num_iterations > 1 or g.mini_batches > 1
        if g.off_policy_steps:  # π_old is the current policy, the sampler's a stale one: TIS weighs the difference
            batch["behavior_logp"] = np.asarray(roll["logprobs"], np.float32)
        if not needs_old:
            batch["old_logp"] = np.zeros_like(mask)
        elif self.exp.model.compute_dtype == "float32" and not g.off_policy_steps:
            batch["old_logp"] = roll["logprobs"]  # equal to a teacher-forced pass to ~1e-7 per token
        else:  # bf16: the sampler's per-sequence mean log-ratio is off by 2.6e-4..4.5e-4, past GSPO's clip
            batch["old_logp"] = to_host(self._score(state["params"], *args)[0])
        if g.beta > 0 or g.log_kl:
            batch["ref_logp"] = to_host(self._score(ref, *args)[0])
        t_score = time.perf_counter() - t1
        t2 = time.perf_counter()
        size = self.batch // g.mini_batches
        updates = []
        for epoch in range(g.num_iterations):
            # a new shuffle for every (step, pass): the same permutation each step would pair the same mini-batches
            shuffle = np.random.default_rng([self.exp.seed, step, epoch])
            order = np.arange(self.batch) if epoch == 0 else shuffle.permutation(self.batch)
            for k in range(g.mini_batches):
                idx = order[k * size:(k + 1) * size]
                mb = {key: v[idx] for key, v in batch.items()}
                mb["first"][:] = 1.0 if (epoch == 0 and k == 0) else 0.0
                t = self.trainer
                mb = {key: from_host(v, batch_sharding(t.mesh, t.rules, v.ndim)) for key, v in mb.items()}
                state, m = self.trainer.step(state, mb)
                updates.append(jax.device_get(m))
        t_update = time.perf_counter() - t2
        first = updates[0]
        metrics = {
            "reward": float(roll["rewards"].mean()),
            **{f"reward_{k}": float(v.mean()) for k, v in roll["parts"].items()},
            "accuracy": float(roll["correct"].mean()),
            # like accuracy, measured whatever the run trains on (the random-reward control has no format reward)
            "format_rate": float(np.mean(roll["parts"]["format"] if "format" in roll["parts"]
                                         else format_reward(roll["texts"]))),
            "response_len_mean": float(roll["lengths"].mean()), "response_len_max": float(roll["lengths"].max()),
            "think_rate": float(np.mean([think_used(t) for t in roll["texts"]])),
            "truncated_frac": float(roll["truncated"].mean()), "zero_std_frac": roll["zero_std_frac"],
            "entropy": float(first["entropy"]), "kl": float(first.get("kl", 0.0)),
            "clip_frac_low": float(np.mean([u["clip_frac_low"] for u in updates])),
            "clip_frac_high": float(np.mean([u["clip_frac_high"] for u in updates])),
            "logprob_mismatch": float(first["logprob_mismatch"]),
            **({"staleness": float(staleness), "tis_weight_mean": float(first["tis_weight_mean"]),
                "tis_weight_dev_max": float(max(u["tis_weight_dev_max"] for u in updates)),
                "tis_truncated_frac": float(np.mean([u["tis_truncated_frac"] for u in updates]))}
               if g.off_policy_steps else {}),
            **({"router_disagreement": float(first["router_disagreement"])} if "router_disagreement" in first else {}),
            **({"off_policy_masked_frac": float(np.mean([u["off_policy_masked_frac"] for u in updates]))}
               if "off_policy_masked_frac" in first else {}),
            "first_ratio_mean": float(first["ratio_mean"]), "first_clip_frac": float(first["clip_frac_low"] +
                                                                                     first["clip_frac_high"]),
            "loss": float(np.mean([u["loss"] for u in updates])),
            "grad_norm": float(np.mean([u["grad_norm"] for u in updates])),
            "skipped": float(max(u["skipped"] for u in updates)),
            "time_rollout": t_roll, "time_score": t_score, "time_update": t_update,
        }
        if "expert_load" in first:
            metrics["expert_load"] = updates[-1]["expert_load"]
        return state, rng, metrics, roll


def router_disagreement(sampled, trained, p: int, mask):
    """Fraction of (completion token, MoE layer) pairs whose expert SET differs between the sampler's forward and the
    trainer's. sampled [B, P+N, L, k], trained [B, P+N-1, L, k] (the router's own choice), mask [B, N]: completion
    token i is an input to the forward (and counted) iff token i+1 was generated."""
    n = mask.shape[1]
    a = jnp.sort(sampled[:, p:p + n - 1], axis=-1)
    b = jnp.sort(trained[:, p:p + n - 1], axis=-1)
    differ = jnp.any(a != b, axis=-1).astype(jnp.float32)  # [B, N-1, L]
    valid = mask[:, 1:, None]
    return jnp.sum(differ * valid) / jnp.maximum(jnp.sum(valid) * differ.shape[-1], 1.0)


def _zero_std(rewards, g):
    r = rewards.reshape(-1, g)
    return np.all(r == r[:, :1], axis=1)


def _copy_group(dst, src, slot, donor, g):
    a, b = slice(slot * g, (slot + 1) * g), slice(donor * g, (donor + 1) * g)
    for key in ("prompts", "prompt_lens", "completions", "logprobs", "lengths", "truncated", "rewards", "correct",
                "routing", "floors"):
        if key in dst:
            dst[key][a] = src[key][b]
    for key in dst["parts"]:
        dst["parts"][key][a] = src["parts"][key][b]
    dst["texts"][a] = src["texts"][b]


def _evaluate(algo, exp, params, records, path):
    from dataclasses import replace

    from rl.evaluate import eval_sampling, evaluate
    ev = exp.evaluation()
    k = ev.k
    sampling = replace(eval_sampling(exp.grpo.sampling), max_new_tokens=ev.max_new_tokens)
    result = evaluate(exp.model, params, algo.tok, records, k=k, sampling=sampling, task=exp.task,
                      max_prompt_len=ev.max_prompt_len, data_cfg=exp.prompts, rng=jax.random.key(ev.seed),
                      mesh=algo.mesh, rules=algo.trainer.rules)
    if jax.process_index() == 0:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2)
    log.info("%s: pass@1 %.3f  pass@%d %.3f  maj@%d %.3f", os.path.basename(path), result["pass@1"], k,
             result["pass@k"], k, result["maj@k"])
    return result


def ensure_base(exp, base_dir: str = "") -> str:
    """Pretrain `exp`'s base stage into base_dir (default: base.run_dir, else run_dir/base), resuming a started one;
    a finished one is reused as it is. Returns its directory."""
    from train.loop import pretrain
    base = exp.base_run(base_dir)
    pretrain(base, records=exp.task.corpus() if base.data.source == "memory" else None)
    return base.directory


def run_rl(exp) -> dict:
    """What `python -m experiments.run` does with an RLExperiment: its base stage when it has one and no init_from,
    then GRPO on its task (held-out evaluation before and after when eval.problems > 0)."""
    from dataclasses import replace
    if exp.base is not None and not exp.init_from:
        exp = replace(exp, init_from=ensure_base(exp))
    return grpo(exp)


def grpo(exp, records=None, eval_records=None) -> dict:
    """Run GRPO for `exp.steps` iterations, resuming from exp.directory if it holds a checkpoint.

    Prompts: `records`, else the task's (`exp.task.train_records`) when the prompts source is 'memory', else the
    prompts config's own source. Held-out problems: `eval_records`, else the task's first `exp.eval.problems`;
    when there are any, writes run_dir/eval_start.json before the first step and run_dir/eval_end.json after the
    last (pass@1 over eval.k samples, pass@k, maj@k, length, think usage).
    """
    run_dir = exp.directory
    if eval_records is None and exp.eval.problems:
        eval_records = exp.task.held_out(exp.eval.problems)
    algo = GRPO(exp, records)
    trainer = algo.trainer
    run = Run(exp)  # refuses a checkpoint of another model, as pretraining does
    keep_ref = exp.grpo.beta > 0 or exp.grpo.log_kl
    row = {}
    try:
        rng, start = jax.random.key(exp.seed), run.latest_step()
        if start:  # our own checkpoint first: init_from is not read when resuming
            shapes = abstract_state(trainer)  # shapes + shardings only: nothing allocated beside the restore
            abstract = {"train": shapes, **({"ref": shapes["params"]} if keep_ref else {})}
            restored = run.ckpt.restore(abstract)
            if restored is None:
                raise RunError(f"{run.ckpt.directory}: no usable checkpoint; move it away to start afresh")
            full, meta = restored
            state, ref = full["train"], full.get("ref")
            rng, start = key_from_data(meta["rng"]), int(meta["step"])
            algo.source.set_state(meta["prompts"])
        else:
            state = (trainer.state_from_params(load_base_params(exp.init_from, trainer)) if exp.init_from
                     else trainer.init_state(exp.seed))
            # a copy: the train step donates (reuses) the state's buffers
            ref = jax.tree.map(jnp.copy, state["params"]) if keep_ref else None
        run.start(start)
        if eval_records and start == 0:
            _evaluate(algo, exp, state["params"], eval_records, os.path.join(run_dir, "eval_start.json"))
        for step in range(start, exp.steps):
            if ref is not None and exp.grpo.ref_reset_every and step and step % exp.grpo.ref_reset_every == 0:
                ref = jax.tree.map(jnp.copy, state["params"])
            state, rng, metrics, roll = algo.iteration(state, ref, rng, step)
            row = run.record(step + 1, metrics)
            if run.should_save(step + 1):
                full = {"train": state, **({"ref": ref} if ref is not None else {})}
                run.ckpt.save(step + 1, full, {"config": exp.to_dict(), "rng": key_data(rng),
                                               "prompts": algo.source.get_state()})
    finally:
        run.close()
    if eval_records:
        _evaluate(algo, exp, state["params"], eval_records, os.path.join(run_dir, "eval_end.json"))
    run.plot(["reward", "accuracy", "format_rate", "response_len_mean", "think_rate", "kl", "entropy",
              "clip_frac_high", "zero_std_frac"])
    return row
