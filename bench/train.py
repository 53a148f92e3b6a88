"""Training-step throughput and MFU of `train.step.Trainer` on CPU, side by side with Hugging Face transformers.

    python -m bench.train [--configs small,tiny] [--batch 16 --seq 256] [--steps 7] [--warmup 2] [--no-torch]
                          [--dtype bfloat16]
                          [--budget 75] [--max-others 0.1] [--devices 1] [--breakdown] [--profile]

In one process:
1. float32 matmul peak: `jax.jit(jnp.dot)` on 2048x2048 (--peak-n), GFLOP/s = 2n^3/t; a sample is 4 back-to-back dots;
   9 samples at the start plus one in every timed round; the peak is their median (torch.mm is printed too).
   Shared machines: every timed call also reads /proc/stat, and is *clean* if other processes (and hypervisor
   steal) used less than --max-others (10 %) of the machine's CPU capacity meanwhile. Medians are taken over
   the clean samples when there are at least 3 (else over all, flagged "contended"), and rounds continue
   (up to --budget seconds per config) until --steps clean rounds per peer are in.
2. for each config (small = small_qwen2(), tiny = tiny_deepseek()):
   ours: `Trainer(cfg, OptimConfig(), LossConfig(), make_mesh(MeshConfig(data=1), jax.devices()[:1]))`, a random
   token batch [batch, seq] (inputs / targets = inputs shifted by one / loss_mask of ones), `warmup` steps (the
   first compiles), then timed steps, each blocked on the new state and the metrics;
   theirs (bench.peers.HFTrain): transformers Qwen2ForCausalLM (small) / DeepseekV3ForCausalLM (tiny) built from
   the same config through `model.hf.config_to_hf`, PyTorch eager on CPU, SDPA attention,
   torch.set_num_threads(cpu count), on the same batch: forward, masked token cross-entropy, loss.backward(), clip_grad_norm_(1.0), torch.optim.AdamW(betas=(0.9, 0.95), wd=0.1).
   Rounds are interleaved (peak sample, ours, theirs, peak sample, ours, theirs, ...).
   tokens/s = batch*seq / median step time; MFU = flops_per_token(cfg, seq) * tokens/s / matmul peak; also the
   CPU-seconds per step and "MFU per CPU-s" (FLOPs per CPU-second of the step / per CPU-second of the dot).
3. `--breakdown`: the attention core fwd+bwd at the training shapes timed alone (the model's path,
   `self_attention` -> `causal_attention`, and the masked `attend`), times the attention layers, against the step;
   for dense configs also the MLP matmuls and the SiLU backward with/without the transpose XLA fuses into it.
   `--profile`: a jax.profiler trace of the train step, per-HLO-op time by component (attention core, MoE routed
   experts, the rest, optimizer) and op type (matmul, layout copies, elementwise), fwd/bwd.
   `--devices N`: a data-parallel mesh over N JAX devices (on CPU with
   XLA_FLAGS=--xla_force_host_platform_device_count=N).

Thread settings are the process environment's; see docs/benchmarks.md for the XLA_FLAGS comparison.
Starts with the CPU model and the kernel libraries each side runs (bench.common.header); prints a markdown table,
the command line, and as its last line
`RESULT mfu=<fraction> speedup_vs_transformers=<ratio> moe_speedup_vs_transformers=<ratio>`: MFU and speed ratio
for the small config, speed ratio for the tiny MoE config (nan where not measured).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root: see bench/common.py

import argparse
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import (
    MAX_OTHERS,
    MatmulPeak,
    command,
    header,
    measure,
    med,
    n_cpus,
    pick,
    torch_peak,
)
from bench.peers import HFTrain
from bench.profile import print_train_profile, trace_ops
from model import count_params, flops_per_token
from model.config import ModelConfig, small_qwen2, tiny_deepseek
from sharding.mesh import MeshConfig, make_mesh
from train.config import LossConfig, OptimConfig
from train.step import Trainer

CONFIGS = {"small": small_qwen2, "tiny": tiny_deepseek}
OPTIM = {"lr": 3e-3, "warmup_steps": 20, "total_steps": 1000, "b1": 0.9, "b2": 0.95, "weight_decay": 0.1,
         "clip_norm": 1.0}


# ---- batch ----------------------------------------------------------------------------------------------

def make_tokens(cfg: ModelConfig, batch: int, seq: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)


# ---- ours -----------------------------------------------------------------------------------------------

class Ours:
    def __init__(self, cfg: ModelConfig, tokens: np.ndarray, devices: int = 1):
        self.cfg = cfg
        mesh = make_mesh(MeshConfig(data=devices), jax.devices()[:devices])
        self.trainer = Trainer(cfg, OptimConfig(**OPTIM), LossConfig(), mesh)
        self.state = self.trainer.init_state(0)
        self.batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
                      "loss_mask": jnp.ones(tokens[:, 1:].shape, jnp.float32)}
        self.losses = []

    def step(self):
        self.state, metrics = self.trainer.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.losses.append(float(metrics["loss"]))


# ---- breakdown / profile --------------------------------------------------------------------------------

def attention_alone(cfg: ModelConfig, batch: int, seq: int, max_others: float, rounds: int = 5) -> dict:
    """Seconds for one layer's attention core forward+backward at the training shapes: the path the model takes
    without a cache (`model.attention.self_attention`, mask None) and, for reference, the masked `attend`."""
    from model import attention as A
    ks = jax.random.split(jax.random.key(0), 4)
    if cfg.mla is None:
        h, kvh, dk, dv = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim
    else:
        h, kvh, dk, dv = cfg.n_heads, cfg.n_heads, cfg.mla.qk_head_dim, cfg.mla.v_head_dim
    q = jax.random.normal(ks[0], (batch, h, seq, dk))
    k = jax.random.normal(ks[1], (batch, kvh, seq, dk))
    v = jax.random.normal(ks[2], (batch, kvh, seq, dv))
    w = jax.random.normal(ks[3], (batch, h, seq, dv))
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    variants = {"model path": lambda q, k, v: A.self_attention(q, k, v, {"mask": None, "segment_ids": None},
                                                                cfg.attn_scale),
                "masked attend": lambda q, k, v: A.attend(q, k, v, A.attention_mask(pos, pos), cfg.attn_scale)}
    out = {}
    for name, f in variants.items():
        fb = jax.jit(jax.value_and_grad(lambda q, k, v, f=f: jnp.sum(w * f(q, k, v)), argnums=(0, 1, 2)))
        call = lambda fb=fb: jax.block_until_ready(fb(q, k, v))
        for _ in range(2):
            call()
        xs, _ = pick([measure(call) for _ in range(rounds)], 3, max_others)
        out[name] = med([x.wall for x in xs])
    return out


def micro(cfg: ModelConfig, batch: int, seq: int, max_others: float, rounds: int = 7) -> dict:
    """ms of pieces that the profile shows as costly, alone: the MLP's matmuls at the training shapes (and their
    GFLOP/s), and the SiLU backward with and without the transpose that XLA fuses into it for the weight grad."""
    n, d, f = batch * seq, cfg.d_model, cfg.mlp_dim
    ks = jax.random.split(jax.random.key(0), 4)
    x, w = jax.random.normal(ks[0], (n, d)), jax.random.normal(ks[1], (d, f))
    h, g = jax.random.normal(ks[2], (n, f)), jax.random.normal(ks[3], (n, f))
    silu_grad = lambda h, g: jax.vjp(jax.nn.silu, h)[1](g)[0]
    cases = {
        f"x[{n},{d}] @ W[{d},{f}] (MLP up, fwd)": (lambda x, w: x @ w, (x, w), 2 * n * d * f),
        f"x^T @ dY -> dW[{d},{f}] (MLP weight grad)": (lambda x, g: x.T @ g, (x, g), 2 * n * d * f),
        f"SiLU backward [{n},{f}]": (silu_grad, (h, g), 0),
        f"transpose [{n},{f}] -> [{f},{n}]": (lambda h: h.T + 0.0, (h,), 0),
        f"SiLU backward, transposed -> [{f},{n}]": (lambda h, g: silu_grad(h, g).T + 0.0, (h, g), 0),
    }
    out = {}
    for name, (fn, xs, flops) in cases.items():
        fn = jax.jit(fn)
        call = lambda fn=fn, xs=xs: jax.block_until_ready(fn(*xs))
        for _ in range(2):
            call()
        sel, _ = pick([measure(call) for _ in range(rounds)], 3, max_others)
        t = med([x.wall for x in sel])
        out[name] = (t, flops / t / 1e9 if flops else float("nan"))
    return out


def profile_step(ours: Ours, calls: int = 2) -> list[tuple[str, float, str]]:
    """Per-HLO-op time (ms per step, summed over threads) from a jax.profiler trace of the train step."""
    hlo = ours.trainer._step.lower(ours.state, ours.batch).compile().as_text()

    def step():
        ours.step()
        return ours.state
    return trace_ops(step, hlo, calls, "train")


# ---- main -----------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="small,tiny", help="comma list of " + ",".join(CONFIGS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=7, help="timed interleaved rounds wanted (clean ones; median)")
    ap.add_argument("--budget", type=float, default=75.0,
                    help="seconds per config to keep adding rounds while fewer than --steps are clean")
    ap.add_argument("--max-others", type=float, default=MAX_OTHERS,
                    help="a round is clean if other processes used less than this fraction of the machine")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    ap.add_argument("--devices", type=int, default=1,
                    help="data-parallel mesh over this many JAX devices (>1 needs "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU)")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers peer")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="compute dtype over float32 parameters: ours model.compute_dtype, transformers "
                         "torch.autocast('cpu', bfloat16); MFU stays against the float32 peak")
    ap.add_argument("--peak-n", type=int, default=2048,
                    help="matmul size of the float32 peak (figures quote 2048; smaller only for smoke tests)")
    ap.add_argument("--breakdown", action="store_true", help="time the attention core fwd+bwd alone")
    ap.add_argument("--profile", action="store_true", help="jax.profiler per-op time of one train step")
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for n in names:
        if n not in CONFIGS:
            ap.error(f"unknown config {n!r}; choose from {sorted(CONFIGS)}")

    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(os.cpu_count() or 1)
        except ImportError as e:
            print(f"torch unavailable ({e}); skipping the transformers peer")
            args.no_torch = True
    header("bench.train", torch=not args.no_torch)
    print(f"devices={jax.devices()}", flush=True)
    mo = args.max_others
    load0 = os.getloadavg()[0]
    pk = MatmulPeak(args.peak_n)
    pk.sample(9, warmup=1)
    st = pk.stats(mo)
    print(f"float32 matmul peak ({pk.label()}): {st['gflops']:.1f} GFLOP/s "
          f"(median of {st['n']}/{st['of']} samples); load average {load0:.2f}", flush=True)
    tpeak = float("nan")
    if not args.no_torch:
        tpeak = torch_peak(args.peak_n)
        print(f"torch.mm {args.peak_n}^2 ({torch.get_num_threads()} threads): {tpeak:.1f} GFLOP/s", flush=True)

    rows, result, nan = [], {}, float("nan")
    tokens_per_step = args.batch * args.seq
    for name in names:
        cfg = dataclasses.replace(CONFIGS[name](), compute_dtype=args.dtype)
        fpt = flops_per_token(cfg, args.seq)
        tokens = make_tokens(cfg, args.batch, args.seq)
        t0 = time.perf_counter()
        ours = Ours(cfg, tokens, args.devices)
        ours.step()  # compiles
        compile_s = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            ours.step()
        peers = {"ours": ours}
        err = None
        if not args.no_torch:
            try:
                theirs = HFTrain(cfg, tokens, OPTIM, autocast=args.dtype == "bfloat16")
                for _ in range(args.warmup):
                    theirs.step()
                peers["transformers"] = theirs
            except Exception as e:  # noqa: BLE001  report, don't die: the JAX numbers still stand
                err = f"{type(e).__name__}: {e}"
                print(f"[{name}] transformers peer failed: {err}", flush=True)
        samples = {k: [] for k in peers}
        t_start, r = time.perf_counter(), 0
        while True:  # interleaved rounds: peak sample, ours, theirs
            pk.sample()
            for k, peer in peers.items():
                samples[k].append(measure(peer.step))
            print(f"[{name}] round {r}: " + ", ".join(
                f"{k} {v[-1].wall:.3f} s (cpu {v[-1].cpu:.2f} s, others {v[-1].others:.0%})"
                for k, v in samples.items()), flush=True)
            r += 1
            enough = all(sum(x.clean(mo) for x in v) >= args.steps for v in samples.values())
            if r >= args.steps and (enough or time.perf_counter() - t_start > args.budget or r >= 4 * args.steps):
                break
        row = {"name": name, "params": count_params(cfg), "fpt": fpt, "compile_s": compile_s, "err": err,
               "rounds": r, "loss": (ours.losses[0], ours.losses[-1]), "peers": {}}
        for k, v in samples.items():
            xs, clean = pick(v, min(3, args.steps), mo)
            wall = [x.wall for x in xs]
            row["peers"][k] = {"wall": med(wall), "lo": min(wall), "hi": max(wall), "cpu": med([x.cpu for x in xs]),
                               "n": len(xs), "of": len(v), "clean": clean, "tok": tokens_per_step / med(wall),
                               "best": tokens_per_step / min(x.wall for x in v),
                               "loss": (peers[k].losses[0], peers[k].losses[-1])}
        rows.append(row)
        for k in ("ours", "transformers"):
            if k in row["peers"]:
                print(f"[{name}] {k}: {row['peers'][k]['tok']:,.0f} tok/s over {row['peers'][k]['n']}/"
                      f"{row['peers'][k]['of']} {'clean ' if row['peers'][k]['clean'] else ''}rounds", flush=True)
        w = row["peers"]["ours"]["wall"]
        if args.breakdown:
            n_att = cfg.n_layers + cfg.mtp_depth
            for variant, att in attention_alone(cfg, args.batch, args.seq, mo).items():
                print(f"[{name}] attention core fwd+bwd alone ({variant}): {att * 1e3:.0f} ms/layer x {n_att} = "
                      f"{att * n_att:.2f} s vs the {w:.2f} s step ({att * n_att / w:.0%})", flush=True)
            if cfg.moe is None:
                for case, (t, gf) in micro(cfg, args.batch, args.seq, mo).items():
                    print(f"[{name}] alone: {case}: {t * 1e3:.1f} ms" + (f" ({gf:.0f} GFLOP/s)" if not math.isnan(gf) else ""),
                          flush=True)
        if args.profile:
            print_train_profile(profile_step(ours), cfg, args.batch, args.seq, w)
        del ours, peers

    st, load1 = pk.stats(mo), os.getloadavg()[0]
    peak, cpu_peak = st["gflops"], st["per_cpu_s"]
    for row in rows:
        for k, p in row["peers"].items():
            p["mfu"] = row["fpt"] * p["tok"] / (peak * 1e9)
            p["cpu_mfu"] = row["fpt"] * tokens_per_step / p["cpu"] / (cpu_peak * 1e9)
        o, t = row["peers"]["ours"], row["peers"].get("transformers")
        row["ratio"] = o["tok"] / t["tok"] if t else nan
        row["cpu_ratio"] = t["cpu"] / o["cpu"] if t else nan
        row["best_ratio"] = o["best"] / t["best"] if t else nan
        if row["name"] == "small":
            result.update(mfu=o["mfu"], ratio=row["ratio"])
        if row["name"] == "tiny":  # the MoE config (MLA + MoE + MTP) against transformers' DeepseekV3
            result["moe_ratio"] = row["ratio"]

    print(f"\n## Training step, batch {args.batch} x seq {args.seq}, float32, AdamW\n")
    print(f"Matmul peak {peak:.1f} GFLOP/s ({pk.label()}, median of {st['n']}/{st['of']} "
          f"{'clean ' if st['clean'] else ''}samples; best {st['max']:.1f}); torch.mm {tpeak:.1f}; {n_cpus()} CPUs; "
          f"load average {load0:.2f} at start, {load1:.2f} at end. A round is *clean* when other processes used "
          f"< {mo:.0%} of the machine during it; medians are over clean rounds when there are enough.\n")
    contended = [f"{r['name']}/{k}" for r in rows for k, p in r["peers"].items() if not p["clean"]]
    if contended:
        print(f"WARNING: too few clean rounds for {', '.join(contended)}: those medians include time slices taken by "
              f"other processes (PyTorch's OpenMP threads suffer far more from that than XLA's); rerun on a quiet "
              f"machine before comparing.\n")
    print("| config | params (active) | MFLOP/token | implementation | step s (median, min–max) | rounds | tok/s "
          "| MFU | ours / transformers | CPU s/step | MFU per CPU-s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        pm = row["params"]
        pp = f"{pm['total'] / 1e6:.2f}M ({pm['active'] / 1e6:.2f}M)" + (f" +{pm['mtp'] / 1e6:.2f}M MTP" if pm["mtp"] else "")
        for k, label in (("ours", "ours (Trainer, one jit)"), ("transformers", "transformers eager (SDPA)")):
            if k not in row["peers"]:
                if k == "transformers" and row["err"]:
                    print(f"| {row['name']} | | | transformers: failed ({row['err'][:60]}) | | | | | | | |")
                continue
            p = row["peers"][k]
            first = k == "ours"
            ratio = f"{row['ratio']:.2f}" if first else ""
            fpt_s = f"{row['fpt'] / 1e6:.1f}" if first else ""
            print(f"| {row['name'] if first else ''} | {pp if first else ''} | {fpt_s} "
                  f"| {label} | {p['wall']:.3f} ({p['lo']:.3f}–{p['hi']:.3f}) "
                  f"| {p['n']}/{p['of']}{' clean' if p['clean'] else ' (contended)'} | {p['tok']:,.0f} "
                  f"| {p['mfu']:.1%} "
                  f"| {ratio} "
                  f"| {p['cpu']:.2f} | {p['cpu_mfu']:.1%} |")
    print(f"\nMFU = flops_per_token · tok/s / matmul peak. MFU per CPU-s = flops_per_token · tokens / (CPU-seconds of "
          f"the step, all threads) / (GFLOP per CPU-second of the dot, {cpu_peak:.1f}): insensitive to time slicing, "
          f"but counts spin-waiting and ignores idle cores.\n")
    for row in rows:
        extra = ""
        if "transformers" in row["peers"]:
            t = row["peers"]["transformers"]
            extra = (f"; best round ratio {row['best_ratio']:.2f}; CPU-time ratio {row['cpu_ratio']:.2f}; "
                     f"transformers loss {t['loss'][0]:.3f} -> {t['loss'][1]:.3f}")
        print(f"- {row['name']}: compile + first step {row['compile_s']:.1f} s; {row['rounds']} rounds; our loss "
              f"{row['loss'][0]:.3f} -> {row['loss'][1]:.3f}{extra}")
    cmd = command("bench.train", argv)
    print(f"\nCommand: `{cmd.strip()}`")
    print(f"RESULT mfu={result.get('mfu', nan):.4f} speedup_vs_transformers={result.get('ratio', nan):.3f} "
          f"moe_speedup_vs_transformers={result.get('moe_ratio', nan):.3f}")


if __name__ == "__main__":
    main()
