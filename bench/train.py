"""Training-step throughput and MFU of `train.step.Trainer` on CPU, side by side with Hugging Face transformers.

    python -m bench.train [--configs small,tiny] [--batch 16 --seq 256] [--steps 7] [--warmup 2] [--no-torch]
                          [--budget 75] [--max-others 0.1] [--devices 1] [--breakdown] [--profile]

In one process:
1. float32 matmul peak: `jax.jit(jnp.dot)` on 2048x2048, GFLOP/s = 2n^3/t; a sample is 4 back-to-back dots;
   9 samples at the start plus one in every timed round; the peak is their median (torch.mm is printed too).
   Shared machines: every timed call also reads /proc/stat, and is *clean* if other processes (and hypervisor
   steal) used less than --max-others (10 %) of the machine's CPU capacity meanwhile. Medians are taken over
   the clean samples when there are at least 3 (else over all, flagged "contended"), and rounds continue
   (up to --budget seconds per config) until --steps clean rounds per peer are in.
2. for each config (small = small_qwen2(), tiny = tiny_deepseek()):
   ours: `Trainer(cfg, OptimConfig(), LossConfig(), make_mesh(MeshConfig(data=1), jax.devices()[:1]))`, a random
   token batch [batch, seq] (inputs / targets = inputs shifted by one / loss_mask of ones), `warmup` steps (the
   first compiles), then timed steps, each blocked on the new state and the metrics;
   theirs: transformers Qwen2ForCausalLM (small) / DeepseekV3ForCausalLM (tiny) built from the equivalent config,
   PyTorch eager on CPU, SDPA attention, torch.set_num_threads(cpu count), on the same batch: forward, masked
   token cross-entropy, loss.backward(), clip_grad_norm_(1.0), torch.optim.AdamW(betas=(0.9, 0.95), wd=0.1).
   Rounds are interleaved (peak sample, ours, theirs, peak sample, ours, theirs, ...).
   tokens/s = batch*seq / median step time; MFU = flops_per_token(cfg, seq) * tokens/s / matmul peak; also the
   CPU-seconds per step and "MFU per CPU-s" (FLOPs per CPU-second of the step / per CPU-second of the dot).
3. `--breakdown`: the attention core fwd+bwd at the training shapes timed alone (the model's path,
   `self_attention` -> `causal_attention`, and the masked `attend`), times the attention layers, against the step;
   for dense configs also the MLP matmuls and the SiLU backward with/without the transpose XLA fuses into it.
   `--profile`: a jax.profiler trace of the train step, per-HLO-op time by component (attention core, MoE routed
   experts, the rest, optimizer) and op type (matmul, layout copies, elementwise), fwd/bwd.
   `--devices N`: a data-parallel mesh over N JAX devices (on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=N).

Thread settings are the process environment's; see docs/benchmarks_train.md for the XLA_FLAGS comparison.
Prints a markdown table, the command line, and as its last line
`RESULT mfu=<fraction> speedup_vs_transformers=<ratio> moe_speedup_vs_transformers=<ratio>`: MFU and speed ratio
for the small config, speed ratio for the tiny MoE config (nan where not measured).
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import hlo_op_meta, machine_busy_s, med, n_cpus
from model import count_params, flops_per_token
from model.config import ModelConfig, small_qwen2, tiny_deepseek
from sharding.mesh import MeshConfig, make_mesh
from train.config import LossConfig, OptimConfig
from train.step import Trainer

CONFIGS = {"small": small_qwen2, "tiny": tiny_deepseek}
OPTIM = {"lr": 3e-3, "warmup_steps": 20, "total_steps": 1000, "b1": 0.9, "b2": 0.95, "weight_decay": 0.1,
         "clip_norm": 1.0}
MAX_OTHERS = 0.10  # default: a timed call is "clean" if other processes used < 10 % of the machine meanwhile


def timed(fn, rounds: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ---- measuring on a shared machine ----------------------------------------------------------------------



@dataclass
class Sample:
    wall: float  # seconds
    cpu: float  # CPU-seconds of this process, all threads
    others: float  # fraction of the machine's CPU capacity used by other processes (and steal) meanwhile

    def clean(self, max_others: float) -> bool:
        return not self.others > max_others  # nan (no /proc/stat) counts as clean


def measure(fn) -> Sample:
    b0, c0, t0 = machine_busy_s(), time.process_time(), time.perf_counter()
    fn()
    t, c, b = time.perf_counter() - t0, time.process_time() - c0, machine_busy_s() - b0
    return Sample(t, c, max(0.0, (b - c) / ((os.cpu_count() or 1) * t)))


def pick(samples: list[Sample], need: int, max_others: float) -> tuple[list[Sample], bool]:
    """The clean samples if there are at least `need` (and >= 1), else all of them; and whether clean."""
    clean = [x for x in samples if x.clean(max_others)]
    return (clean, True) if len(clean) >= max(need, 1) else (samples, False)


# ---- peak -----------------------------------------------------------------------------------------------

class MatmulPeak:
    """GFLOP/s of `jax.jit(jnp.dot)` on float32 n x n. A sample times `reps` back-to-back dots (so one sample
    lasts long enough for /proc/stat's 10 ms ticks); the peak is the median over clean samples."""

    def __init__(self, n: int = 2048, reps: int = 4):
        self.n, self.reps = n, reps
        self.a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        self.b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
        self.dot = jax.jit(jnp.dot)
        self.samples: list[Sample] = []

    def _run(self):
        for _ in range(self.reps):
            self.dot(self.a, self.b).block_until_ready()

    def sample(self, runs: int = 1, warmup: int = 0):
        for _ in range(warmup):
            self._run()
        for _ in range(runs):
            self.samples.append(measure(self._run))

    def gflops_of(self, x: Sample, cpu: bool = False) -> float:
        return 2 * self.n ** 3 * self.reps / (x.cpu if cpu else x.wall) / 1e9

    def stats(self, max_others: float, need: int = 3) -> dict:
        xs, clean = pick(self.samples, need, max_others)
        return {"gflops": med([self.gflops_of(x) for x in xs]), "per_cpu_s": med([self.gflops_of(x, True) for x in xs]),
                "max": max(self.gflops_of(x) for x in self.samples), "n": len(xs), "of": len(self.samples),
                "clean": clean}


def torch_peak(n: int = 2048, runs: int = 9) -> float:
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    ts = timed(lambda: torch.mm(a, b), runs, warmup=2)
    return 2 * n ** 3 / med(ts) / 1e9


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


# ---- theirs ---------------------------------------------------------------------------------------------

def hf_model(cfg: ModelConfig):
    import torch
    import transformers

    rope = {"rope_theta": cfg.rope.theta, "rope_type": "default"}
    if cfg.mla is None:
        if not cfg.qkv_bias or cfg.qk_norm or cfg.o_bias:
            raise NotImplementedError("only Qwen2-style dense configs have an HF equivalent here")
        hcfg = transformers.Qwen2Config(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
            max_position_embeddings=cfg.max_seq_len, rope_parameters=rope, attention_dropout=0.0,
            use_cache=False)
        cls = transformers.Qwen2ForCausalLM
    else:
        m, e = cfg.mla, cfg.moe
        hcfg = transformers.DeepseekV3Config(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
            moe_intermediate_size=e.mlp_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads, n_shared_experts=e.n_shared_experts, n_routed_experts=e.n_routed_experts,
            routed_scaling_factor=e.routed_scaling_factor, kv_lora_rank=m.kv_lora_rank, q_lora_rank=m.q_lora_rank,
            qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, qk_nope_head_dim=m.qk_nope_head_dim,
            n_group=e.n_groups, topk_group=e.topk_groups, num_experts_per_tok=e.experts_per_token,
            first_k_dense_replace=e.first_k_dense, norm_topk_prob=e.norm_topk_prob, rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_seq_len, rope_parameters=rope,
            num_nextn_predict_layers=0, attention_dropout=0.0, use_cache=False)
        cls = transformers.DeepseekV3ForCausalLM
    hcfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(hcfg).to(torch.float32).train()


class Theirs:
    def __init__(self, cfg: ModelConfig, tokens: np.ndarray):
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        self.model = hf_model(cfg)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        rest = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM["weight_decay"]},
                                      {"params": rest, "weight_decay": 0.0}],
                                     lr=OPTIM["lr"] / OPTIM["warmup_steps"], betas=(OPTIM["b1"], OPTIM["b2"]),
                                     eps=1e-8)
        t = torch.from_numpy(tokens.astype(np.int64))
        self.inputs, self.targets = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        self.mask = torch.ones(self.targets.shape, dtype=torch.float32)
        self.losses = []

    def step(self):
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(input_ids=self.inputs, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                self.targets.reshape(-1), reduction="none")
        loss = (nll * self.mask.reshape(-1)).sum() / self.mask.sum().clamp(min=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPTIM["clip_norm"])
        self.opt.step()
        self.losses.append(float(loss.detach()))


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
    step_fn = ours.trainer._step
    hlo = step_fn.lower(ours.state, ours.batch).compile().as_text()
    meta = hlo_op_meta(hlo)
    ours.step()
    d = tempfile.mkdtemp(prefix="bench_train_")
    with jax.profiler.trace(d):
        for _ in range(calls):
            ours.step()
    files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return []
    data = jax.profiler.ProfileData.from_file(files[0])
    per_op = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in meta:
                    per_op[ev.name] += ev.duration_ns
    return [(name, ns / calls / 1e6, meta[name][1] + "  " + meta[name][0]) for name, ns in per_op.most_common()]


def kind_of(name: str, desc: str, cfg: ModelConfig, batch: int, seq: int) -> tuple[str, str]:
    """(component, op type + fwd/bwd) of an HLO op, from its name, op_name metadata and output shape."""
    on = desc.split("  ")[0].lower()
    if "transpose(jvp" in on:
        phase = "bwd"
    elif "jvp(" in on:
        phase = "fwd"
    else:
        return "optimizer update, grad norm, router bias (outside value_and_grad)", ""
    moe_shape = cfg.moe is not None and f"[{cfg.moe.n_routed_experts},{batch * seq}," in desc
    if "while/body" in on or "bkgt" in on or "bkm" in on or "softmax" in on or re.search(rf"\b{seq},{seq}\]", desc):
        comp = "attention core"
    elif "edf" in on or "efd" in on or "enf" in on or moe_shape:
        comp = "MoE routed experts (computed densely, all experts)"
    else:
        comp = "everything else (q/k/v/o projections, MLP, norms, rope, head, loss)"
    if name.startswith(("copy", "transpose")) or on.endswith("/transpose"):
        typ = "layout copies (transposes)"
    elif name.startswith(("ynn_fusion", "dot")) and "dot_general" in on:
        typ = "matmul"
    else:
        typ = "elementwise / reductions"
    return comp, f"{typ}, {phase}"


def print_profile(ops, cfg: ModelConfig, batch: int, seq: int, wall: float, top=12):
    total = sum(ms for _, ms, _ in ops)
    comps, kinds = collections.Counter(), collections.Counter()
    for name, ms, desc in ops:
        c, k = kind_of(name, desc, cfg, batch, seq)
        comps[c] += ms
        kinds[c, k] += ms
    print(f"\n### train step: per-op time from jax.profiler (ms per step; ops on the 2 threads can overlap, so the "
          f"total {total:.0f} ms may exceed the {wall * 1e3:.0f} ms step)\n")
    print("| component | op type | ms | share |\n|---|---|---|---|")
    for c, cms in comps.most_common():
        print(f"| **{c}** | all | **{cms:.0f}** | **{cms / total:.0%}** |")
        for (c2, k), ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
            if c2 == c and k:
                print(f"| | {k} | {ms:.0f} | {ms / total:.0%} |")
    print(f"\nTop {top} ops:\n\n| op | ms | op_name / shape |\n|---|---|---|")
    for name, ms, desc in ops[:top]:
        print(f"| {name} | {ms:.1f} | `{desc[:120]}` |")


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
    ap.add_argument("--breakdown", action="store_true", help="time the attention core fwd+bwd alone")
    ap.add_argument("--profile", action="store_true", help="jax.profiler per-op time of one train step")
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for n in names:
        if n not in CONFIGS:
            ap.error(f"unknown config {n!r}; choose from {sorted(CONFIGS)}")

    print(f"jax {jax.__version__} devices={jax.devices()} cpus={n_cpus()} "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    mo = args.max_others
    load0 = os.getloadavg()[0]
    pk = MatmulPeak()
    pk.sample(9, warmup=1)
    st = pk.stats(mo)
    print(f"float32 matmul peak (jax.jit(jnp.dot) 2048^2): {st['gflops']:.1f} GFLOP/s "
          f"(median of {st['n']}/{st['of']} samples); load average {load0:.2f}", flush=True)
    tpeak = float("nan")
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(os.cpu_count() or 1)
            tpeak = torch_peak()
            print(f"torch.mm 2048^2 ({torch.get_num_threads()} threads): {tpeak:.1f} GFLOP/s", flush=True)
        except ImportError as e:
            print(f"torch unavailable ({e}); skipping the transformers peer")
            args.no_torch = True

    rows, result, nan = [], {}, float("nan")
    tokens_per_step = args.batch * args.seq
    for name in names:
        cfg = CONFIGS[name]()
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
                theirs = Theirs(cfg, tokens)
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
            print_profile(profile_step(ours), cfg, args.batch, args.seq, w)
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
    print(f"Matmul peak {peak:.1f} GFLOP/s (`jax.jit(jnp.dot)` 2048², median of {st['n']}/{st['of']} "
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
    env = os.environ.get("XLA_FLAGS")
    cmd = (f"XLA_FLAGS={shlex.quote(env)} " if env else "") + "python -m bench.train " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(f"\nCommand: `{cmd.strip()}`")
    print(f"RESULT mfu={result.get('mfu', nan):.4f} speedup_vs_transformers={result.get('ratio', nan):.3f} "
          f"moe_speedup_vs_transformers={result.get('moe_ratio', nan):.3f}")


if __name__ == "__main__":
    main()
