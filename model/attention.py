"""Grouped-query attention (Llama, Qwen2, Qwen3) and the shared softmax-attention core.

Training and prefill without a cache use `model.fast_attention.causal_attention` (causal by index within
segments, blocked, with its own backward pass); with a cache, masking is by position, not by index: a query at position p attends to a key slot whose position q
satisfies 0 <= q <= p (and, when packing, the same segment). The same rule covers training (positions
0..T-1), packed documents (positions restart, segment ids differ), left-padded prompts (pad slots hold
position -1) and KV-cache decoding (empty slots hold -1).

Cache layout per layer is head-major, [batch, kv_heads, max_len, head_dim], updated in place at a shared
write index, so decoding touches one slot per step and never transposes the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.layers import KeyGen, RMSNorm, dtype_of, param, zeros
from model.rope import apply_rope

MASKED = -1e30  # finite, so a fully masked row (a pad query) gives a uniform, not a NaN, distribution


def attention_mask(q_pos, kv_pos, q_seg=None, kv_seg=None):
    """Boolean [batch, q_len, kv_len]: key slot visible to query.

    q_pos [batch, q_len], kv_pos [batch, kv_len] int32 (-1 marks an empty or padded slot);
    q_seg/kv_seg optional segment ids of the same shapes (packing).
    """
    mask = (kv_pos[:, None, :] >= 0) & (kv_pos[:, None, :] <= q_pos[:, :, None])
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
    return mask


def attend(q, k, v, mask, scale):
    """Softmax attention with grouped KV heads.

    q [batch, heads, q_len, dk], k [batch, kv_heads, kv_len, dk], v [batch, kv_heads, kv_len, dv],
    mask [batch, q_len, kv_len] bool -> [batch, heads, q_len, dv].
    """
    b, h, t, dk = q.shape
    kvh = k.shape[1]
    qg = q.reshape(b, kvh, h // kvh, t, dk)
    s = jnp.einsum("bkgtd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, None, None], s, MASKED)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bksd->bkgtd", p, v)
    return o.reshape(b, h, t, v.shape[-1])


def self_attention(q, k, v, mask_info, scale):
    """Dispatch: the blocked causal kernel without a cache (mask_info['mask'] is None), else the masked one."""
    if mask_info["mask"] is None:
        from model.fast_attention import causal_attention
        return causal_attention(q, k, v, scale, segment_ids=mask_info["segment_ids"])
    return attend(q, k, v, mask_info["mask"], scale)


def write_cache(buf, new, index, axis):
    """Write `new` into `buf` at `index` along `axis` (in place under donation)."""
    starts = [0] * buf.ndim
    starts[axis] = index
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), starts)


class Attention(nnx.Module):
    """Multi-head attention with grouped KV heads, optional qkv bias and per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, cfg: ModelConfig, rngs: KeyGen):
        d, h, kvh, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        dt, std = dtype_of(cfg.param_dtype), cfg.init_std
        self.cfg = cfg
        self.q_proj = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std, dt)
        self.k_proj = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), std, dt)
        self.v_proj = param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), std, dt)
        self.o_proj = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), std, dt)
        if cfg.qkv_bias:
            self.q_bias = zeros((h, hd), ("heads", "head_dim"), dt)
            self.k_bias = zeros((kvh, hd), ("kv_heads", "head_dim"), dt)
            self.v_bias = zeros((kvh, hd), ("kv_heads", "head_dim"), dt)
        self.o_bias = zeros((d,), ("embed",), dt) if cfg.o_bias else None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps, dt, "head_dim")
            self.k_norm = RMSNorm(hd, cfg.norm_eps, dt, "head_dim")

    def _proj(self, x, w, bias_name):
        y = jnp.einsum("btd,dhk->bhtk", x, w[...].astype(x.dtype))
        if self.cfg.qkv_bias:
            y = y + getattr(self, bias_name)[...].astype(x.dtype)[None, :, None, :]
        return y

    def __call__(self, x, rope, mask_info, cache=None):
        """x [batch, seq, d_model] -> ([batch, seq, d_model], updated layer cache or None)."""
        cfg = self.cfg
        cos, sin = rope
        q = self._proj(x, self.q_proj, "q_bias")
        k = self._proj(x, self.k_proj, "k_bias")
        v = self._proj(x, self.v_proj, "v_bias")
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            index = mask_info["index"]
            cache = {"k": write_cache(cache["k"], k, index, 2), "v": write_cache(cache["v"], v, index, 2)}
            k, v = cache["k"].astype(x.dtype), cache["v"].astype(x.dtype)
        o = self_attention(q, k, v, mask_info, cfg.attn_scale)
        y = jnp.einsum("bhtk,hkd->btd", o, self.o_proj[...].astype(x.dtype))
        if self.o_bias is not None:
            y = y + self.o_bias[...].astype(x.dtype)
        return y, cache

    @staticmethod
    def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
