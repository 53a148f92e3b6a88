"""Attention core on CPU: forward and forward+backward (grad wrt q, k, v of a weighted sum of the output).

    python -m bench.attention [--batch 16 --heads 8 --kv-heads 2 --head-dim 32 --seqs 256,512]
                              [--blocks 32,64,128] [--rounds 9]

Variants, all jitted, timed round-robin (each round runs every variant once, so load from other processes
hits them alike); median wall ms over `rounds` after 2 warm-ups, plus min wall and median process CPU ms:
- `attend` (model.attention) with an explicit attention_mask(pos, pos);
- jax.nn.dot_product_attention(is_causal=True) on [b, t, h, d] inputs (its native layout; not counted:
  the transposes into it);
- model.fast_attention.causal_attention at each block size (batch_chunk chosen automatically).
Thread settings are whatever XLA_FLAGS says (run under `taskset -c 0` for the one-core numbers).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root: see bench/common.py

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from bench.common import header
from model.attention import attend, attention_mask
from model.fast_attention import causal_attention


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--seqs", default="256,512")
    ap.add_argument("--blocks", default="32,64,128")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    b, h, kvh, d = args.batch, args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    header("bench.attention", torch=False)
    print(f"# batch={b} heads={h} kv_heads={kvh} head_dim={d}")
    for t in map(int, args.seqs.split(",")):
        ks = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(ks[0], (b, h, t, d))
        k = jax.random.normal(ks[1], (b, kvh, t, d))
        v = jax.random.normal(ks[2], (b, kvh, t, d))
        w = jax.random.normal(ks[3], (b, h, t, d))
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = attention_mask(pos, pos)
        tr = lambda x: jnp.transpose(x, (0, 2, 1, 3))
        ident = lambda x: x
        variants = {"attend(mask)": (lambda q, k, v, mask=mask: attend(q, k, v, mask, scale), (q, k, v), ident),
                    "dot_product_attention": (
                        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True),
                        (tr(q), tr(k), tr(v)), tr)}
        for blk in map(int, args.blocks.split(",")):
            if blk <= t:
                variants[f"causal_attention block={blk}"] = (
                    lambda q, k, v, blk=blk: causal_attention(q, k, v, scale, block=blk), (q, k, v), ident)
        calls = {}
        for name, (f, xs, back) in variants.items():
            loss = lambda q, k, v, f=f, back=back, w=w: jnp.sum(w * back(f(q, k, v)))
            calls[name] = (jax.jit(f), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), xs)
        times = {name: ([], []) for name in calls}
        for r in range(args.rounds + 2):
            for name, (fwd, fb, xs) in calls.items():
                for fn, acc in zip((fwd, fb), times[name]):
                    t0, c0 = time.perf_counter(), time.process_time()
                    jax.block_until_ready(fn(*xs))
                    if r >= 2:
                        acc.append((time.perf_counter() - t0, time.process_time() - c0))
        print(f"\n| seq {t} | fwd ms (median / min / cpu) | fwd+bwd ms (median / min / cpu) |\n|---|---|---|")
        for name, (tf, tb) in times.items():
            cell = lambda xs: (f"{1e3 * statistics.median(a for a, _ in xs):.1f} / {1e3 * min(a for a, _ in xs):.1f}"
                               f" / {1e3 * statistics.median(c for _, c in xs):.1f}")
            print(f"| {name} | {cell(tf)} | {cell(tb)} |", flush=True)


if __name__ == "__main__":
    main()
