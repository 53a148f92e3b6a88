"""Matmul throughput by dtype, XLA:CPU against PyTorch: does bfloat16 compute pay on this CPU (AMX, AVX512-BF16)?

    python -m bench.dtype [--shapes 4096x256x768,4096x768x256,2048x2048x2048,64x256x768] [--rounds 20]

For each M x K x N: GFLOP/s (2·M·K·N over the mean time of --rounds back-to-back calls after a warm-up) of
- XLA float32: `jax.jit(x @ w)` on float32 arrays;
- XLA bf16, cast inside: float32 inputs cast to bfloat16 inside the jitted function, `preferred_element_type` float32
  (what a bf16-compute / float32-parameter model runs: the casts are part of the cost);
- XLA bf16 inputs: bfloat16 arrays in, float32 out;
- torch.mm float32 and bfloat16 (oneDNN; torch threads = the CPU count);
- the weight-gradient form, float32: x.T @ dy with x [M, K] and dy [M, N] (contraction over the leading axis of
  both: the transposed-operand GEMM of every backward pass), XLA and torch.
XLA_FLAGS in the environment apply (e.g. --xla_cpu_use_onednn=true); the command line printed includes them.
Prints the CPU and kernel libraries (bench.common.header), a markdown table, the command, and
`RESULT xla_bf16_over_f32=<median ratio, cast inside> torch_bf16_over_f32=<..> xla_over_torch_wgrad=<..>`.
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
import numpy as np

from bench.common import command, header, n_cpus


def _rate(fn, args, flops: float, rounds: int, block) -> float:
    block(fn(*args))
    t0 = time.perf_counter()
    for _ in range(rounds):
        out = fn(*args)
    block(out)
    return flops * rounds / (time.perf_counter() - t0) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x256x768,4096x768x256,2048x2048x2048,64x256x768")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(n_cpus())
    header("bench.dtype", torch=True)
    xla = {"XLA float32": jax.jit(lambda x, w: x @ w),
           "XLA bf16 (cast inside)": jax.jit(lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                                                                  preferred_element_type=jnp.float32)),
           "XLA bf16 inputs": jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))}
    wgrad = jax.jit(lambda x, dy: x.T @ dy)
    rows = []
    for shape in args.shapes.split(","):
        m, k, n = (int(v) for v in shape.split("x"))
        flops = 2.0 * m * k * n
        x, w = np.random.default_rng(0).standard_normal((m, k), np.float32), np.ones((k, n), np.float32)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        r = {}
        for name, fn in xla.items():
            a = (xj.astype(jnp.bfloat16), wj.astype(jnp.bfloat16)) if name == "XLA bf16 inputs" else (xj, wj)
            r[name] = _rate(fn, a, flops, args.rounds, jax.block_until_ready)
        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        r["torch float32"] = _rate(torch.mm, (xt, wt), flops, args.rounds, lambda _: None)
        r["torch bf16"] = _rate(torch.mm, (xt.bfloat16(), wt.bfloat16()), flops, args.rounds, lambda _: None)
        dy = np.random.default_rng(1).standard_normal((m, n), np.float32)
        r["XLA x.T@dy"] = _rate(wgrad, (xj, jnp.asarray(dy)), flops, args.rounds, jax.block_until_ready)
        r["torch x.t()@dy"] = _rate(lambda a, b: a.t() @ b, (xt, torch.from_numpy(dy)), flops, args.rounds,
                                    lambda _: None)
        rows.append((shape, r))
    names = list(rows[0][1])
    print("\n| M x K x N | " + " | ".join(f"{n} GFLOP/s" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for shape, r in rows:
        print(f"| {shape} | " + " | ".join(f"{r[n]:,.0f}" for n in names) + " |")
    xr = statistics.median(r["XLA bf16 (cast inside)"] / r["XLA float32"] for _, r in rows)
    tr = statistics.median(r["torch bf16"] / r["torch float32"] for _, r in rows)
    print(f"\ncommand: {command('bench.dtype', argv)}")
    wr = statistics.median(r["XLA x.T@dy"] / r["torch x.t()@dy"] for _, r in rows)
    print(f"RESULT xla_bf16_over_f32={xr:.2f} torch_bf16_over_f32={tr:.2f} xla_over_torch_wgrad={wr:.2f}")


if __name__ == "__main__":
    main()
