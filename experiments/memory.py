"""Bytes a model config needs per token: activations kept for the backward pass under each remat policy, and
the KV cache (experiments/plan.py turns them into memory per device).
"""

from __future__ import annotations

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---- activations ---------------------------------------------------------------------------------------
# The per-tensor counts below are what `jax.ad_checkpoint` (saved_residuals) reports this code keeps for the
# backward pass under remat='none': every RMSNorm its input and output (model.layers.rms_norm recomputes its fp32
# statistics), the MLP's SwiGLU 3 f-sized tensors (gate and up outputs, the product: model.layers.swiglu), the
# routed experts' SwiGLU 6 (+ silu's input, sigmoid and output) except dropless on one device (gate and up only:
# model.dispatch), the dense MoE 8 per expert row (plus its repeated gate weights and the gated product).
# Checked 2026-12-03 with `jax.vjp`'s residuals at bench/gpu.py's sizes (docs/benchmarks.md).

SWIGLU_TENSORS = 3  # model.layers.MLP: gate and up outputs and the product (silu recomputed: swiglu)
EXPERT_FFN_TENSORS = 6  # model.dispatch.expert_ffn outside dropless: + silu's input/sigmoid/output
DENSE_MOE_TENSORS = 8


def _norm(width: float, beta: int) -> float:
    """An RMSNorm keeps its input (counted where it is made) and its output; float32 statistics are recomputed
    (model.layers.rms_norm)."""
    return beta * width


def _attn_bytes(cfg, policy: str, t: int, beta: int) -> float:
    """Attention sub-layer plus the layer's two norms and residual adds, per token (bytes)."""
    d, h = cfg.d_model, cfg.n_heads
    if cfg.mla is not None:
        m = cfg.mla
        q_lat = m.q_lora_rank or 0
        dqk, dv = m.qk_head_dim, m.v_head_dim
        if policy == "none":  # + q_a / kv_a outputs, their norms, 2 RoPE pieces, q, k, v, attention output, lse
            return _norm(2 * d + q_lat + m.kv_lora_rank, beta) + beta * (2 * d + q_lat + m.kv_lora_rank) \
                + beta * (2 * m.qk_rope_head_dim + h * (2 * dqk + 2 * dv) / t) + 4 * h / t
        # dots: q_a, kv_a, o_proj outputs; q_b (H·dqk) and kv_b (H·(nope + v)) outputs; plus the layer input
        return beta * (d + q_lat + m.kv_lora_rank + m.qk_rope_head_dim + d) \
            + beta * h * (dqk + m.qk_nope_head_dim + dv) / t
    hd, kv = cfg.head_dim, cfg.n_kv_heads
    if policy == "none":
        return _norm(2 * d, beta) + beta * 2 * d + beta * (2 * h * hd + 2 * kv * hd) / t + 4 * h / t
    return beta * (d + d) + beta * (h * hd + 2 * kv * hd) / t


def moe_rows_per_token(cfg, tokens: float | None = None, expert: int = 1) -> float:
    """Expert-FFN rows computed per routed token under `cfg.moe.impl` (what the f-sized activations scale with).

    dense: E (every expert on every token). capacity: capacity_factor·k (the [E, C] buffer, C = ceil(cf·n·k/E)).
    dropless: k plus the block padding E·(block−1)/n (model.dispatch.block_size at n = `tokens` per device;
    k when `tokens` is unknown); under expert parallelism (`expert` > 1) dropless uses exact per-device buffers
    of C = n slots per expert, i.e. E rows per token (model/expert_parallel.py).
    """
    m = cfg.moe
    k, e = m.experts_per_token, m.n_routed_experts
    if m.impl == "dense":
        return float(e)
    if m.impl == "capacity":
        if tokens:
            return min(e * m.capacity(max(1, int(tokens))) / tokens, float(e))
        return min(m.capacity_factor * k, float(e))
    if expert > 1:
        return float(e)
    if not tokens:
        return float(k)
    from model.dispatch import block_rows, block_size
    pairs = int(tokens) * k
    return block_rows(pairs, e, block_size(pairs, e)) / tokens


def _mlp_bytes(cfg, moe_layer: bool, policy: str, t: int, beta: int, rows: float, expert: int) -> float:
    d = cfg.d_model
    if not moe_layer:
        f = cfg.mlp_dim
        return beta * SWIGLU_TENSORS * f / t if policy == "none" else beta * (d + 2 * f / t)
    m = cfg.moe
    k, e, s, fe = m.experts_per_token, m.n_routed_experts, m.n_shared_experts, m.mlp_dim
    if policy != "none":
        return beta * ((rows + 1) * d + (rows + s) * 2 * fe / t) + 4 * e
    if m.impl == "dense":  # x enters once, the expert sum is inside the matmul
        return beta * (d + (DENSE_MOE_TENSORS * rows + SWIGLU_TENSORS * s) * fe / t) + 8 * e
    # the flat input, each expert row's input, the k rows gathered back to combine; fp32 router scores. Dropless on
    # one device keeps only each row's gate/up outputs (model.dispatch recomputes the rest and the block weights)
    routed = 2 if m.impl == "dropless" and expert == 1 else EXPERT_FFN_TENSORS
    return beta * ((1 + rows + k) * d + (routed * rows + SWIGLU_TENSORS * s) * fe / t) + 8 * e


def layer_activation_bytes(cfg, moe_layer: bool, policy: str, tensor: int = 1, tokens: float | None = None,
                           expert: int = 1) -> float:
    """Bytes kept per token for one decoder layer under remat `policy` (see experiments/plan.py's docstring).

    tokens: tokens per device per micro-step (sizes the MoE buffers); expert: the expert-parallel axis size.
    """
    beta = BYTES[cfg.compute_dtype]
    if policy == "block":
        return float(beta * cfg.d_model)
    rows = moe_rows_per_token(cfg, tokens, expert) if cfg.moe is not None else 0.0
    return _attn_bytes(cfg, policy, tensor, beta) + _mlp_bytes(cfg, moe_layer, policy, tensor, beta, rows, expert)


def activation_bytes_per_token(cfg, tensor: int = 1, tokens: float | None = None,
                               expert: int = 1) -> dict[str, float]:
    """{'layers', 'backward', 'head', 'mtp', 'total'}: activation bytes per token held by a device at the peak.

    'backward' is the working set on top of the kept activations while the backward runs through one layer:
    the gradients of that layer's intermediates (the sizes of its remat='none' activations), and under
    'block' the layer's recomputed activations as well; at least the fp32 gradient of the logits (4·V/t).
    """
    policy = cfg.remat
    beta = BYTES[cfg.compute_dtype]
    kinds = list(cfg.is_moe_layer)
    kw = {"tokens": tokens, "expert": expert}
    layers = sum(layer_activation_bytes(cfg, m, policy, tensor, **kw) for m in kinds)
    mtp_moe = cfg.moe is not None and cfg.n_layers >= cfg.moe.first_k_dense
    widest = max(layer_activation_bytes(cfg, m, "none", tensor, **kw) for m in kinds + [mtp_moe][:cfg.mtp_depth])
    peak = max(widest, 4 * cfg.vocab_size / tensor) + (widest if policy == "block" else 0.0)
    d = cfg.d_model
    head = _norm(d, beta) + 4 * cfg.vocab_size / tensor  # final norm; exp(logits) kept for the softmax backward
    # embedding of the shifted tokens, [e; h] concat, eh_proj output; enorm and hnorm; a block; its head
    mtp = cfg.mtp_depth * (beta * 4 * d + _norm(2 * d, beta)
                           + layer_activation_bytes(cfg, mtp_moe, policy, tensor, **kw) + head)
    return {"layers": layers, "backward": peak, "head": head, "mtp": mtp,
            "total": layers + peak + head + mtp}


def gathered_expert_bytes(cfg, sizes: dict[str, int]) -> float:
    """Routed-expert weights kept for the backward after their FSDP gather, per device (bytes).

    Under expert parallelism the sparse impls enter a shard_map with each device's E/ep experts whole
    (model/expert_parallel.py): gate, up, down [E/ep, d, f_e] in the compute dtype. With remat='none' the
    backward reuses these gathered copies (jax saves them as residuals); remat recomputes the gather instead.
    """
    ep = sizes.get("expert", 1)
    if cfg.moe is None or cfg.moe.impl == "dense" or ep == 1 or cfg.remat != "none":
        return 0.0
    n_moe = sum(cfg.is_moe_layer) + cfg.mtp_depth
    return n_moe * 3 * cfg.moe.n_routed_experts / ep * cfg.d_model * cfg.moe.mlp_dim * BYTES[cfg.compute_dtype]


# ---- KV cache ------------------------------------------------------------------------------------------

def kv_cache_bytes_per_token(cfg) -> int:
    """Decode-cache bytes per token over all layers: MLA (kv_lora + rope), GQA 2·kv_heads·head_dim."""
    per_layer = (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) if cfg.mla else 2 * cfg.n_kv_heads * cfg.head_dim
    return per_layer * cfg.n_layers * BYTES[cfg.compute_dtype]
