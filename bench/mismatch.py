"""Sampler vs trainer: log-prob mismatch and router disagreement of one rollout batch, float32 vs bfloat16.

    python -m bench.mismatch [--rows 64] [--prompt 32] [--new 64] [--seeds 3]

The sampler (`rl.sampler.generate`, KV cache, one token at a time) and the trainer (`rl.logprobs`, one
teacher-forced pass) run the same `model.forward` on the same parameters, so any difference is numerics: the
cached decode's attention and matmuls in another order. Printed per compute dtype, for a tiny DeepSeek-V3-style
model (MLA + MoE) at random init and a small dense Qwen2-style model: mean |Δ log p| per token, the mean over
sequences of |mean Δ log p| (what a sequence-level ratio sees), the max, and the fraction of (token, MoE layer)
pairs whose expert set differs (the trainer's own routing against the sampler's).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root: see bench/common.py

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import command, header
from model import init_params
from model.config import ModelConfig, tiny_deepseek
from rl.logprobs import completion_logprobs
from rl.loop import router_disagreement
from rl.sampler import generate


def measure(cfg, rows, prompt, new, seed):
    params = init_params(cfg, seed)
    prompts = jnp.asarray(np.random.RandomState(seed).randint(1, 250, (rows, prompt)), jnp.int32)
    lens = jnp.full((rows,), prompt, jnp.int32)
    moe = cfg.moe is not None
    out = generate(cfg, params, prompts, lens, new, 1.0, jax.random.key(seed), with_routing=moe)
    logp, _, aux = completion_logprobs(cfg, params, prompts, lens, out.tokens, with_entropy=True)
    mask = np.arange(new)[None, :] < np.asarray(out.lengths)[:, None]
    d = np.abs(np.asarray(logp) - np.asarray(out.logprobs)) * mask
    seq = np.abs(((np.asarray(logp) - np.asarray(out.logprobs)) * mask).sum(1) / np.maximum(mask.sum(1), 1))
    dis = float(router_disagreement(out.routing, aux["routing"], prompt, jnp.asarray(mask, jnp.float32))) if moe \
        else float("nan")
    return d.sum() / mask.sum(), seq.mean(), d.max(), dis


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args(argv)
    models = {"tiny DeepSeek-V3 (MLA+MoE)": tiny_deepseek(vocab_size=512, max_seq_len=256),
              "small dense (GQA)": ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                                               head_dim=32, mlp_dim=384, max_seq_len=256)}
    header("bench.mismatch", torch=False)
    print(f"# {command('bench.mismatch', argv)}")
    print("| model | compute dtype | mean abs dlogp / token | mean abs seq-mean dlogp | max abs dlogp | "
          "router disagreement |")
    print("|---|---|---|---|---|---|")
    for name, cfg in models.items():
        for dtype in ("float32", "bfloat16"):
            c = dataclasses.replace(cfg, compute_dtype=dtype)
            r = np.mean([measure(c, a.rows, a.prompt, a.new, s) for s in range(a.seeds)], axis=0)
            print(f"| {name} | {dtype} | {r[0]:.2e} | {r[1]:.2e} | {r[2]:.2e} | "
                  f"{'—' if np.isnan(r[3]) else f'{r[3]:.4f}'} |", flush=True)


if __name__ == "__main__":
    main()
