"""Bytes a model config needs per token: activations kept for the backward pass under each remat policy, and
the KV cache (experiments/plan.py turns them into memory per device).
"""

from __future__ import annotations

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---- activations ---------------------------------------------------------------------------------------

def _attn_bytes(cfg, policy: str, t: int, beta: int) -> float:
    d, h = cfg.d_model, cfg.n_heads
    if cfg.mla is not None:
        m = cfg.mla
        q_lat = m.q_lora_rank or 0
        dqk, dv = m.qk_head_dim, m.v_head_dim
        if policy == "none":
            return beta * (2 * d + 2 * q_lat + 2 * m.kv_lora_rank + m.qk_rope_head_dim) \
                + beta * h * (2 * dqk + 2 * dv) / t + 4 * h / t
        # dots: q_a, kv_a, o_proj outputs; q_b (H·dqk) and kv_b (H·(nope + v)) outputs; plus the layer input
        return beta * (d + q_lat + m.kv_lora_rank + m.qk_rope_head_dim + d) \
            + beta * h * (dqk + m.qk_nope_head_dim + dv) / t
    hd, kv = cfg.head_dim, cfg.n_kv_heads
    if policy == "none":
        return beta * 2 * d + beta * (2 * h * hd + 2 * kv * hd) / t + 4 * h / t
    return beta * (d + d) + beta * (h * hd + 2 * kv * hd) / t


def _mlp_bytes(cfg, moe_layer: bool, policy: str, t: int, beta: int, moe_impl: str) -> float:
    d = cfg.d_model
    if not moe_layer:
        f = cfg.mlp_dim
        return beta * (2 * d + 4 * f / t) if policy == "none" else beta * (d + 2 * f / t)
    m = cfg.moe
    k, e, s, fe = m.experts_per_token, m.n_routed_experts, m.n_shared_experts, m.mlp_dim
    routed = k if moe_impl == "dispatch" else e
    copies = k if moe_impl == "dispatch" else 1  # dense: x enters once, the expert sum is inside the matmul
    if policy == "none":
        return beta * (2 * d + 2 * copies * d + (routed + s) * 4 * fe / t) + 8 * e
    return beta * ((copies + 1) * d + (routed + s) * 2 * fe / t) + 4 * e


def layer_activation_bytes(cfg, moe_layer: bool, policy: str, tensor: int = 1, moe_impl: str = "dispatch") -> float:
    """Bytes kept per token for one decoder layer under remat `policy` (see the module docstring)."""
    beta = BYTES[cfg.compute_dtype]
    if policy == "block":
        return float(beta * cfg.d_model)
    return _attn_bytes(cfg, policy, tensor, beta) + _mlp_bytes(cfg, moe_layer, policy, tensor, beta, moe_impl)


def activation_bytes_per_token(cfg, tensor: int = 1, moe_impl: str = "dispatch") -> dict[str, float]:
    """{'layers', 'recompute_peak', 'head', 'mtp', 'total'}: activation bytes per token held by a device."""
    policy = cfg.remat
    beta = BYTES[cfg.compute_dtype]
    kinds = list(cfg.is_moe_layer)
    layers = sum(layer_activation_bytes(cfg, m, policy, tensor, moe_impl) for m in kinds)
    mtp_moe = cfg.moe is not None and cfg.n_layers >= cfg.moe.first_k_dense
    peak = 0.0
    if policy == "block":  # during the backward one block is recomputed in full
        peak = max(layer_activation_bytes(cfg, m, "none", tensor, moe_impl) for m in kinds + [mtp_moe][:cfg.mtp_depth])
    head = beta * 2 * cfg.d_model + 4 * cfg.vocab_size / tensor
    mtp = cfg.mtp_depth * (beta * 7 * cfg.d_model + layer_activation_bytes(cfg, mtp_moe, policy, tensor, moe_impl)
                           + head)
    return {"layers": layers, "recompute_peak": peak, "head": head, "mtp": mtp,
            "total": layers + peak + head + mtp}


# ---- KV cache ------------------------------------------------------------------------------------------

def kv_cache_bytes_per_token(cfg) -> int:
    """Decode-cache bytes per token over all layers: MLA (kv_lora + rope), GQA 2·kv_heads·head_dim."""
    per_layer = (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) if cfg.mla else 2 * cfg.n_kv_heads * cfg.head_dim
    return per_layer * cfg.n_layers * BYTES[cfg.compute_dtype]
