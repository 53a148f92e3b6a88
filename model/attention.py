"""Grouped-query attention (Llama, Qwen2, Qwen3) and the shared softmax-attention core.

Training and prefill without a cache run causal by index within segments, by the kernel
`ModelConfig.attention_impl` picks (`resolve_impl`: cuDNN flash on GPU, the blocked
`model.fast_attention.causal_attention` on CPU, XLA's `attend` elsewhere); with a cache, masking is by
position, not by index: a query at position p attends to a key slot whose position q satisfies
0 <= q <= p (and, when packing, the same segment). The same rule covers training (positions 0..T-1), packed
documents (positions restart, segment ids differ), left-padded prompts (pad slots hold
position -1) and KV-cache decoding (empty slots hold -1).

Cache layout per layer is head-major and updated in place at a shared write index, so decoding touches one slot
per step and never transposes the cache: values [batch, kv_heads, max_len, head_dim], keys transposed,
[batch, kv_heads, head_dim, max_len], so that a decode step's scores are plain [group, head_dim] x [head_dim, slots]
products (XLA:CPU's batched dot runs them 23 % faster than against [slots, head_dim] keys; docs/benchmarks.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ConfigError, ModelConfig
from model.layers import KeyGen, RMSNorm, dtype_of, merge_heads, param, project_tokens, zeros
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


def attend(q, k, v, mask, scale, keys_transposed: bool = False):
    """Softmax attention with grouped KV heads.

    q [batch, heads, q_len, dk], k [batch, kv_heads, kv_len, dk] (or [batch, kv_heads, dk, kv_len] with
    `keys_transposed`, the cache's layout), v [batch, kv_heads, kv_len, dv], mask [batch, q_len, kv_len] bool
    -> [batch, heads, q_len, dv].
    """
    b, h, t, dk = q.shape
    kvh = k.shape[1]
    qg = q.reshape(b, kvh, h // kvh, t, dk)
    spec = "bkgtd,bkds->bkgts" if keys_transposed else "bkgtd,bksd->bkgts"
    s = jnp.einsum(spec, qg, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, None, None], s, MASKED)
    # softmax with the normalisation applied to the small output, not to p (flash-style; 10 % faster decode)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    o = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v)
    o = o.astype(jnp.float32) / jnp.sum(p, axis=-1, keepdims=True)
    return o.astype(v.dtype).reshape(b, h, t, v.shape[-1])


def resolve_impl(cfg: ModelConfig) -> str:
    """The kernel `cfg.attention_impl` runs on this backend: 'cudnn' | 'xla' | 'cpu_blocked'.

    'auto' picks cuDNN flash attention on GPU when it can run it (bf16/fp16 compute, qk head dim a multiple of
    8 and <= 256 on Hopper or later, <= 128 before), the blocked kernel on CPU (written for XLA:CPU; it never
    builds [T, T] scores or masks), and XLA elsewhere (TPU: a Splash path is not wired yet). Called while
    tracing, so a kernel the backend cannot run is a ConfigError naming the field before anything compiles.
    """
    backend, impl = jax.default_backend(), cfg.attention_impl
    dk = cfg.mla.qk_head_dim if cfg.mla else cfg.head_dim
    # cuDNN's flash kernels take head dims up to 256 from Hopper (compute capability 9.0) on, 128 before
    cc = str(getattr(jax.devices()[0], "compute_capability", "0") or "0") if backend == "gpu" else "0"
    max_dk = 256 if float(cc.split(".")[0]) >= 9 else 128
    cudnn_ok = backend == "gpu" and cfg.compute_dtype in ("bfloat16", "float16") and dk <= max_dk and dk % 8 == 0
    if impl == "auto":
        return "cudnn" if cudnn_ok else "cpu_blocked" if backend == "cpu" else "xla"
    if impl == "cudnn" and not cudnn_ok:
        kind = jax.devices()[0].device_kind
        raise ConfigError(f"attention_impl: 'cudnn' cannot run here (backend {backend}, device kind {kind}, "
                          f"compute_dtype {cfg.compute_dtype}, qk head dim {dk}); it needs a GPU, bf16/fp16 and a "
                          f"head dim divisible by 8, <= 256 from Hopper on (<= 128 before): use 'auto', 'xla' or "
                          f"'cpu_blocked'")
    return impl


def _cudnn_attention(q, k, v, segment_ids, scale):
    """cuDNN flash attention (jax.nn.dot_product_attention, causal). Shapes as `attend`, segment_ids [b, t].

    The public API wants one head dim for q, k and v: MLA's v (128 beside qk 192) is zero-padded and the
    padding sliced off the output (zero columns of v give zero output columns). Packed documents pass a
    [b, 1, t, t] same-segment mask, which cuDNN takes as a bias (a T^2 buffer per sequence).
    """
    dk, dv = q.shape[-1], v.shape[-1]
    if dv < dk:
        v = jnp.pad(v, [(0, 0)] * 3 + [(0, dk - dv)])
    mask = None if segment_ids is None else (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    o = jax.nn.dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), mask=mask, scale=scale,
                                     is_causal=True, implementation="cudnn")  # BTNH in and out
    return o.swapaxes(1, 2)[..., :dv]


def self_attention(q, k, v, mask_info, scale: float, cfg: ModelConfig | None = None, keys_transposed: bool = False):
    """Dispatch. With a cache (mask_info['mask'] set): the masked `attend` (keys as the cache holds them:
    `keys_transposed`). Without: causal within segments by the kernel `resolve_impl(cfg)` picks (the blocked CPU
    kernel when no cfg is given, as bench/ calls it). Shapes as `attend`; returns [batch, heads, q_len, dv] in
    q.dtype."""
    if mask_info["mask"] is not None:
        return attend(q, k, v, mask_info["mask"], scale, keys_transposed)
    impl, seg = ("cpu_blocked" if cfg is None else resolve_impl(cfg)), mask_info["segment_ids"]
    if impl == "cpu_blocked":
        from model.fast_attention import causal_attention
        return causal_attention(q, k, v, scale, segment_ids=seg)
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, seg, scale)
    b, t = q.shape[0], q.shape[2]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return attend(q, k, v, attention_mask(pos, pos, seg, seg), scale).astype(q.dtype)


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

    def _qkv(self, x):
        """x [batch, seq, d_model] -> token-major q [batch, seq, heads, head_dim], k and v [batch, seq, kv_heads,
        head_dim].

        On the CPU backend the three projections run as one product with the weights concatenated along heads
        ([d_model, heads + 2 kv_heads, head_dim]): XLA:CPU runs the thin k and v products (64 columns at
        small_qwen2) far below its matmul peak, and one wide product is ~1.3 % faster per training step
        (docs/benchmarks.md). Elsewhere they stay three: weights sharded along heads (tensor parallelism) would
        have to be regathered to be concatenated.
        """
        names = ("q", "k", "v")
        ws = [getattr(self, f"{n}_proj")[...] for n in names]
        bs = [getattr(self, f"{n}_bias")[...] for n in names] if self.cfg.qkv_bias else None
        if jax.default_backend() != "cpu":
            ys = [project_tokens(x, w.astype(x.dtype)) for w in ws]
            if bs is not None:
                ys = [y + b.astype(x.dtype) for y, b in zip(ys, bs)]
            return tuple(ys)
        y = project_tokens(x, jnp.concatenate(ws, axis=1).astype(x.dtype))
        if bs is not None:
            y = y + jnp.concatenate(bs, axis=0).astype(x.dtype)
        h, kvh = self.cfg.n_heads, self.cfg.n_kv_heads
        return y[:, :, :h], y[:, :, h:h + kvh], y[:, :, h + kvh:]

    def __call__(self, x, rope, mask_info, cache=None):
        """x [batch, seq, d_model] -> ([batch, seq, d_model], updated layer cache or None)."""
        cfg = self.cfg
        cos, sin = rope
        q, k, v = self._qkv(x)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # RoPE before the heads-major transpose: its backward then runs on the matmul's own layout (~1 % per step)
        q, k = apply_rope(q, cos, sin, heads_axis=2), apply_rope(k, cos, sin, heads_axis=2)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [batch, heads, seq, head_dim]
        if cache is not None:
            index = mask_info["index"]
            cache = {"k": write_cache(cache["k"], k.swapaxes(2, 3), index, 3),
                     "v": write_cache(cache["v"], v, index, 2)}
            k, v = cache["k"].astype(x.dtype), cache["v"].astype(x.dtype)
        o = self_attention(q, k, v, mask_info, cfg.attn_scale, cfg, keys_transposed=cache is not None)
        y = merge_heads(o, self.o_proj[...].astype(x.dtype))
        if self.o_bias is not None:
            y = y + self.o_bias[...].astype(x.dtype)
        return y, cache

    @staticmethod
    def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype):
        kvh, hd = cfg.n_kv_heads, cfg.head_dim
        return {"k": jnp.zeros((batch, kvh, hd, max_len), dtype), "v": jnp.zeros((batch, kvh, max_len, hd), dtype)}
