"""Teacher-forced log-probs of sampled completions: the old/reference policy and the policy in the loss.

A rollout batch is laid out as [left-padded prompt (P) | completion (N)], exactly as the sampler saw it,
so the scores match the sampler's log-probs (tests/test_sampler.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model import forward
from rl.sampler import left_align


def rollout_inputs(prompts, prompt_lens, completions):
    """-> tokens [batch, P+N], positions [batch, P+N] (-1 on prompt padding)."""
    tokens, positions = left_align(prompts, prompt_lens)
    n = completions.shape[1]
    comp_pos = prompt_lens[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
    return (jnp.concatenate([tokens, completions.astype(jnp.int32)], axis=1),
            jnp.concatenate([positions, comp_pos.astype(jnp.int32)], axis=1))


def completion_logprobs(cfg, params, prompts, prompt_lens, completions, temperature: float = 1.0,
                        with_entropy: bool = False, routing=None):
    """log π(completion_t | prompt, completion_<t) at `temperature`: [batch, N] (and entropy [batch, N]).

    Routing statistics come back too (aux['expert_load'] [n_moe_layers, E], aux['routing'] [batch, P+N-1,
    n_moe_layers, k]) for MoE logging. `routing` int32 [batch, P+N, n_moe_layers, k] (the sampler's,
    `SampleOutput.routing`) replays the experts the sample was drawn with.
    """
    p = prompts.shape[1]
    tokens, positions = rollout_inputs(prompts, prompt_lens, completions)
    replay = None if routing is None else routing[:, :-1]
    logits, _, aux = forward(cfg, params, tokens[:, :-1], positions[:, :-1], with_mtp=False, routing=replay)
    logits = logits[:, p - 1:].astype(jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, completions[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if not with_entropy:
        return logp, aux
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy, aux
