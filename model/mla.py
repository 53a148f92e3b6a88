"""Multi-head latent attention (DeepSeek-V2/V3, V3 report eq. 1-11).

Keys and values are compressed into one latent c_KV [kv_lora] per token plus a single shared RoPE key
k^R [rope_dim]; the cache holds exactly these. Two equivalent computations:
- naive: expand the latent into per-head keys/values with kv_b_proj, then ordinary attention (training,
  prefill without a cache);
- absorbed: fold W_UK into the query and W_UV into the output, so attention runs directly over the latent
  cache (decoding). `mla.decode_impl` picks it when a cache is given; a test checks both agree.
Within each head's query/key the first qk_nope dims carry no position, the last rope_dim dims are rotated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import MASKED, self_attention, write_cache
from model.config import ModelConfig
from model.layers import KeyGen, RMSNorm, dtype_of, linear, merge_heads, param, project_heads
from model.rope import apply_rope


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: KeyGen):
        m, d, h = cfg.mla, cfg.d_model, cfg.n_heads
        dt, std = dtype_of(cfg.param_dtype), cfg.init_std
        self.cfg = cfg
        if m.q_lora_rank is None:
            self.q_proj = param(rngs, (d, h, m.qk_head_dim), ("embed", "heads", "head_dim"), std, dt)
        else:
            self.q_a_proj = param(rngs, (d, m.q_lora_rank), ("embed", "q_lora"), std, dt)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, cfg.norm_eps, dt, "q_lora")
            self.q_b_proj = param(rngs, (m.q_lora_rank, h, m.qk_head_dim), ("q_lora", "heads", "head_dim"), std, dt)
        # one projection for [latent | shared rope key], as the checkpoints store it
        self.kv_a_proj = param(rngs, (d, m.kv_lora_rank + m.qk_rope_head_dim), ("embed", "kv_lora"), std, dt)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, cfg.norm_eps, dt, "kv_lora")
        self.kv_b_proj = param(rngs, (m.kv_lora_rank, h, m.qk_nope_head_dim + m.v_head_dim),
                               ("kv_lora", "heads", "head_dim"), std, dt)
        self.o_proj = param(rngs, (h, m.v_head_dim, d), ("heads", "head_dim", "embed"), std, dt)

    def _queries(self, x, cos, sin):
        """-> q_nope [b, h, t, nope], q_rope [b, h, t, rope]."""
        m = self.cfg.mla
        if m.q_lora_rank is None:
            q = project_heads(x, self.q_proj[...].astype(x.dtype))
        else:
            c = self.q_a_layernorm(linear(x, self.q_a_proj[...].astype(x.dtype)))
            q = project_heads(c, self.q_b_proj[...].astype(x.dtype))
        q_nope, q_rope = q[..., : m.qk_nope_head_dim], q[..., m.qk_nope_head_dim:]
        return q_nope, apply_rope(q_rope, cos, sin)

    def __call__(self, x, rope, mask_info, cache=None):
        """x [batch, seq, d_model] -> ([batch, seq, d_model], updated layer cache or None)."""
        cfg, m = self.cfg, self.cfg.mla
        cos, sin = rope
        q_nope, q_rope = self._queries(x, cos, sin)
        kv = linear(x, self.kv_a_proj[...].astype(x.dtype))
        latent = self.kv_a_layernorm(kv[..., : m.kv_lora_rank])  # [b, t, kv_lora]
        k_rope = apply_rope(kv[..., m.kv_lora_rank:], cos, sin)  # [b, t, rope]
        if cache is not None:
            index = mask_info["index"]
            cache = {"latent": write_cache(cache["latent"], latent, index, 1),
                     "k_rope": write_cache(cache["k_rope"], k_rope, index, 1)}
            latent, k_rope = cache["latent"].astype(x.dtype), cache["k_rope"].astype(x.dtype)
        wkv = self.kv_b_proj[...].astype(x.dtype)
        if cache is not None and m.decode_impl == "absorb":
            w_uk, w_uv = wkv[..., : m.qk_nope_head_dim], wkv[..., m.qk_nope_head_dim:]
            o = self._absorbed(q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask_info["mask"])
        else:
            kv_heads = project_heads(latent, wkv)  # one product for keys and values: [b, h, t, nope + v]
            k_nope, v = kv_heads[..., : m.qk_nope_head_dim], kv_heads[..., m.qk_nope_head_dim:]
            k_r = jnp.broadcast_to(k_rope[:, None], k_nope.shape[:3] + (m.qk_rope_head_dim,))
            q = jnp.concatenate([q_nope, q_rope], axis=-1)
            k = jnp.concatenate([k_nope, k_r], axis=-1)
            o = self_attention(q, k, v, mask_info, cfg.attn_scale, cfg)
        y = merge_heads(o, self.o_proj[...].astype(x.dtype))
        return y, cache

    def _absorbed(self, q_nope, q_rope, latent, k_rope, w_uk, w_uv, mask):
        """Attention over the latent cache. latent [b, s, c], k_rope [b, s, r] -> [b, h, t, v_head_dim]."""
        q_lat = jnp.einsum("bhtk,chk->bhtc", q_nope, w_uk)
        s = (jnp.einsum("bhtc,bsc->bhts", q_lat, latent, preferred_element_type=jnp.float32)
             + jnp.einsum("bhtr,bsr->bhts", q_rope, k_rope, preferred_element_type=jnp.float32))
        s = jnp.where(mask[:, None], s * self.cfg.attn_scale, MASKED)
        p = jax.nn.softmax(s, axis=-1).astype(latent.dtype)
        o_lat = jnp.einsum("bhts,bsc->bhtc", p, latent)
        return jnp.einsum("bhtc,chv->bhtv", o_lat, w_uv)

    @staticmethod
    def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype):
        m = cfg.mla
        return {"latent": jnp.zeros((batch, max_len, m.kv_lora_rank), dtype),
                "k_rope": jnp.zeros((batch, max_len, m.qk_rope_head_dim), dtype)}
