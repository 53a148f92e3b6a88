"""Budget counters computed from shapes alone (jax.eval_shape): parameter counts and training FLOPs."""

from __future__ import annotations

import math

from flax import nnx

from model.config import ModelConfig


def _sizes(cfg: ModelConfig) -> dict[tuple, int]:
    from model.transformer import abstract_params

    flat = nnx.to_flat_state(abstract_params(cfg))
    return {path: math.prod(v.get_value().shape) for path, v in flat if isinstance(v, nnx.Param)}


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """{'total', 'active', 'mtp'}: parameters of the main model, those used per token (shared experts plus
    top-k routed), and the MTP modules (excluding the embedding and head they share). Allocates nothing."""
    sizes = _sizes(cfg)
    total = sum(n for p, n in sizes.items() if p[0] != "mtp")
    mtp = sum(n for p, n in sizes.items() if p[0] == "mtp")
    active = total
    if cfg.moe is not None:
        per_expert = 3 * cfg.d_model * cfg.moe.mlp_dim
        idle = (cfg.moe.n_routed_experts - cfg.moe.experts_per_token) * per_expert
        active -= idle * sum(cfg.is_moe_layer)
    return {"total": total, "active": active, "mtp": mtp}


def _attention_dims(cfg: ModelConfig) -> tuple[int, int]:
    if cfg.mla is not None:
        return cfg.mla.qk_head_dim, cfg.mla.v_head_dim
    return cfg.head_dim, cfg.head_dim


def flops_per_token(cfg: ModelConfig, seq_len: int, with_mtp: bool = True) -> float:
    """Training FLOPs per token (forward + backward): 6·(active matmul parameters) + 6·L·H·T·(d_qk + d_v).

    The embedding lookup is not a matmul and is excluded (a tied head is counted once as the head).
    Attention is counted over the full T×T score matrix (PaLM's convention; causal skipping is a speed-up,
    not fewer model FLOPs). MTP modules add their block, projection and a second pass through the head.
    """
    counts = count_params(cfg)
    embed = cfg.vocab_size * cfg.d_model
    matmul = counts["active"] - (0 if cfg.tie_embeddings else embed)
    dqk, dv = _attention_dims(cfg)
    attn_layers = cfg.n_layers
    flops = 6 * matmul
    if with_mtp and cfg.mtp_depth:
        moe_mtp = cfg.moe is not None and cfg.n_layers >= cfg.moe.first_k_dense
        mtp_active = counts["mtp"]
        if moe_mtp:
            mtp_active -= (cfg.moe.n_routed_experts - cfg.moe.experts_per_token) * 3 * cfg.d_model * cfg.moe.mlp_dim * cfg.mtp_depth
        flops += 6 * (mtp_active + cfg.mtp_depth * embed)
        attn_layers += cfg.mtp_depth
    flops += 6 * attn_layers * cfg.n_heads * seq_len * (dqk + dv)
    return float(flops)
