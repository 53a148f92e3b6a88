"""Rotary position embeddings (rotate-half layout) with linear, Llama-3 and YaRN frequency scaling.

Frequencies match Hugging Face's `modeling_rope_utils` for the same `rope_parameters`. DeepSeek checkpoints
store their rotary dims interleaved; `model.hf` permutes those weights at load time so one layout serves all.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from model.config import RopeConfig, yarn_mscale

_TABLE_ROWS_X_DIM = 1 << 20  # up to 4 MiB per float32 table as a program constant (e.g. 16K positions x 64 dims)


def inv_frequencies(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """Returns (inv_freq [dim // 2] float32, attention_factor applied to cos and sin)."""
    base = rope.theta
    inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = 1.0
    if rope.type == "linear":
        inv = inv / rope.factor
    elif rope.type == "llama3":
        old = rope.original_max_position_embeddings
        low_wl, high_wl = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = np.where(medium, smoothed, scaled)
    elif rope.type == "yarn":
        s = rope.factor
        if rope.attention_factor is not None:
            factor = rope.attention_factor
        elif rope.mscale and rope.mscale_all_dim:
            factor = yarn_mscale(s, rope.mscale) / yarn_mscale(s, rope.mscale_all_dim)
        else:
            factor = yarn_mscale(s)
        orig = rope.original_max_position_embeddings

        def correction_dim(n_rot):
            return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
        inv = (1.0 / (s * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv.astype(np.float32), float(factor)


def rope_tables(rope: RopeConfig, dim: int, max_pos: int, positions, min_rows: int = 0):
    """cos, sin for integer positions [batch, seq] -> each [batch, seq, dim] float32 (halves repeated).

    max_pos is the run's context (ModelConfig.max_seq_len): YaRN applies only beyond the original context
    (`RopeConfig.active`, as the reference DeepSeek-V3); `inv_frequencies` itself always scales, as HF does.

    For rows = max(max_pos, seq, min_rows) (the caller passes a KV cache's slot count as min_rows) up to
    `_TABLE_ROWS_X_DIM` elements, the tables are computed once here, in numpy, for positions 0..rows-1 and
    gathered by position: negative positions (padding) read row 0, positions >= rows (beyond any context the
    model or its cache has) give NaN rather than a silently wrong rotation. Computing cos/sin inside the
    program instead let XLA:CPU fuse the two transcendentals into each consumer, recomputing them per head in
    every layer's RoPE and its backward (48 fused cos/sin over [batch, heads, seq, head_dim] per small_qwen2
    train step): the tables make that step 5-7 % faster (docs/benchmarks.md). Longer contexts compute them in
    the program.
    """
    rope = rope.active(max_pos)
    inv, factor = inv_frequencies(rope, dim, max_pos)
    rows = max(int(max_pos), int(positions.shape[-1]), int(min_rows))
    if rows * dim <= _TABLE_ROWS_X_DIM:
        angles = np.arange(rows, dtype=np.float32)[:, None] * inv  # the float32 angle, as computed below and by HF
        angles = np.concatenate([angles, angles], axis=-1).astype(np.float64)
        cos, sin = ((f(angles) * factor).astype(np.float32) for f in (np.cos, np.sin))
        index = jnp.maximum(positions, 0)
        return tuple(jnp.take(t, index, axis=0, mode="fill", fill_value=np.nan) for t in (cos, sin))
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x, cos, sin, heads_axis: int = 1):
    """x: [batch, heads, seq, dim], [batch, seq, heads, dim] with heads_axis=2, or [batch, seq, dim];
    cos/sin: [batch, seq, dim]."""
    if x.ndim == 4:
        cos, sin = jnp.expand_dims(cos, heads_axis), jnp.expand_dims(sin, heads_axis)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
