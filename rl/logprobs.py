"""Teacher-forced log-probs of sampled completions: the old/reference policy and the policy in the loss.

A rollout batch is laid out as [left-padded prompt (P) | completion (N)], exactly as the sampler saw it,
so the scores match the sampler's log-probs (tests/test_sampler.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model import forward
from rl.sampler import left_align


FLOOR_TOL = 1e-5  # on the logit / temperature scale; the decode-vs-full-pass difference is ~1e-6


def rollout_inputs(prompts, prompt_lens, completions):
    """-> tokens [batch, P+N], positions [batch, P+N] (-1 on prompt padding)."""
    tokens, positions = left_align(prompts, prompt_lens)
    n = completions.shape[1]
    comp_pos = prompt_lens[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
    return (jnp.concatenate([tokens, completions.astype(jnp.int32)], axis=1),
            jnp.concatenate([positions, comp_pos.astype(jnp.int32)], axis=1))


def completion_logprobs(cfg, params, prompts, prompt_lens, completions, temperature: float = 1.0,
                        with_entropy: bool = False, routing=None, floors=None, vocab_limit: int | None = None):
    """log π(completion_t | prompt, completion_<t) at `temperature`: [batch, N] (and entropy [batch, N]).

    Routing statistics come back too (aux['expert_load'] [n_moe_layers, E], aux['routing'] [batch, P+N-1,
    n_moe_layers, k]) for MoE logging. `routing` int32 [batch, P+N, n_moe_layers, k] (the sampler's,
    `SampleOutput.routing`) replays the experts the sample was drawn with. `floors` float32 [batch, N] (the
    sampler's, `SampleOutput.floors`) with `vocab_limit` restrict each step's distribution to the tokens the
    sampling filter kept, renormalised (DeepSeek-V3.2's Keep Sampling Mask); the sampled token always stays in.
    """
    p = prompts.shape[1]
    tokens, positions = rollout_inputs(prompts, prompt_lens, completions)
    replay = None if routing is None else routing[:, :-1]
    logits, _, aux = forward(cfg, params, tokens[:, :-1], positions[:, :-1], with_mtp=False, routing=replay)
    logits = logits[:, p - 1:].astype(jnp.float32) / temperature
    if floors is not None or vocab_limit is not None:
        v = jnp.arange(logits.shape[-1])
        keep = (v < (vocab_limit or logits.shape[-1]))[None, None, :]
        if floors is not None:  # the tolerance absorbs the cached decode's rounding (~1e-6) at the boundary token
            keep = keep & (logits >= floors[..., None] - FLOOR_TOL)
        keep = keep | (v[None, None, :] == completions[..., None])  # rounding must not drop the sampled token
        logits = jnp.where(keep, logits, -jnp.inf)
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, completions[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if not with_entropy:
        return logp, aux
    p_all = jnp.exp(logp_all)
    entropy = -jnp.sum(jnp.where(p_all > 0, p_all * logp_all, 0.0), axis=-1)
    return logp, entropy, aux
