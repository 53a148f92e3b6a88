"""Small building blocks: parameters with logical axis names, RMSNorm, SwiGLU MLP, embedding.

Every parameter is an `nnx.Param` carrying `axes`, a tuple of logical axis names (one per dimension) that
`sharding/` maps to mesh axes. The model itself never names a mesh axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig


class KeyGen:
    """Hands out a fresh PRNG key per parameter: fold_in(key, n) with a Python counter.

    Used instead of nnx.Rngs because its traced counter makes abstract initialisation (jax.eval_shape) of
    a 61-layer model take ~50 s; this takes well under a second and is equally deterministic.
    """

    def __init__(self, key):
        self.key, self.count = key, 0

    def params(self):
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


def dtype_of(name: str):
    return jnp.dtype(name)


def param(rngs: KeyGen, shape: tuple[int, ...], axes: tuple[str, ...], std: float, dtype) -> nnx.Param:
    """A normal(0, std) parameter with logical axis names."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype), axes=axes)


def ones(shape: tuple[int, ...], axes: tuple[str, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), axes=axes)


def zeros(shape: tuple[int, ...], axes: tuple[str, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), axes=axes)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32. scale: [dim]."""

    def __init__(self, dim: int, eps: float, dtype, axis_name: str = "norm"):
        self.scale = ones((dim,), (axis_name,), dtype)
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


@functools.partial(jax.checkpoint, static_argnums=(2,))
def rms_norm(x, scale, eps: float):
    """x [..., dim] / rms(x) * scale [dim], in float32, returned in x.dtype. Under jax.checkpoint the backward keeps
    x alone (in bf16 compute, the float32 copy of x and the normalised float32 y were two [tokens, dim] float32
    tensors per norm) and recomputes the statistics."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * y).astype(x.dtype)


def linear(x, w, preferred_element_type=None):
    """x [..., d_in] @ w [d_in, d_out] -> [..., d_out], as one 2-D matmul over the flattened leading axes.

    Why flatten: XLA:CPU differentiates a [batch, seq, d_in] @ [d_in, d_out] product into a weight gradient
    whose [batch, seq, d_out] cotangent it first transposes with a slow fused copy (48 ms per SwiGLU gate on a
    [16, 256, 768] batch, 3x the matmul); on the [batch*seq, d_in] operand the backward takes the fast path
    (small_qwen2 training step 1.21 -> 0.81 s on an Intel Xeon, docs/benchmarks.md). Elsewhere it is a no-op
    reshape (the flattened axes stay batch-major, so a batch-sharded operand keeps its sharding).
    """
    y = jnp.matmul(x.reshape(-1, x.shape[-1]), w, preferred_element_type=preferred_element_type)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def project_tokens(x, w):
    """x [batch, seq, d_in] @ w [d_in, heads, head_dim] -> token-major [batch, seq, heads, head_dim], one flat
    `linear`."""
    return linear(x, w.reshape(w.shape[0], -1)).reshape(*x.shape[:2], *w.shape[1:])


def project_heads(x, w):
    """x [batch, seq, d_in] @ w [d_in, heads, head_dim] -> [batch, heads, seq, head_dim] through `linear`.

    The heads-major result is a transpose of the token-major product; XLA:CPU lowers the equivalent einsum
    ('btd,dhk->bhtk') to a transposed product and a relayout of the weight, ~6 % slower per training step.
    """
    return project_tokens(x, w).transpose(0, 2, 1, 3)


def merge_heads(o, w):
    """o [batch, heads, seq, head_dim] @ w [heads, head_dim, d_out] -> [batch, seq, d_out] through `linear`."""
    b, h, t, k = o.shape
    return linear(o.transpose(0, 2, 1, 3).reshape(b, t, h * k), w.reshape(h * k, -1))


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel: [in, out] with logical axes `axes`."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], cfg: ModelConfig, rngs: KeyGen,
                 bias: bool = False):
        dt = dtype_of(cfg.param_dtype)
        self.kernel = param(rngs, (d_in, d_out), axes, cfg.init_std, dt)
        self.bias = zeros((d_out,), axes[1:], dt) if bias else None

    def __call__(self, x):
        y = linear(x, self.kernel[...].astype(x.dtype))
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). x: [..., d_model] -> [..., d_model]."""

    def __init__(self, cfg: ModelConfig, mlp_dim: int, rngs: KeyGen):
        self.gate_proj = Dense(cfg.d_model, mlp_dim, ("embed", "mlp"), cfg, rngs)
        self.up_proj = Dense(cfg.d_model, mlp_dim, ("embed", "mlp"), cfg, rngs)
        self.down_proj = Dense(mlp_dim, cfg.d_model, ("mlp", "embed"), cfg, rngs)

    def __call__(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


@jax.checkpoint
def swiglu(g, u):
    """silu(g) * u, [..., f]. Under jax.checkpoint the backward keeps only g and u (silu's input, sigmoid, output
    and the product would be four more [tokens, f] tensors) and recomputes the elementwise rest."""
    return jax.nn.silu(g) * u


class Embed(nnx.Module):
    """Token embedding. embedding: [vocab, d_model] (tied logits: `Transformer.head`)."""

    def __init__(self, cfg: ModelConfig, rngs: KeyGen):
        self.embedding = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std,
                               dtype_of(cfg.param_dtype))

    def __call__(self, tokens, dtype):
        return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)
