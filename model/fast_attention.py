"""Causal softmax attention for training on CPU, with its own backward pass.

`causal_attention(q, k, v, scale, segment_ids=None)` computes the same thing as
`attend(q, k, v, attention_mask(pos, pos, seg, seg), scale)` with pos = arange(seq) (causal by index, plus
same-segment when packing), but is written for XLA:CPU, where `attend`'s forward and especially its
autodiff backward are dominated by passes over the full [batch, heads, seq, seq] score matrix and its mask:

- Row blocks, causal skipping: the sequence is cut into query blocks of `block` rows; query block i only
  meets keys 0..end_i-1, so the upper triangle of the score matrix is skipped (to block granularity) in the
  forward and in the backward. Only the static [block, end_i] causal pattern (and, when packing, the
  segment test for those slots) is ever built, never a [batch, seq, seq] mask.
- Grouped heads, no repeat: q [b, h, t, d] is viewed as [b, kv, g, t, d] (a free reshape); the g query
  heads sharing a KV head are folded into the rows of one matmul ([b, kv, g*block, d] x [b, kv, L, d]).
- `jax.custom_vjp`, flash-attention style: the forward keeps only the output and the per-row logsumexp
  (f32); the backward recomputes each block's probabilities from the logsumexp, and uses
  dS = P * (dP - rowsum(dO * O)). No score-sized residual is stored between forward and backward.
- Cache-sized pieces: the batch is processed `batch_chunk` sequences at a time under `lax.map`, so each
  block's score/probability arrays (~1 MiB) stay in cache; on CPU this was worth ~1.5-2x over letting
  XLA run every block over the whole batch at once.
- Matmul layouts: dK = dS^T Q and dV = P^T dO contract over the row axis of both operands, which XLA:CPU
  sends to a slow generic dot. They are computed as dK^T = Q^T dS and dV^T = dO^T P with the small
  [d, rows] transposes of Q and dO materialised (an `optimization_barrier` stops XLA from folding the
  transpose back into the dot), so every matmul takes the fast path; dK^T/dV^T are transposed once at
  the end.

Everything is computed in float32 (at least): lower-precision inputs (bfloat16) are upcast on entry and
the output cast back to q.dtype, since XLA:CPU has no complete bf16 x bf16 -> f32 dot path (some of the
backward's products fail to run); bf16 speed was not measured. The last block may be shorter than
`block` (sequence lengths need not be multiples of it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_MASKED = -1e30  # same finite fill as model.attention.MASKED
DEFAULT_BLOCK = 64
_CHUNK_SCORES = 1 << 18  # target score-block elements (1 MiB f32) per lax.map step when choosing batch_chunk


def causal_attention(q, k, v, scale, segment_ids=None, block: int = DEFAULT_BLOCK, batch_chunk: int | None = None):
    """Causal (by index) grouped-query attention with a blocked, recomputing backward pass.

    q [batch, heads, seq, dk], k [batch, kv_heads, seq, dk], v [batch, kv_heads, seq, dv];
    heads % kv_heads == 0; dk may differ from dv.
    scale: Python float multiplying q.k.
    segment_ids: optional int [batch, seq]; a query then only sees keys of its own segment (packing).
    block: query block size (static); the last block may be shorter.
    batch_chunk: sequences processed per `lax.map` step (must divide batch); None picks one so that a
      block's scores are about 1 MiB.
    Computed in float32 (bfloat16 inputs are upcast). Returns [batch, heads, seq, dv] in q.dtype.
    Equal (to float rounding) to `attend(q, k, v, attention_mask(pos, pos, seg, seg), scale)` with
    pos = arange(seq) and seg = segment_ids.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected 4-d q, k, v; got {q.shape}, {k.shape}, {v.shape}")
    b, h, t, dk = q.shape
    kvh = k.shape[1]
    if k.shape != (b, kvh, t, dk) or v.shape[:3] != (b, kvh, t):
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
    if kvh == 0 or h % kvh:
        raise ValueError(f"heads ({h}) must be a multiple of kv_heads ({kvh})")
    if segment_ids is not None:
        if segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids must be [batch, seq] = {(b, t)}, got {segment_ids.shape}")
        segment_ids = segment_ids.astype(jnp.int32)
    block = int(block)
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    block = min(block, t)
    if batch_chunk is None:
        batch_chunk = _auto_chunk(b, h, t, block)
    batch_chunk = int(batch_chunk)
    if batch_chunk < 1 or b % batch_chunk:
        raise ValueError(f"batch_chunk ({batch_chunk}) must divide batch ({b})")
    out_dtype = q.dtype
    compute = jnp.promote_types(jnp.promote_types(q.dtype, v.dtype), jnp.float32)
    q, k, v = q.astype(compute), k.astype(compute), v.astype(compute)
    return _attention(q, k, v, segment_ids, float(scale), block, batch_chunk).astype(out_dtype)


def _auto_chunk(b, h, t, block):
    """Largest divisor of b with chunk * heads * block * seq <= _CHUNK_SCORES (at least 1)."""
    best = 1
    for c in range(1, b + 1):
        if b % c == 0 and c * h * block * t <= _CHUNK_SCORES:
            best = c
    return best


# ---------------------------------------------------------------------------------------------------------
# custom_vjp over the whole batch; the kernels below run on one batch chunk at a time.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, seg, scale, block, chunk):
    return _attention_fwd(q, k, v, seg, scale, block, chunk)[0]


def _attention_fwd(q, k, v, seg, scale, block, chunk):
    o, lse = _chunked(lambda q, k, v, seg: _forward(q, k, v, seg, scale, block), chunk, q, k, v, seg)
    return o, (q, k, v, seg, o, lse)


def _attention_bwd(scale, block, chunk, res, do):
    q, k, v, seg, o, lse = res
    dq, dk, dv = _chunked(lambda q, k, v, o, lse, do, seg: _backward(q, k, v, seg, o, lse, do, scale, block),
                          chunk, q, k, v, o, lse, do, seg)
    dseg = None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)
    return dq, dk, dv, dseg


_attention.defvjp(_attention_fwd, _attention_bwd)


def _chunked(fn, chunk, *xs):
    """fn over leading-axis chunks of `chunk` rows of xs (None entries passed through), via lax.map."""
    b = xs[0].shape[0]
    if chunk >= b:
        return fn(*xs)
    nb = b // chunk
    present = [i for i, x in enumerate(xs) if x is not None]

    def body(parts):
        args = list(xs)
        for i, p in zip(present, parts):
            args[i] = p
        return fn(*args)

    split = tuple(xs[i].reshape((nb, chunk) + xs[i].shape[1:]) for i in present)
    out = jax.lax.map(body, split)
    return jax.tree.map(lambda y: y.reshape((b,) + y.shape[2:]), out)


def _blocks(t, block):
    return [(s, min(s + block, t)) for s in range(0, t, block)]


def _visible(s, e, seg):
    """Keys 0..e-1 visible to queries s..e-1: bool broadcastable to [b, kv, g, e-s, e]."""
    causal = jnp.asarray(np.arange(e)[None, :] <= np.arange(s, e)[:, None])
    if seg is None:
        return causal
    same = seg[:, s:e, None] == seg[:, None, :e]  # [b, rows, e]
    return (causal & same)[:, None, None]


def _rows(x5, s, e):
    """x5 [b, kv, g, t, d] -> rows s..e-1 of every head in the group as [b, kv, g*(e-s), d]."""
    b, kvh, g, _, d = x5.shape
    return x5[:, :, :, s:e].reshape(b, kvh, g * (e - s), d)


def _scores(qi, k, e, g, scale):
    """Scaled scores [b, kv, g, rows, e] of a query block against keys 0..e-1."""
    b, kvh, m, _ = qi.shape
    s = jnp.einsum("bkmd,bksd->bkms", qi, k[:, :, :e])
    return s.reshape(b, kvh, g, m // g, e) * scale


# Kernels: q, k, v share one float dtype (float32 in practice); `seg` is None or int32 [b, t].


def _forward(q, k, v, seg, scale, block):
    """-> o [b, h, t, dv], lse [b, kv, g, t]."""
    b, h, t, dk = q.shape
    kvh, dv = k.shape[1], v.shape[-1]
    g = h // kvh
    q5 = q.reshape(b, kvh, g, t, dk)
    outs, lses = [], []
    for s, e in _blocks(t, block):
        r = e - s
        x = jnp.where(_visible(s, e, seg), _scores(_rows(q5, s, e), k, e, g, scale), _MASKED)
        m = jnp.max(x, axis=-1, keepdims=True)
        p = jnp.exp(x - m)
        l = jnp.sum(p, axis=-1)
        o = jnp.einsum("bkms,bksd->bkmd", p.reshape(b, kvh, g * r, e), v[:, :, :e])
        outs.append(o.reshape(b, kvh, g, r, dv) / l[..., None])  # normalise the small output, not p
        lses.append(m[..., 0] + jnp.log(l))
    o = jnp.concatenate(outs, axis=3).reshape(b, h, t, dv)
    return o, jnp.concatenate(lses, axis=3)


def _backward(q, k, v, seg, o, lse, do, scale, block):
    b, h, t, dk = q.shape
    kvh, dv = k.shape[1], v.shape[-1]
    g = h // kvh
    q5 = q.reshape(b, kvh, g, t, dk)
    do5 = do.reshape(b, kvh, g, t, dv)
    # D_r = sum_d dO_rd O_rd (= sum_s P_rs dP_rs)
    delta = jnp.sum(do5 * o.reshape(b, kvh, g, t, dv), axis=-1)
    dqs = []
    dk_t = jnp.zeros((b, kvh, dk, t), q.dtype)  # accumulated transposed: [d, keys]
    dv_t = jnp.zeros((b, kvh, dv, t), q.dtype)
    for s, e in _blocks(t, block):
        r = e - s
        qi, doi = _rows(q5, s, e), _rows(do5, s, e)
        x = _scores(qi, k, e, g, scale)
        p = jnp.where(_visible(s, e, seg), jnp.exp(x - lse[:, :, :, s:e, None]), 0.0)
        dp = jnp.einsum("bkmd,bksd->bkms", doi, v[:, :, :e])
        ds = p * (dp.reshape(b, kvh, g, r, e) - delta[:, :, :, s:e, None])  # dL/dx, without the scale
        ds = ds.reshape(b, kvh, g * r, e)
        p = p.reshape(b, kvh, g * r, e)
        dq = jnp.einsum("bkms,bksd->bkmd", ds, k[:, :, :e])
        dqs.append(dq.reshape(b, kvh, g, r, dk))
        # dK^T = Q^T dS, dV^T = dO^T P with Q^T, dO^T materialised (else XLA folds them into a slow dot)
        qi_t, doi_t = jax.lax.optimization_barrier((jnp.swapaxes(qi, 2, 3), jnp.swapaxes(doi, 2, 3)))
        pad = ((0, 0), (0, 0), (0, 0), (0, t - e))
        dk_t = dk_t + jnp.pad(jnp.einsum("bkdm,bkms->bkds", qi_t, ds), pad)
        dv_t = dv_t + jnp.pad(jnp.einsum("bkdm,bkms->bkds", doi_t, p), pad)
    dq = (jnp.concatenate(dqs, axis=3) * scale).reshape(b, h, t, dk)
    return dq, jnp.swapaxes(dk_t, 2, 3) * scale, jnp.swapaxes(dv_t, 2, 3)
