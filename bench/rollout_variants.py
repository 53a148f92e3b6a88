"""Variants of ours in `bench/rollout.py`, each timed in its own process (`python -m bench.rollout --variant ...`,
which prints an `OURS tok_s=... tokens=<checksum>` line):

- `--xla-sweep`: ours under several XLA_FLAGS thread settings, and split over 2 XLA CPU devices;
- `--what-if`: WHAT-IF ONLY, a local variant of `rl.sampler.generate`'s decode loop, never patched into the library:
  `whatif_generate` runs generate's loop (temperature 1, no EOS handling) from the sampler's own `prefill` and
  `decode_step` with the per-step sampling swappable. `loop` uses the library's `sample_token` (the control: the same
  tokens as generate, and its cost against `base` is the cost of the loop itself); `samp` draws with Gumbel-max as
  max + first index of the max instead of argmax (a slow variadic reduce on XLA:CPU), the same tokens. The token
  checksum (fixed key) shows the samples do not change. What-ifs inside the model (projection layouts, decode
  attention, prefill head) would need library modules patched and are not offered: change the library and rerun.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

import rl.sampler as S
from bench.common import REPO_ROOT
from model.config import ModelConfig


# ---- what-if: a local variant of generate's loop, never patched into the library ------------------------------

def library_sampler(last, keys):
    """the library's `rl.sampler.sample_token` in the what-if loop (the control)"""
    return S.sample_token(last, keys, temperature=1.0, top_k=0, top_p=1.0, greedy=False, vocab_limit=None)[:2]


def gumbel_first_max(last, keys):
    """Gumbel-max as max + first index of the max (not argmax, a slow variadic reduce on XLA:CPU)

    The same draw as jax.random.categorical per row (argmax of logits + Gumbel noise of the row's key)."""
    g = last + jax.vmap(lambda k: jax.random.gumbel(k, last.shape[1:], last.dtype))(keys)
    m = jnp.max(g, axis=-1, keepdims=True)
    tok = jnp.min(jnp.where(g == m, jnp.arange(g.shape[-1]), g.shape[-1]), axis=-1).astype(jnp.int32)
    return tok, jnp.take_along_axis(jax.nn.log_softmax(last, axis=-1), tok[:, None], axis=-1)[:, 0]


WHATIF_SAMPLERS = {"loop": library_sampler, "samp": gumbel_first_max}


def whatif_generate(cfg: ModelConfig, new: int, sample):
    """WHAT-IF ONLY: `rl.sampler.generate`'s decode loop at temperature 1 without EOS handling, built from the
    sampler's own `prefill` and `decode_step`, with `sample(logits, row keys) -> (tokens, log-probs)` swappable.
    Row keys are derived as generate derives them (fold_in(rng, row), then the step), so the control
    (`library_sampler`) draws generate's tokens. Returns a
    jitted fn(params, prompts, lens, rng) -> (tokens [batch, new], log-probs)."""
    @jax.jit
    def run(params, prompts, lens, rng):
        b = prompts.shape[0]
        last, cache = S.prefill(cfg, params, prompts, lens, new)
        row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(b))

        def body(i, carry):
            last, cache, toks, lps, rng = carry
            tok, lp = sample(last, jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, i))
            toks, lps = toks.at[:, i].set(tok), lps.at[:, i].set(lp)
            last, cache = S.decode_step(cfg, params, tok, lens + i, cache)
            return last, cache, toks, lps, rng

        init = (last, cache, jnp.zeros((b, new), jnp.int32), jnp.zeros((b, new), jnp.float32), rng)
        return jax.lax.fori_loop(0, new, body, init)[2:4]
    return run


WHAT_IF = ["base", "loop", "samp", "2dev", "2dev+loop", "2dev+samp"]


def _ours_in_subprocess(args, xla_flags: str | None, devices: int, variant: str = "none"):
    """Run ours alone in a fresh process; its OURS line (tok_s, ms, cpu_s, clean, token checksum) or None."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    cmd = [sys.executable, "-m", "bench.rollout", "--no-torch", "--no-tunix", "--also-devices", "0",
           "--rounds", str(args.sweep_rounds), "--budget", "60", "--batch", str(args.batch), "--prompt",
           str(args.prompt), "--new", str(args.new), "--max-others", str(args.max_others), "--quiet-wait",
           str(args.quiet_wait), "--devices", str(devices), "--variant", variant]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    m = re.search(r"^OURS tok_s=([\d.nan]+) ms=([\d.nan]+) cpu_s=([\d.nan]+) clean=(\w+) tokens=(\d+)", r.stdout, re.M)
    if not m:
        print(r.stdout[-1500:], r.stderr[-1500:], file=sys.stderr)
        return None
    return float(m.group(1)), float(m.group(2)), float(m.group(3)), m.group(4), m.group(5)


def what_if(args):
    rows = []
    for combo in WHAT_IF:
        names = set(combo.split("+"))
        devices = 2 if "2dev" in names else 1
        variant = next((n for n in names if n in WHATIF_SAMPLERS), "none")
        flags = "--xla_force_host_platform_device_count=2" if devices == 2 else None
        rows.append((combo, _ours_in_subprocess(args, flags, devices, variant)))
    base = rows[0][1][0] if rows[0][1] else float("nan")
    print("\n### What-if: `whatif_generate` (a local variant of generate's loop; each in its own process)\n")
    print("| variant | new tok/s | ms per call | CPU-s per call | vs base | clean | token checksum |")
    print("|---|---|---|---|---|---|---|")
    for combo, r in rows:
        if r is None:
            print(f"| {combo} | failed | | | | | |")
        else:
            tps, ms, cpu, clean, ck = r
            print(f"| {combo} | {tps:,.0f} | {ms:,.0f} | {cpu:.2f} | {tps / base:.2f}x | {clean} | {ck} |")


# ---- XLA flags ------------------------------------------------------------------------------------------------

XLA_VARIANTS = [  # (label, XLA_FLAGS, --devices)
    ("default (no XLA_FLAGS)", None, 1),
    ("--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
     "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1", 1),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=false",
     "--xla_cpu_enable_concurrency_optimized_scheduler=false", 1),
    ("--xla_cpu_use_xnnpack=false", "--xla_cpu_use_xnnpack=false", 1),
    ("--xla_force_host_platform_device_count=2, batch split over 2 devices (mesh data=2)",
     "--xla_force_host_platform_device_count=2", 2),
]


def xla_sweep(args):
    rows = [(label, _ours_in_subprocess(args, flags, devices)) for label, flags, devices in XLA_VARIANTS]
    print("\n### ours under XLA_FLAGS thread settings (each in its own process)\n")
    print("| XLA_FLAGS | new tok/s | ms per call | CPU-s per call | clean |\n|---|---|---|---|---|")
    for label, r in rows:
        if r is None:
            print(f"| `{label}` | failed | | | |")
        else:
            tps, ms, cpu, clean, _ = r
            print(f"| `{label}` | {tps:,.0f} | {ms:,.0f} | {cpu:.2f} | {clean} |")
