"""Causal softmax attention for training on CPU, with its own backward pass.

`causal_attention(q, k, v, scale, segment_ids=None, block=...)` computes the same thing as
`attend(q, k, v, attention_mask(pos, pos, seg, seg), scale)` with pos = arange(seq), but:

- the mask is causal *by index* and is never materialised as a [batch, seq, seq] array: the causal part is a
  static constant per query block, the segment part (packing) is built per block from `segment_ids`;
- the sequence is split into query blocks of `block` rows; query block i only meets keys 0..(i+1)*block-1,
  so the fully masked upper triangle of the score matrix is skipped (to block granularity) in the forward
  and in the backward;
- grouped KV heads are never repeated: the `heads // kv_heads` query heads sharing a KV head are folded into
  the rows of one matmul ([batch, kv_heads, group*block, d] x [batch, kv_heads, keys, d]);
- `jax.custom_vjp`: the forward saves the per-row logsumexp (f32) and the output; the backward recomputes the
  probabilities block by block from the logsumexp (flash-attention style) instead of letting XLA
  differentiate through `where`/softmax over the full square score matrix.

Scores, softmax, logsumexp and the backward's row sums are float32 whatever the input dtype; the probability
matrix is cast to v.dtype for the probability x value products, as in `attend`.

A sequence length that is not a multiple of `block` is zero-padded at the end (padded keys come after every
real query, so causality already hides them; padded query rows are dropped).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_MASKED = -1e30  # same finite fill value as model.attention
DEFAULT_BLOCK = 128


def causal_attention(q, k, v, scale, segment_ids=None, block: int = DEFAULT_BLOCK):
    """Causal (by index) grouped-query attention with a blocked, recomputing backward pass.

    q [batch, heads, seq, dk], k [batch, kv_heads, seq, dk], v [batch, kv_heads, seq, dv]; heads % kv_heads == 0.
    segment_ids: optional int [batch, seq]; a query only sees keys of its own segment.
    block: query/key block size (static). Sequences not divisible by it are padded.
    Returns [batch, heads, seq, dv] in q.dtype.
    """
    b, h, t, dk = q.shape
    if k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected 4-d q, k, v; got {q.shape}, {k.shape}, {v.shape}")
    kvh = k.shape[1]
    if k.shape != (b, kvh, t, dk) or v.shape[:3] != (b, kvh, t):
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
    if h % kvh:
        raise ValueError(f"heads ({h}) must be a multiple of kv_heads ({kvh})")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [batch, seq] = {(b, t)}, got {segment_ids.shape}")
    block = int(block)
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    block = min(block, t)
    pad = (-t) % block
    if pad:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
        if segment_ids is not None:
            # padded slots get their own segment; they only ever see themselves and each other
            segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).min)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    o = _attention(q, k, v, segment_ids, float(scale), block)
    if pad:
        o = o[:, :, :t]
    return o


# ---------------------------------------------------------------------------------------------------------
# blocked kernels (t divisible by block). Internal layout: q as [b, kv, g, t, d] (a free reshape of
# [b, h, t, d]); per query block the g heads and block rows are folded into one row axis m = g*block.


def _row_mask(i, block, g, seg):
    """Visibility of keys 0..(i+1)*block-1 for query block i, broadcastable to [b, kv, g, block, L].

    Returns None when every key is visible (never, for a causal block: the diagonal block needs masking)."""
    L = (i + 1) * block
    rows = np.arange(i * block, L)[:, None]
    cols = np.arange(L)[None, :]
    mask = jnp.asarray(cols <= rows)[None, None, None]  # [1, 1, 1, block, L] static
    if seg is not None:
        sq = seg[:, i * block:L]
        sk = seg[:, :L]
        mask = mask & (sq[:, :, None] == sk[:, None, :])[:, None, None]
    return mask


def _q_block(x5, i, block):
    """x5 [b, kv, g, t, d] -> rows of query block i as [b, kv, g*block, d]."""
    b, kvh, g, _, d = x5.shape
    return x5[:, :, :, i * block:(i + 1) * block].reshape(b, kvh, g * block, d)


def _scores(qi, k, i, block, g, seg, scale):
    """Masked f32 scores of query block i, [b, kv, g, block, L]."""
    L = (i + 1) * block
    b, kvh = qi.shape[:2]
    s = jnp.einsum("bkmd,bksd->bkms", qi, k[:, :, :L], preferred_element_type=jnp.float32)
    s = s.reshape(b, kvh, g, block, L) * scale
    return jnp.where(_row_mask(i, block, g, seg), s, _MASKED)


def _forward(q, k, v, seg, scale, block):
    b, h, t, dk = q.shape
    kvh, dv = k.shape[1], v.shape[-1]
    g, n = h // kvh, t // block
    q5 = q.reshape(b, kvh, g, t, dk)
    outs, lses = [], []
    for i in range(n):
        L = (i + 1) * block
        s = _scores(_q_block(q5, i, block), k, i, block, g, seg, scale)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        p = (p / l).astype(v.dtype).reshape(b, kvh, g * block, L)
        o = jnp.einsum("bkms,bksd->bkmd", p, v[:, :, :L], preferred_element_type=jnp.float32)
        outs.append(o.reshape(b, kvh, g, block, dv))
        lses.append(m[..., 0] + jnp.log(l[..., 0]))  # [b, kv, g, block]
    o = jnp.concatenate(outs, axis=3).astype(q.dtype).reshape(b, h, t, dv)
    lse = jnp.concatenate(lses, axis=3)  # [b, kv, g, t] f32
    return o, lse


def _backward(q, k, v, seg, o, lse, do, scale, block):
    b, h, t, dk = q.shape
    kvh, dv = k.shape[1], v.shape[-1]
    g, n = h // kvh, t // block
    q5 = q.reshape(b, kvh, g, t, dk)
    do5 = do.reshape(b, kvh, g, t, dv)
    # D_r = sum_d dO_rd O_rd = sum_s P_rs dP_rs
    delta = jnp.sum(do5.astype(jnp.float32) * o.reshape(b, kvh, g, t, dv).astype(jnp.float32), axis=-1)
    dqs = []
    dk_acc = jnp.zeros(k.shape, jnp.float32)
    dv_acc = jnp.zeros(v.shape, jnp.float32)
    for i in range(n):
        L = (i + 1) * block
        sl = slice(i * block, L)
        qi = _q_block(q5, i, block)
        doi = _q_block(do5, i, block)
        s = _scores(qi, k, i, block, g, seg, scale)
        p = jnp.exp(s - lse[:, :, :, sl, None])  # masked entries: exp(-1e30 - lse) = 0
        dp = jnp.einsum("bkmd,bksd->bkms", doi, v[:, :, :L], preferred_element_type=jnp.float32)
        dp = dp.reshape(b, kvh, g, block, L)
        ds = (p * (dp - delta[:, :, :, sl, None]) * scale).astype(q.dtype).reshape(b, kvh, g * block, L)
        p = p.astype(v.dtype).reshape(b, kvh, g * block, L)
        dqi = jnp.einsum("bkms,bksd->bkmd", ds, k[:, :, :L], preferred_element_type=jnp.float32)
        dqs.append(dqi.reshape(b, kvh, g, block, dk))
        dki = jnp.einsum("bkms,bkmd->bksd", ds, qi, preferred_element_type=jnp.float32)
        dvi = jnp.einsum("bkms,bkmd->bksd", p, doi, preferred_element_type=jnp.float32)
        if L < t:
            dki = jnp.pad(dki, ((0, 0), (0, 0), (0, t - L), (0, 0)))
            dvi = jnp.pad(dvi, ((0, 0), (0, 0), (0, t - L), (0, 0)))
        dk_acc = dk_acc + dki
        dv_acc = dv_acc + dvi
    dq = jnp.concatenate(dqs, axis=3).reshape(b, h, t, dk).astype(q.dtype)
    return dq, dk_acc.astype(k.dtype), dv_acc.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, seg, scale, block):
    return _forward(q, k, v, seg, scale, block)[0]


def _attention_fwd(q, k, v, seg, scale, block):
    o, lse = _forward(q, k, v, seg, scale, block)
    return o, (q, k, v, seg, o, lse)


def _attention_bwd(scale, block, res, do):
    q, k, v, seg, o, lse = res
    dq, dk, dv = _backward(q, k, v, seg, o, lse, do, scale, block)
    dseg = None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)
    return dq, dk, dv, dseg


_attention.defvjp(_attention_fwd, _attention_bwd)
