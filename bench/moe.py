"""The routed-expert MoE layer alone, per implementation: does its cost follow k (chosen) or E (existing)?

    python -m bench.moe [--tokens 2048] [--d 128] [--f 64] [--experts 16,64,256] [--k 4,6,8] [--rounds 3]
                        [--impls dense,capacity,dropless]

For each (E, k, impl): a `model.moe.MoE` layer (no shared expert, sigmoid routing, one group, capacity_factor
1.25), x [1, tokens, d] float32 on one CPU device; forward and forward+backward (grad of sum(y²) w.r.t. x and all
parameters), each jitted; one warm-up call, then the median of --rounds timed calls. Prints tokens/s and
FLOPs executed (XLA cost_analysis of the compiled program) over FLOPs needed (routed experts only: 6·n·k·d·f
forward, 3× that for forward+backward). Also prints the CPU model, the kernel libraries (bench.common.header) and
the command line.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root: see bench/common.py

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from bench.common import command, header, med, timed
from model.config import MoEConfig, tiny_deepseek
from model.layers import KeyGen
from model.moe import MoE


def layer_fns(e: int, k: int, impl: str, d: int, f: int):
    moe = MoEConfig(n_routed_experts=e, n_shared_experts=0, experts_per_token=k, mlp_dim=f, first_k_dense=0,
                    impl=impl, capacity_factor=1.25)
    cfg = tiny_deepseek(d_model=d, moe=moe)
    gdef, state = nnx.split(MoE(cfg, KeyGen(jax.random.key(0))))

    def fwd(state, x):
        return nnx.merge(gdef, state)(x)[0]

    def loss(state, x):
        return jnp.sum(jnp.square(fwd(state, x)))

    return state, jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--f", type=int, default=64)
    ap.add_argument("--experts", default="16,64,256")
    ap.add_argument("--k", default="4,6,8")
    ap.add_argument("--impls", default="dense,capacity,dropless")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    header("bench.moe", torch=False)
    print(f"command: {command('bench.moe', argv)}", flush=True)
    n, d, f = args.tokens, args.d, args.f
    x = jax.random.normal(jax.random.key(1), (1, n, d), jnp.float32)
    print(f"\nMoE layer alone, {n} tokens, d {d}, expert FFN {f}, capacity_factor 1.25, float32, 1 device\n")
    print("| E | k | impl | fwd tok/s | fwd FLOPs executed / needed | fwd+bwd tok/s | fwd+bwd executed / needed |")
    print("|---|---|---|---|---|---|---|")
    dense_cache = {}
    for e in (int(v) for v in args.experts.split(",")):
        for k in (int(v) for v in args.k.split(",")):
            need = 6.0 * n * k * d * f
            for impl in args.impls.split(","):
                key = (e, impl)
                if impl == "dense" and key in dense_cache:  # dense cost does not depend on k: time it once per E
                    tf, fl_f, tb, fl_b = dense_cache[key]
                else:
                    state, fwd, grad = layer_fns(e, k, impl, d, f)
                    fl_f = fwd.lower(state, x).compile().cost_analysis()["flops"]
                    fl_b = grad.lower(state, x).compile().cost_analysis()["flops"]
                    tf, tb = (med(timed(lambda fn=fn: jax.block_until_ready(fn(state, x)), args.rounds))
                              for fn in (fwd, grad))
                    if impl == "dense":
                        dense_cache[key] = (tf, fl_f, tb, fl_b)
                print(f"| {e} | {k} | {impl} | {n / tf:,.0f} | {fl_f / need:.2f} | {n / tb:,.0f} | "
                      f"{fl_b / (3 * need):.2f} |", flush=True)


if __name__ == "__main__":
    main()
