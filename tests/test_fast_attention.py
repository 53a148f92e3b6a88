"""model.fast_attention.causal_attention against model.attention.attend with an explicit position mask:
forward and gradients wrt q, k, v (of a random weighted sum), for MHA, GQA, dk != dv (MLA), packed segments,
sequence lengths that are not multiples of the block, batch chunking (lax.map) and bfloat16 inputs.
Shapes are small and few: the blocked kernel unrolls one set of ops per block and compiles in ~1 s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import attend, attention_mask
from model.fast_attention import causal_attention

TOL = 1e-5


def _inputs(b, h, kvh, t, dk, dv, seed=0, segments=False):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    q, k, v, w = normal(b, h, t, dk), normal(b, kvh, t, dk), normal(b, kvh, t, dv), normal(b, h, t, dv)
    seg = jnp.asarray(np.sort(rng.integers(0, 4, (b, t), np.int32), axis=1)) if segments else None
    return q, k, v, w, seg


def _reference(q, k, v, scale, seg):
    b, t = q.shape[0], q.shape[2]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return attend(q, k, v, attention_mask(pos, pos, seg, seg), scale)


def _check(b, h, kvh, t, dk, dv, block, segments=False, batch_chunk=None, seed=0):
    q, k, v, w, seg = _inputs(b, h, kvh, t, dk, dv, seed, segments)
    scale = dk ** -0.5
    ref = lambda q, k, v, seg: _reference(q, k, v, scale, seg)
    new = lambda q, k, v, seg: causal_attention(q, k, v, scale, seg, block=block, batch_chunk=batch_chunk)

    def out_and_grads(f):  # one compile per implementation: output and d(sum(w * out))/d(q, k, v)
        loss = lambda q, k, v, seg: (jnp.sum(w * (o := f(q, k, v, seg))), o)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v, seg)

    grads, out = out_and_grads(new)
    grads_ref, out_ref = out_and_grads(ref)
    assert out.shape == (b, h, t, dv) and out.dtype == q.dtype
    np.testing.assert_allclose(out, out_ref, atol=TOL, rtol=TOL)
    for name, a, r in zip("qkv", grads, grads_ref):
        np.testing.assert_allclose(a, r, atol=TOL * max(1.0, float(jnp.abs(r).max())), rtol=TOL, err_msg=f"d{name}")


@pytest.mark.parametrize(("b", "h", "kvh", "t", "dk", "dv", "block", "segments", "batch_chunk"), [
    (2, 4, 4, 32, 16, 16, 16, False, None),  # MHA, 2 blocks
    (2, 8, 2, 32, 16, 16, 16, False, 1),     # GQA 8 heads / 2 kv, lax.map over batch chunks
    (2, 4, 4, 24, 48, 32, 16, False, None),  # MLA-like dk != dv; ragged blocks 16 + 8
    (2, 8, 2, 28, 16, 8, 16, True, None),    # GQA + packed segments; ragged blocks 16 + 12
], ids=["mha", "gqa_chunked", "dk_ne_dv_ragged", "gqa_segments_ragged"])
def test_matches_attend(b, h, kvh, t, dk, dv, block, segments, batch_chunk):
    _check(b, h, kvh, t, dk, dv, block, segments=segments, batch_chunk=batch_chunk)


def test_bfloat16_runs_and_is_close():
    q, k, v, w, _ = _inputs(2, 4, 2, 24, 16, 16)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))

    def loss(q, k, v):
        o = causal_attention(q, k, v, 0.25, block=64)  # block > seq: a single block
        return jnp.sum(w * o.astype(jnp.float32)), o

    g, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(qb, kb, vb)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), _reference(q, k, v, 0.25, None), atol=5e-2)
    assert all(x.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in g)


def test_bad_shapes_raise():
    q, k, v, _, _ = _inputs(2, 6, 4, 16, 8, 8)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        causal_attention(q, k, v, 1.0)
    q, k, v, _, _ = _inputs(2, 4, 2, 16, 8, 8)
    with pytest.raises(ValueError, match="batch_chunk"):
        causal_attention(q, k, v, 1.0, batch_chunk=3)
    with pytest.raises(ValueError, match="segment_ids"):
        causal_attention(q, k, v, 1.0, segment_ids=jnp.zeros((2, 15), jnp.int32))
