"""Rotary position embeddings (rotate-half layout) with linear, Llama-3 and YaRN frequency scaling.

Frequencies match Hugging Face's `modeling_rope_utils` for the same `rope_parameters`. DeepSeek checkpoints
store their rotary dims interleaved; `model.hf` permutes those weights at load time so one layout serves all.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from model.config import RopeConfig, yarn_mscale


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


def rope_tables(rope: RopeConfig, dim: int, max_pos: int, positions):
    """cos, sin for integer positions [batch, seq] -> each [batch, seq, dim] float32 (halves repeated).

    max_pos is the run's context (ModelConfig.max_seq_len): YaRN applies only beyond the original context
    (`RopeConfig.active`, as the reference DeepSeek-V3); `inv_frequencies` itself always scales, as HF does.
    """
    rope = rope.active(max_pos)
    inv, factor = inv_frequencies(rope, dim, max_pos)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x, cos, sin):
    """x: [batch, heads, seq, dim] (or [batch, seq, dim]); cos/sin: [batch, seq, dim]."""
    if x.ndim == 4:
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
