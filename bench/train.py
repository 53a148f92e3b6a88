"""Training-step throughput and MFU of `train.step.Trainer` on CPU, side by side with Hugging Face transformers.

    python -m bench.train [--configs small,tiny] [--batch 16 --seq 256] [--steps 7] [--warmup 2] [--no-torch]
                          [--breakdown] [--profile]

In one process:
1. float32 matmul peak: `jax.jit(jnp.dot)` on 2048x2048, GFLOP/s = 2n^3/t: 9 runs after 2 warm-ups at the start
   plus one run in every timed round (so the peak sees the same machine load as the steps); the peak is the
   median of all of them (torch.mm on the same shape is printed for context). The load average is printed and
   a warning when it exceeds the CPU count (other processes share the machine; every time is then inflated).
2. for each config (small = small_qwen2(), tiny = tiny_deepseek()):
   ours: `Trainer(cfg, OptimConfig(), LossConfig(), make_mesh(MeshConfig(data=1), jax.devices()[:1]))`, a random
   token batch [batch, seq] (inputs / targets = inputs shifted by one / loss_mask of ones), `warmup` steps (the
   first compiles), then `steps` timed steps, each blocked on the new state and the metrics;
   theirs: transformers Qwen2ForCausalLM (small) / DeepseekV3ForCausalLM (tiny) built from the equivalent config,
   PyTorch eager on CPU, SDPA attention, torch.set_num_threads(cpu count), on the same batch: forward, masked
   token cross-entropy, loss.backward(), clip_grad_norm_(1.0), torch.optim.AdamW(betas=(0.9, 0.95), wd=0.1).
   Rounds are interleaved (ours, theirs, ours, theirs, ...) so drift in machine speed hits both; medians reported.
   tokens/s = batch*seq / median step time; MFU = flops_per_token(cfg, seq) * tokens/s / matmul peak.
3. `--breakdown`: the small config's attention core (`model.attention.attend`, fwd+bwd at the training shapes)
   timed alone, times n_layers, against the whole step.  `--profile`: a jax.profiler trace of one train step,
   per-HLO-op time grouped by kind.

Thread settings are the process environment's; see docs/benchmarks_train.md for the XLA_FLAGS comparison.
Prints a markdown table, the command line, and as its last line
`RESULT mfu=<fraction> speedup_vs_transformers=<ratio>` for the small config (nan where not measured).
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import shlex
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from model import count_params, flops_per_token
from model.config import ModelConfig, small_qwen2, tiny_deepseek
from sharding.mesh import MeshConfig, make_mesh
from train.config import LossConfig, OptimConfig
from train.step import Trainer

CONFIGS = {"small": small_qwen2, "tiny": tiny_deepseek}
OPTIM = dict(lr=3e-3, warmup_steps=20, total_steps=1000, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0)


def n_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def med(xs):
    return statistics.median(xs)


def timed(fn, rounds: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ---- peak -----------------------------------------------------------------------------------------------

class MatmulPeak:
    """GFLOP/s of `jax.jit(jnp.dot)` on float32 n x n; every sample is kept, the peak is their median."""

    def __init__(self, n: int = 2048):
        self.n = n
        self.a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        self.b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
        self.dot = jax.jit(jnp.dot)
        self.samples, self.cpu_samples = [], []

    def sample(self, runs: int = 1, warmup: int = 0) -> float:
        for _ in range(warmup):
            self.dot(self.a, self.b).block_until_ready()
        out = []
        for _ in range(runs):
            c0, t0 = time.process_time(), time.perf_counter()
            self.dot(self.a, self.b).block_until_ready()
            t, c = time.perf_counter() - t0, time.process_time() - c0
            self.samples.append(2 * self.n ** 3 / t / 1e9)
            self.cpu_samples.append(2 * self.n ** 3 / c / 1e9)
            out.append(self.samples[-1])
        return med(out)

    @property
    def gflops(self) -> float:
        """Wall-clock GFLOP/s, median of all samples."""
        return med(self.samples)

    @property
    def gflops_per_cpu_s(self) -> float:
        """GFLOP per CPU-second of this process (all threads), median: a per-core peak robust to time slicing."""
        return med(self.cpu_samples)


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
    def __init__(self, cfg: ModelConfig, tokens: np.ndarray):
        self.cfg = cfg
        mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
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

def attention_alone(cfg: ModelConfig, batch: int, seq: int, rounds: int = 5) -> float:
    """Seconds for one layer's attention core (attend with the position mask) forward+backward."""
    from model.attention import attend, attention_mask
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

    def loss(q, k, v):
        return jnp.sum(w * attend(q, k, v, attention_mask(pos, pos), cfg.attn_scale))

    fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return med(timed(lambda: jax.block_until_ready(fb(q, k, v)), rounds, warmup=2))


_KINDS = [("dot_general", "matmul (dot)"), ("convolution", "matmul (dot)"), ("softmax", "softmax"),
          ("reduce", "reductions"), ("select", "select / mask"), ("exponential", "exp"),
          ("adam", "optimizer"), ("clip", "optimizer")]


def profile_step(ours: "Ours", calls: int = 2) -> list[tuple[str, float, str]]:
    """Per-HLO-op time (ms per step, summed over threads) from a jax.profiler trace of the train step."""
    step_fn = ours.trainer._step
    hlo = step_fn.lower(ours.state, ours.batch).compile().as_text()
    meta = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
        if m and m.group(1) not in meta:
            on = re.search(r'op_name="([^"]*)"', line)
            meta[m.group(1)] = (m.group(2), on.group(1) if on else "")
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


def kind_of(name: str, desc: str, seq: int) -> str:
    """Coarse kind of an HLO op from its name, op_name metadata and output shape."""
    lname = desc.lower()
    if "transpose(jvp" in lname:
        phase = "bwd"
    elif "jvp(" in lname:
        phase = "fwd"
    else:
        return "optimizer update / loss glue (outside value_and_grad)"
    if re.search(rf"\b{seq},{seq}\]", desc) or "softmax" in lname:
        what = "attention score matrix [.., T, T] (QK^T, mask, softmax, dP)"
    elif "dot_general" in lname or "dot" in name:
        what = "matmul (projections, MLP, head, P·V)"
    elif name.startswith(("copy", "transpose")):
        what = "layout copies / transposes"
    else:
        what = "other elementwise (norms, rope, silu, loss)"
    return f"{what} {phase}"


def print_profile(ops, seq: int, top=15):
    total = sum(ms for _, ms, _ in ops)
    kinds = collections.Counter()
    for name, ms, desc in ops:
        kinds[kind_of(name, desc, seq)] += ms
    print(f"\n### train step: per-op time from jax.profiler (ms per step, summed over threads; total {total:.0f} ms)\n")
    print("| kind | ms | share |\n|---|---|---|")
    for k, ms in kinds.most_common():
        print(f"| {k} | {ms:.0f} | {ms / total:.0%} |")
    print(f"\nTop {top} ops:\n\n| op | ms | op_name / shape |\n|---|---|---|")
    for name, ms, desc in ops[:top]:
        print(f"| {name} | {ms:.1f} | `{desc[:120]}` |")


# ---- main -----------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="small,tiny", help="comma list of " + ",".join(CONFIGS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=7, help="timed interleaved rounds (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
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
    load0 = os.getloadavg()[0]
    pk = MatmulPeak()
    print(f"float32 matmul peak (jax.jit(jnp.dot) 2048^2, median of 9): {pk.sample(9, warmup=2):.1f} GFLOP/s; "
          f"load average {load0:.2f}", flush=True)
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

    rows, result = [], {}
    tokens_per_step = args.batch * args.seq
    for name in names:
        cfg = CONFIGS[name]()
        fpt = flops_per_token(cfg, args.seq)
        tokens = make_tokens(cfg, args.batch, args.seq)
        t0 = time.perf_counter()
        ours = Ours(cfg, tokens)
        ours.step()  # compiles
        compile_s = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            ours.step()
        theirs, err = None, None
        if not args.no_torch:
            try:
                theirs = Theirs(cfg, tokens)
                for _ in range(args.warmup):
                    theirs.step()
            except Exception as e:  # report, don't die: the JAX numbers still stand
                theirs, err = None, f"{type(e).__name__}: {e}"
                print(f"[{name}] transformers peer failed: {err}", flush=True)
        ts_ours, ts_theirs, cpu_ours, cpu_theirs = [], [], [], []
        for r in range(args.steps):
            pk.sample()  # one peak sample per round, so the peak sees the same machine as the steps
            c0, t0 = time.process_time(), time.perf_counter()
            ours.step()
            ts_ours.append(time.perf_counter() - t0)
            cpu_ours.append(time.process_time() - c0)
            if theirs is not None:
                c0, t0 = time.process_time(), time.perf_counter()
                theirs.step()
                ts_theirs.append(time.perf_counter() - t0)
                cpu_theirs.append(time.process_time() - c0)
            print(f"[{name}] round {r}: ours {ts_ours[-1]:.3f} s"
                  + (f", transformers {ts_theirs[-1]:.3f} s" if ts_theirs else ""), flush=True)
        peak, cpu_peak = pk.gflops, pk.gflops_per_cpu_s
        nan = float("nan")
        tok_ours = tokens_per_step / med(ts_ours)
        mfu = fpt * tok_ours / (peak * 1e9)
        tok_theirs = tokens_per_step / med(ts_theirs) if ts_theirs else nan
        mfu_theirs = fpt * tok_theirs / (peak * 1e9)
        ratio = tok_ours / tok_theirs if ts_theirs else nan
        # contention-robust views: best round vs best peak sample; CPU-seconds vs GFLOP per CPU-second of the dot
        best = dict(tok=(tokens_per_step / min(ts_ours), tokens_per_step / min(ts_theirs) if ts_theirs else nan),
                    mfu=fpt * tokens_per_step / min(ts_ours) / (max(pk.samples) * 1e9),
                    ratio=min(ts_theirs) / min(ts_ours) if ts_theirs else nan,
                    cpu_mfu=(fpt * tokens_per_step / med(cpu_ours) / (cpu_peak * 1e9),
                             fpt * tokens_per_step / med(cpu_theirs) / (cpu_peak * 1e9) if cpu_theirs else nan),
                    cpu_ratio=med(cpu_theirs) / med(cpu_ours) if cpu_theirs else nan)
        params = count_params(cfg)
        rows.append(dict(name=name, params=params, fpt=fpt, compile_s=compile_s, best=best, cpu=(med(cpu_ours),
                         med(cpu_theirs) if cpu_theirs else float("nan")),
                         ours=(med(ts_ours), min(ts_ours), max(ts_ours), tok_ours, mfu),
                         theirs=(med(ts_theirs), min(ts_theirs), max(ts_theirs), tok_theirs, mfu_theirs)
                         if ts_theirs else None, err=err, ratio=ratio,
                         loss=(ours.losses[0], ours.losses[-1]),
                         tloss=(theirs.losses[0], theirs.losses[-1]) if theirs else None))
        if name == "small":
            result = {"mfu": mfu, "ratio": ratio}
        if args.breakdown:
            att = attention_alone(cfg, args.batch, args.seq)
            n_att = cfg.n_layers + cfg.mtp_depth
            print(f"[{name}] attention core fwd+bwd alone: {att * 1e3:.0f} ms/layer x {n_att} = "
                  f"{att * n_att:.2f} s of a {med(ts_ours):.2f} s step ({att * n_att / med(ts_ours):.0%})", flush=True)
        if args.profile:
            print_profile(profile_step(ours), args.seq)
        del ours, theirs

    peak, load1 = pk.gflops, os.getloadavg()[0]
    print(f"\n## Training step, batch {args.batch} x seq {args.seq}, float32, AdamW "
          f"(matmul peak {peak:.1f} GFLOP/s jax = median of {len(pk.samples)} samples, range "
          f"{min(pk.samples):.1f}–{max(pk.samples):.1f}; {tpeak:.1f} torch.mm; {n_cpus()} CPUs; "
          f"load average {load0:.2f} at start, {load1:.2f} at end)\n")
    if max(load0, load1) > n_cpus() + 0.5:
        print(f"WARNING: load average above the CPU count: other processes share the machine; times are inflated.\n")
    print("| config | params (active) | MFLOP/token | implementation | step s (median, min–max) | tok/s | MFU "
          "| ours / transformers | CPU s/step | MFU per CPU-s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        p = row["params"]
        pp = f"{p['total'] / 1e6:.2f}M ({p['active'] / 1e6:.2f}M)" + (f" +{p['mtp'] / 1e6:.2f}M MTP" if p["mtp"] else "")
        m, lo, hi, tok, mfu = row["ours"]
        print(f"| {row['name']} | {pp} | {row['fpt'] / 1e6:.1f} | ours (Trainer, one jit) | {m:.3f} ({lo:.3f}–{hi:.3f}) "
              f"| {tok:,.0f} | {mfu:.1%} | {row['ratio']:.2f} | {row['cpu'][0]:.2f} | {row['best']['cpu_mfu'][0]:.1%} |")
        if row["theirs"]:
            m, lo, hi, tok, mfu = row["theirs"]
            print(f"| {row['name']} | | | transformers eager (SDPA) | {m:.3f} ({lo:.3f}–{hi:.3f}) "
                  f"| {tok:,.0f} | {mfu:.1%} | | {row['cpu'][1]:.2f} | {row['best']['cpu_mfu'][1]:.1%} |")
        elif row["err"]:
            print(f"| {row['name']} | | | transformers: failed ({row['err'][:60]}) | | | | | | |")
    print(f"\nMFU = flops_per_token * tok/s / matmul peak (medians). MFU per CPU-s = flops_per_token * tokens / "
          f"(CPU-seconds of the step, all threads) / (GFLOP per CPU-second of the 2048^2 dot, "
          f"{pk.gflops_per_cpu_s:.1f}): insensitive to time slicing by other processes, inflated by idle cores.\n")
    for row in rows:
        b = row["best"]
        print(f"- {row['name']} best round: ours {b['tok'][0]:,.0f} tok/s, transformers {b['tok'][1]:,.0f} tok/s "
              f"(ratio {b['ratio']:.2f}); MFU {b['mfu']:.1%} vs the best peak sample {max(pk.samples):.1f}; "
              f"CPU-time ratio {b['cpu_ratio']:.2f}")
    for row in rows:
        extra = f"; transformers loss {row['tloss'][0]:.3f} -> {row['tloss'][1]:.3f}" if row["tloss"] else ""
        print(f"- {row['name']}: compile + first step {row['compile_s']:.1f} s; our loss "
              f"{row['loss'][0]:.3f} -> {row['loss'][1]:.3f}{extra}")
    env = os.environ.get("XLA_FLAGS")
    cmd = (f"XLA_FLAGS={shlex.quote(env)} " if env else "") + "python -m bench.train " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(f"\nCommand: `{cmd.strip()}`")
    print(f"RESULT mfu={result.get('mfu', float('nan')):.4f} "
          f"speedup_vs_transformers={result.get('ratio', float('nan')):.3f}")


if __name__ == "__main__":
    main()
