"""Attention core timings on CPU: forward and forward+backward (grad wrt q, k, v of a weighted sum).

    python -m bench.attention [--batch 16 --heads 8 --kv-heads 2 --seqs 256,512 --head-dim 32] [--rounds 9]

Variants: `attend` with an explicit attention_mask; jax.nn.dot_product_attention(is_causal=True) on
[b, t, h, d] inputs (its native layout, KV heads not repeated); model.fast_attention.causal_attention at
several block sizes. Median of `rounds` runs after 2 warm-ups, jax.block_until_ready.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from model.attention import attend, attention_mask
from model.fast_attention import causal_attention


def timeit(f, *args, rounds):
    for _ in range(2):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--seqs", default="256,512")
    ap.add_argument("--blocks", default="32,64,128,256")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    b, h, kvh, d = args.batch, args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    print(f"devices={jax.devices()} batch={b} heads={h} kv_heads={kvh} head_dim={d}")
    for t in map(int, args.seqs.split(",")):
        ks = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(ks[0], (b, h, t, d))
        k = jax.random.normal(ks[1], (b, kvh, t, d))
        v = jax.random.normal(ks[2], (b, kvh, t, d))
        w = jax.random.normal(ks[3], (b, h, t, d))
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = attention_mask(pos, pos)

        variants = {"attend(mask)": (lambda q, k, v: attend(q, k, v, mask, scale), (q, k, v), lambda o: o)}
        tr = lambda x: jnp.transpose(x, (0, 2, 1, 3))
        variants["dot_product_attention [b,t,h,d]"] = (
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True),
            (tr(q), tr(k), tr(v)), tr)
        for blk in map(int, args.blocks.split(",")):
            if blk <= t:
                variants[f"causal_attention block={blk}"] = (
                    lambda q, k, v, blk=blk: causal_attention(q, k, v, scale, block=blk), (q, k, v), lambda o: o)
        for name, (f, xs, back) in variants.items():
            if args.only and args.only not in name:
                continue
            fwd = jax.jit(f)
            loss = lambda q, k, v, f=f, back=back: jnp.sum(w * back(f(q, k, v)))
            fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            tf = timeit(fwd, *xs, rounds=args.rounds)
            tb = timeit(fb, *xs, rounds=args.rounds)
            print(f"seq={t:4d}  {name:34s} fwd {tf:8.2f} ms   fwd+bwd {tb:8.2f} ms", flush=True)


if __name__ == "__main__":
    main()
