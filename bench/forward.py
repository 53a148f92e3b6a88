"""Forward throughput and per-token decode latency of `model.forward` on CPU, against the measured matmul peak.

    python -m bench.forward [--config small|tiny] [--batch 16 --seq 256] [--decode-batch 64 --prompt 64 --new 128]
                            [--rounds 7] [--decode-rounds 3] [--no-hf | --hf-threads N --hf-decode-budget S]
                            [--breakdown] [--profile]

In one process:
1. float32 matmul peak: `jax.jit(jnp.dot)` on 2048x2048, median of 9 runs after 2 warm-ups, GFLOP/s = 2n^3/t.
2. forward: jitted `forward(cfg, params, tokens, with_mtp=False)` on [batch, seq], median over `rounds` after
   warm-up; tokens/s and achieved GFLOP/s with forward FLOPs = flops_per_token(cfg, seq, with_mtp=False) / 3
   (the counter is forward+backward). The fraction of peak is the median over rounds of (forward GFLOP/s ÷
   GFLOP/s of one 2048² matmul timed in the same round): on a machine shared with other jobs the available
   cores change within seconds, and pairing cancels most of that. XLA's own FLOP count of the compiled forward
   is printed too (it differs: MoE routed experts run densely, the causal kernel skips masked blocks).
3. decode: prefill [decode_batch, prompt] into init_cache(cfg, batch, prompt+new), then `new` greedy single-token
   steps, (a) a Python loop over one jitted step with the cache donated, (b) one jitted `lax.scan` over all
   steps with the cache donated. ms per step and new tokens/s; the faster is reported.
4. optionally Hugging Face transformers (PyTorch eager, SDPA, CPU, torch threads = CPUs unless --hf-threads) on
   the equivalent config: Qwen2ForCausalLM for `small`, DeepseekV3ForCausalLM for `tiny` (random weights; only
   speed is compared). Its forward runs in the same rounds as JAX's; its greedy `generate` decode runs once
   per decode round (prefill subtracted); skipped if transformers/torch are not importable.
5. `--breakdown`: the forward's pieces jitted and timed alone (attention core, attention block, MLP/MoE, head).
   `--profile`: a jax.profiler trace of the forward and of one decode step, per-HLO-op time grouped by kind.

Ends with `RESULT forward_tok_s=<x> forward_frac_of_peak=<f> decode_tok_s=<y>`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import shlex
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import hlo_op_meta, med, n_cpus
from model import (
    count_params,
    flops_per_token,
    forward,
    graphdef,
    init_cache,
    init_params,
)
from model.attention import attend, attention_mask, self_attention
from model.config import ModelConfig, small_qwen2, tiny_deepseek
from model.rope import rope_tables

CONFIGS = {"small": small_qwen2, "tiny": tiny_deepseek}


def timed(fn, rounds: int, warmup: int = 1, cpu: list | None = None) -> list[float]:
    """Wall seconds per call of `fn()` (which must block until its result is ready), after `warmup` calls.
    If `cpu` is a list, this process's CPU seconds per call (all threads) are appended to it: on a machine
    shared with other jobs they vary far less than wall time."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(rounds):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    return out


def spread(xs):
    return f"{min(xs) * 1e3:.0f}–{max(xs) * 1e3:.0f}"


# ---- 1. peak --------------------------------------------------------------------------------------------

def matmul_peak(n: int = 2048, runs: int = 9) -> dict:
    """Median GFLOP/s of `runs` calls after 2 warm-ups; "call" times one more matmul (for pairing with rounds)."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    cpu = []
    ts = timed(lambda: dot(a, b).block_until_ready(), runs, warmup=2, cpu=cpu)
    return {"gflops": 2 * n ** 3 / med(ts) / 1e9, "best": 2 * n ** 3 / min(ts) / 1e9, "times": ts,
            "cpu_gflops": 2 * n ** 3 / med(cpu) / 1e9, "flops": 2 * n ** 3,
            "call": lambda: timed(lambda: dot(a, b).block_until_ready(), 1, warmup=0)[0]}


# ---- 2. forward -----------------------------------------------------------------------------------------

def bench_forward(cfg: ModelConfig, params, batch: int, seq: int, rounds: int, peak: dict, peer=None) -> dict:
    """Median forward time over `rounds` after warm-up. Each round also times one peak matmul (`peak['call']`)
    so the fraction of peak can be taken round by round, and, with a `peer` (HFPeer), its forward, so all of
    them see the same machine load."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    fwd = jax.jit(lambda p, t: forward(cfg, p, t, with_mtp=False)[0])
    t0 = time.perf_counter()
    compiled = fwd.lower(params, tokens).compile()
    compile_s = time.perf_counter() - t0
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        xla_flops = float(ca.get("flops", float("nan")))
    except Exception:  # noqa: BLE001 - cost analysis is best-effort
        xla_flops = float("nan")
    cpu, ts, peer_ts = [], [], []
    for _ in range(2):
        compiled(params, tokens).block_until_ready()
    if peer is not None:
        peer.forward()
    peak_ts = []
    for _ in range(rounds):
        peak_ts.append(peak["call"]())
        ts += timed(lambda: compiled(params, tokens).block_until_ready(), 1, warmup=0, cpu=cpu)
        if peer is not None:
            peer_ts += timed(peer.forward, 1, warmup=0)
    t = med(ts)
    fwd_flops = flops_per_token(cfg, seq, with_mtp=False) / 3 * batch * seq
    paired = [(fwd_flops / tf) / (peak["flops"] / tp) for tf, tp in zip(ts, peak_ts)]
    return {"time": t, "times": ts, "cpu": med(cpu), "cpu_gflops": fwd_flops / med(cpu) / 1e9,
            "tok_s": batch * seq / t, "gflops": fwd_flops / t / 1e9, "xla_gflops": xla_flops / t / 1e9,
            "flops": fwd_flops, "xla_flops": xla_flops, "compile_s": compile_s, "fn": compiled, "tokens": tokens,
            "peer_times": peer_ts, "paired_frac": med(paired), "paired_fracs": paired,
            "round_peak_gflops": med([peak["flops"] / tp / 1e9 for tp in peak_ts])}


# ---- 3. decode ------------------------------------------------------------------------------------------

def _step(cfg, params, tok, cache):
    logits, cache, _ = forward(cfg, params, tok[:, None], cache=cache, with_mtp=False)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def make_decoders(cfg: ModelConfig, batch: int, prompt_len: int, new: int):
    max_len = prompt_len + new

    @jax.jit
    def prefill(params, prompt):
        cache = init_cache(cfg, batch, max_len)
        logits, cache, _ = forward(cfg, params, prompt, cache=cache, with_mtp=False)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    step = jax.jit(lambda p, t, c: _step(cfg, p, t, c), donate_argnums=(2,))

    def scan_all(params, tok, cache):
        def body(carry, _):
            tok, cache = carry
            nxt, cache = _step(cfg, params, tok, cache)
            return (nxt, cache), nxt
        (_, cache), toks = jax.lax.scan(body, (tok, cache), None, length=new)
        return toks.T, cache

    scan = jax.jit(scan_all, donate_argnums=(2,))
    return prefill, step, scan


def bench_decode(cfg: ModelConfig, params, batch: int, prompt_len: int, new: int, rounds: int, peer=None,
                 peer_budget_s: float = 30.0) -> dict:
    """Loop and scan decoders, `rounds` each after a warm-up. With a `peer`, one HF decode is timed in each
    round too (fewer new tokens if `rounds` of them would exceed `peer_budget_s`)."""
    prompt = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    prefill, step, scan = make_decoders(cfg, batch, prompt_len, new)

    def run_loop():
        tok, cache = prefill(params, prompt)
        jax.block_until_ready(cache)
        c0, t0 = time.process_time(), time.perf_counter()
        out = []
        for _ in range(new):
            tok, cache = step(params, tok, cache)
            out.append(tok)
        toks = jnp.stack(out, axis=1).block_until_ready()
        return time.perf_counter() - t0, time.process_time() - c0, toks

    def run_scan():
        tok, cache = prefill(params, prompt)
        jax.block_until_ready(cache)
        c0, t0 = time.process_time(), time.perf_counter()
        toks, cache = scan(params, tok, cache)
        toks.block_until_ready()
        return time.perf_counter() - t0, time.process_time() - c0, toks

    t0 = time.perf_counter()
    jax.block_until_ready(prefill(params, prompt))
    prefill_compile = time.perf_counter() - t0
    ts = timed(lambda: jax.block_until_ready(prefill(params, prompt)), 3, warmup=0)
    res = {"prefill_time": med(ts), "prefill_compile_s": prefill_compile}
    runs = {"loop": run_loop, "scan": run_scan}
    raw = {name: {"times": [], "cpus": [], "toks": None, "warm": 0.0} for name in runs}
    for name, fn in runs.items():
        c0 = time.perf_counter()
        fn()  # warm-up (compiles)
        raw[name]["warm"] = time.perf_counter() - c0
    peer_new, peer_step = None, []
    if peer is not None:
        peer_new = peer.decode_tokens(new, rounds, peer_budget_s)
    for _ in range(rounds):  # round-robin, so every variant sees the same machine load
        for name, fn in runs.items():
            t, c, toks = fn()
            raw[name]["times"].append(t)
            raw[name]["cpus"].append(c)
            raw[name]["toks"] = toks
        if peer is not None:
            peer_step.append(peer.decode_step_time(peer_new))
    for name, r in raw.items():
        t = med(r["times"])
        res[name] = {"time": t, "times": r["times"], "ms_step": t / new * 1e3, "tok_s": batch * new / t,
                     "cpu_ms_step": med(r["cpus"]) / new * 1e3, "warmup_s": r["warm"],
                     "tokens": np.asarray(r["toks"])}
    if peer is not None:
        res["peer"] = {"new": peer_new, "step_times": peer_step, "ms_step": med(peer_step) * 1e3,
                       "tok_s": batch / med(peer_step)}
    res["agree"] = float(np.mean(res["loop"]["tokens"] == res["scan"]["tokens"]))
    res["best"] = min(("loop", "scan"), key=lambda k: res[k]["time"])
    res["step_fn"], res["prefill_fn"], res["prompt"] = step, prefill, prompt
    return res


# ---- 4. Hugging Face peer -------------------------------------------------------------------------------

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
            max_position_embeddings=cfg.max_seq_len, rope_parameters=rope)
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
            num_nextn_predict_layers=0)
        cls = transformers.DeepseekV3ForCausalLM
    hcfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(hcfg).eval().to(torch.float32)
    return model


class HFPeer:
    """The Hugging Face model on the same shapes: forward on [batch, seq]; greedy `generate` on the decode batch.

    Decode cost per step = (time of generate(n) - time of generate(1)) / (n - 1), which leaves out the prompt's
    prefill as the JAX decode timing does."""

    def __init__(self, cfg: ModelConfig, batch: int, seq: int, dbatch: int, prompt_len: int, threads: int):
        import torch

        self.torch = torch
        torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.model = hf_model(cfg)
        self.params = sum(p.numel() for p in self.model.parameters())
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
        self.prompt = torch.randint(0, cfg.vocab_size, (dbatch, prompt_len), generator=g)
        self.mask = torch.ones_like(self.prompt)

    def forward(self):
        with self.torch.inference_mode():
            self.model(input_ids=self.tokens, use_cache=False, logits_to_keep=0)

    def generate(self, n: int) -> float:
        """Seconds for prefill + n greedy new tokens (no EOS)."""
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(input_ids=self.prompt, attention_mask=self.mask, max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
            dt = time.perf_counter() - t0
        assert out.shape[1] == self.prompt.shape[1] + n, out.shape
        return dt

    def decode_tokens(self, new: int, rounds: int, budget_s: float) -> int:
        """Warm up; the number of new tokens (<= new) whose decodes, `rounds` of them, fit in budget_s."""
        self.generate(2)
        per_token = max(self.generate(9) - self.generate(1), 1e-6) / 8
        if per_token * new * rounds <= budget_s:
            return new
        return max(9, min(new, int(budget_s / (per_token * rounds))))

    def decode_step_time(self, n: int) -> float:
        return max(self.generate(n) - self.generate(1), 1e-9) / (n - 1)


# ---- 5. where the time goes -----------------------------------------------------------------------------

def breakdown(cfg: ModelConfig, params, batch: int, seq: int, rounds: int) -> list[tuple[str, float, int]]:
    """(piece, ms per call, times it occurs in one forward), each piece jitted and timed alone."""
    gd = graphdef(cfg)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((batch, seq, cfg.d_model)) * 0.5, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)

    def layer_piece(i, fn):
        return jax.jit(lambda p, x: fn(nnx.merge(gd, p), i, x))

    def on_x(f):
        return lambda: f(params, x).block_until_ready()

    # what `forward` passes without a cache: mask None selects the blocked causal kernel
    fwd_mask_info = {"mask": None, "index": 0, "segment_ids": None}

    def attn_block(m, i, x):
        rope = rope_tables(cfg.rope, cfg.rope_dim, cfg.max_seq_len, pos)
        return m.layers[i].self_attn(m.layers[i].input_layernorm(x), rope, fwd_mask_info)[0]

    def mlp(m, i, x):
        out = m.layers[i].mlp(m.layers[i].post_attention_layernorm(x))
        return out[0] if isinstance(out, tuple) else out

    def head(m, i, x):
        return m.head(m.norm(x))

    pieces = []
    if cfg.mla is None:
        hd, h, kvh = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        q = jnp.asarray(rng.standard_normal((batch, h, seq, hd)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((batch, kvh, seq, hd)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((batch, kvh, seq, hd)), jnp.float32)
        core = jax.jit(lambda q, k, v: self_attention(q, k, v, fwd_mask_info, cfg.attn_scale))
        masked = jax.jit(lambda q, k, v: attend(q, k, v, attention_mask(pos, pos), cfg.attn_scale))
        pieces.append(("attention core as `forward` runs it (`self_attention`, no cache)",
                       lambda: core(q, k, v).block_until_ready(), cfg.n_layers))
        pieces.append(("(for comparison: masked `attend` over the full T×T, the cached/prefill path)",
                       lambda: masked(q, k, v).block_until_ready(), 0))
    pieces.append(("attention block (norm, projections, RoPE, attention, o_proj)",
                   on_x(layer_piece(0, attn_block)), cfg.n_layers))
    kinds = collections.Counter(cfg.is_moe_layer)
    for is_moe, count in sorted(kinds.items()):
        i = cfg.is_moe_layer.index(is_moe)
        name = (f"MoE (router, {cfg.moe.n_routed_experts} routed experts run densely, shared expert, norm)" if is_moe
                else "dense SwiGLU MLP (with its norm)")
        pieces.append((name, on_x(layer_piece(i, mlp)), count))
    pieces.append(("final norm + lm_head", on_x(layer_piece(0, head)), 1))
    emb = jax.jit(lambda p, t: nnx.merge(gd, p).embed_tokens(t, jnp.float32))
    pieces.append(("embedding lookup", lambda: emb(params, tokens).block_until_ready(), 1))
    return [(name, med(timed(fn, rounds, warmup=2)) * 1e3, n) for name, fn, n in pieces]


_KINDS = [  # (substring of the HLO op_name metadata, kind), first match wins
    ("bkgtd,bksd->bkgts", "attention QKᵀ"), ("bhtc,bsc->bhts", "attention QKᵀ"), ("bhtr,bsr->bhts", "attention QKᵀ"),
    ("bkgts,bksd->bkgtd", "attention softmax+PV"), ("bhts,bsc->bhtc", "attention softmax+PV"),
    ("select_n", "attention mask (where)"), ("reduce_max", "softmax"), ("/exp", "softmax"),
    ("btd,dhk->bhtk", "q/k/v projections"), ("btc,chk->bhtk", "q/k/v projections"),
    ("bsc,chk->bhsk", "MLA latent up-projection"), ("bhtk,chk->bhtc", "MLA absorb"), ("bhtc,chv->bhtv", "MLA absorb"),
    ("bhtk,hkd->btd", "o_proj"), ("nd,edf->enf", "routed experts"), ("enf,efd->nd", "routed experts"),
    ("top_k", "router"), ("one_hot", "router"), ("dynamic_update_slice", "cache write"),
    ("concatenate", "RoPE / concat"), ("dot_general", "dense matmul (MLP, lm_head, MLA down-proj)"),
]


def profile(call, hlo: str, calls: int, label: str) -> list[tuple[str, float, str]]:
    """Per-HLO-op time (ms per call, summed over threads) from a jax.profiler trace of `call()`, whose compiled
    module's text is `hlo` (trace events are named after its instructions)."""
    meta = hlo_op_meta(hlo)
    jax.block_until_ready(call())
    d = tempfile.mkdtemp(prefix=f"bench_{label}_")
    with jax.profiler.trace(d):
        for _ in range(calls):
            jax.block_until_ready(call())
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


def kind_of(name: str, desc: str) -> str:
    """Kind of one executed op from its HLO instruction name and `op_name  shape` description."""
    if "dynamic_update_slice" in desc:
        return "cache write"
    if "/while/" in desc:  # the only loop in a forward is the blocked causal attention kernel's lax.map
        return "attention (blocked causal kernel, in its loop)"
    if name.startswith(("copy", "transpose")):  # XLA names a fusion after its root ops: a relayout (+ fused math)
        return "layout copies (transposes, with fused elementwise)"
    for key, kind in _KINDS:
        if key in desc:
            return kind
    return "other elementwise / reductions"


def print_profile(ops, title, top=12):
    total = sum(ms for _, ms, _ in ops)
    kinds = collections.Counter()
    for name, ms, desc in ops:
        kinds[kind_of(name, desc)] += ms
    print(f"\n### {title}: per-op time from jax.profiler (ms per call, summed over threads; total {total:.1f} ms)\n")
    print("| kind (by HLO op_name) | ms | share |\n|---|---|---|")
    for k, ms in kinds.most_common():
        print(f"| {k} | {ms:.2f} | {ms / total:.0%} |")
    print(f"\nTop {top} ops:\n\n| op | ms | op_name / shape |\n|---|---|---|")
    for name, ms, desc in ops[:top]:
        print(f"| {name} | {ms:.2f} | `{desc[:110]}` |")


# ---- main -----------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7, help="timed forward rounds (median)")
    ap.add_argument("--decode-rounds", type=int, default=3, help="timed decode rounds per variant (median)")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers peer")
    ap.add_argument("--hf-threads", type=int, default=n_cpus(),
                    help="torch.set_num_threads for the HF peer (default: all CPUs, as XLA uses)")
    ap.add_argument("--hf-decode-budget", type=float, default=24.0,
                    help="seconds allowed for the timed HF decodes; fewer new tokens are generated if they would "
                         "exceed it")
    ap.add_argument("--breakdown", action="store_true", help="time the forward's pieces alone")
    ap.add_argument("--profile", action="store_true", help="jax.profiler per-op times of forward and decode step")
    args = ap.parse_args(argv)
    cmd = "python -m bench.forward " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))

    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    cfg = CONFIGS[args.config]()
    if args.prompt + args.new > cfg.max_seq_len:
        ap.error(f"prompt + new = {args.prompt + args.new} exceeds max_seq_len {cfg.max_seq_len}")
    params = init_params(cfg)
    counts = count_params(cfg)
    print(f"# bench.forward: config={args.config} params total={counts['total']:,} active={counts['active']:,} "
          f"(MTP {counts['mtp']:,} not used)  jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{n_cpus()} CPUs")

    peer, hf_err = None, None
    if not args.no_hf:
        try:
            peer = HFPeer(cfg, args.batch, args.seq, args.decode_batch, args.prompt, args.hf_threads)
        except ImportError as e:
            hf_err = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001 - a peer failing must not sink the benchmark
            hf_err = f"failed: {type(e).__name__}: {e}"
        if hf_err:
            print(f"hugging face: {hf_err}", flush=True)

    peak = matmul_peak()
    print(f"matmul peak: {peak['gflops']:.1f} GFLOP/s (best {peak['best']:.1f})", flush=True)
    fw = bench_forward(cfg, params, args.batch, args.seq, args.rounds, peak, peer)
    frac = fw["paired_frac"]
    print(f"forward: {fw['time'] * 1e3:.0f} ms, {fw['tok_s']:,.0f} tok/s, {fw['gflops']:.1f} GFLOP/s "
          f"({frac:.0%} of peak); compile {fw['compile_s']:.1f} s", flush=True)
    dec = bench_decode(cfg, params, args.decode_batch, args.prompt, args.new, args.decode_rounds, peer,
                       args.hf_decode_budget)
    best = dec[dec["best"]]
    print(f"decode: loop {dec['loop']['ms_step']:.2f} ms/step, scan {dec['scan']['ms_step']:.2f} ms/step; "
          f"tokens agree {dec['agree']:.1%}", flush=True)

    fwd_tok = args.batch * args.seq
    dec_flops = flops_per_token(cfg, args.prompt + args.new, with_mtp=False) / 3
    print(f"\n## {args.config}: forward [{args.batch}×{args.seq}], decode [{args.decode_batch}, prompt {args.prompt}, "
          f"+{args.new}]\n")
    print("| measurement | value |\n|---|---|")
    print(f"| f32 matmul peak, `jit(jnp.dot)` 2048² (median of 9) | {peak['gflops']:.1f} GFLOP/s |")
    print(f"| forward, median of {args.rounds} (range ms) | {fw['time'] * 1e3:.0f} ms ({spread(fw['times'])}) |")
    print(f"| forward throughput | **{fw['tok_s']:,.0f} tok/s** |")
    print(f"| forward FLOPs/token (flops_per_token/3) | {fw['flops'] / fwd_tok / 1e6:.2f} MFLOP |")
    print(f"| f32 matmul peak, one 2048² matmul in each forward round (median) | "
          f"{fw['round_peak_gflops']:.1f} GFLOP/s |")
    print(f"| achieved (model FLOPs) | {fw['gflops']:.1f} GFLOP/s = {fw['gflops'] / peak['gflops']:.0%} of the "
          f"9-run peak; **{frac:.0%} of peak** as the median of per-round ratios (forward ÷ that round's matmul: "
          f"{', '.join(f'{x:.2f}' for x in fw['paired_fracs'])}) |")
    print(f"| achieved (XLA cost_analysis FLOPs, {fw['xla_flops'] / fwd_tok / 1e6:.2f} MFLOP/token) | "
          f"{fw['xla_gflops']:.1f} GFLOP/s = {frac * fw['xla_flops'] / fw['flops']:.0%} of peak (per-round) |")
    print(f"| CPU time (all threads) per 2048² matmul / per forward; fraction of peak by CPU time | "
          f"{2 * 2048 ** 3 / peak['cpu_gflops'] / 1e9 * 1e3:.0f} ms / {fw['cpu'] * 1e3:.0f} ms; "
          f"{fw['cpu_gflops'] / peak['cpu_gflops']:.0%} |")
    print(f"| forward compile (lower+compile) | {fw['compile_s']:.1f} s |")
    print(f"| prefill [{args.decode_batch}×{args.prompt}] into the cache | {dec['prefill_time'] * 1e3:.0f} ms |")
    for k, label in (("loop", "Python loop of a jitted step, cache donated"), ("scan", "one jitted `lax.scan`")):
        d = dec[k]
        print(f"| decode, {label} (median of {args.decode_rounds}, range of the {args.new}-step run in ms) | "
              f"{d['ms_step']:.2f} ms/step, {d['tok_s']:,.0f} new tok/s ({spread(d['times'])}); "
              f"CPU {d['cpu_ms_step']:.2f} ms/step |")
    print(f"| decode, best ({dec['best']}) | **{best['ms_step']:.2f} ms/step, {best['tok_s']:,.0f} new tok/s** |")
    print(f"| decode nominal GFLOP/s (dense over the {args.prompt + args.new}-slot cache, "
          f"{dec_flops / 1e6:.2f} MFLOP/token) | {best['tok_s'] * dec_flops / 1e9:.1f} = "
          f"{best['tok_s'] * dec_flops / 1e9 / fw['round_peak_gflops']:.0%} of the per-round peak |")
    print(f"| loop vs scan greedy tokens identical | {dec['agree']:.1%} |")
    if peer is not None:
        hf_t = med(fw["peer_times"])
        hf_tok_s = fwd_tok / hf_t
        print(f"| HF transformers eager ({peer.params:,} params, {peer.threads} threads), forward in the same rounds "
              f"(range ms) | {hf_t * 1e3:.0f} ms ({spread(fw['peer_times'])}), {hf_tok_s:,.0f} tok/s → "
              f"**JAX/HF = {fw['tok_s'] / hf_tok_s:.2f}×** (per round: "
              f"{', '.join(f'{p / j:.2f}' for j, p in zip(fw['times'], fw['peer_times']))}) |")
        pd = dec["peer"]
        short = "" if pd["new"] == args.new else f"; {pd['new']} new tokens, to fit the time budget"
        print(f"| HF `generate` greedy, prefill subtracted, one per round{short} | {pd['ms_step']:.2f} ms/step, "
              f"{pd['tok_s']:,.0f} new tok/s → **JAX/HF = {best['tok_s'] / pd['tok_s']:.2f}×** |")
    elif hf_err:
        print(f"| HF transformers | {hf_err} |")

    if args.breakdown:
        rows = breakdown(cfg, params, args.batch, args.seq, args.rounds)
        print(f"\n### Pieces of the forward, each jitted alone (median of {args.rounds}); whole forward "
              f"{fw['time'] * 1e3:.0f} ms\n\nAlone, a piece loses fusion with its neighbours and the overlap of "
              f"independent ops, so the shares can add up to more than 100 %.\n")
        print("| piece | ms once | × per forward | ms per forward | share of forward |\n|---|---|---|---|---|")
        for name, ms, n in rows:
            if n:
                print(f"| {name} | {ms:.1f} | {n} | {ms * n:.0f} | {ms * n / (fw['time'] * 1e3):.0%} |")
            else:
                print(f"| {name} | {ms:.1f} | – | – | – |")

    if args.profile:
        ops = profile(lambda: fw["fn"](params, fw["tokens"]), fw["fn"].as_text(), 3, "fwd")
        print_profile(ops, f"forward [{args.batch}×{args.seq}]")
        step, prefill, prompt = dec["step_fn"], dec["prefill_fn"], dec["prompt"]
        tok, cache = prefill(params, prompt)
        hlo = step.lower(params, tok, cache).compile().as_text()
        state = {"tok": tok, "cache": cache}

        def one_step():  # the cache is donated: thread the live buffer through each call
            state["tok"], state["cache"] = step(params, state["tok"], state["cache"])
            return state["tok"]
        ops = profile(one_step, hlo, 20, "decode")
        print_profile(ops, f"decode step [{args.decode_batch}×1, cache {args.prompt + args.new}]")

    load_end = os.getloadavg()[0]
    busy = " — other processes were competing for the cores" if max(load_start, load_end) > n_cpus() + 0.5 else ""
    print(f"\ncommand: `{cmd}`  (wall {time.perf_counter() - t_start:.0f} s; 1-min load average "
          f"{load_start:.1f} at start, {load_end:.1f} at end, {n_cpus()} CPUs{busy})")
    print(f"RESULT forward_tok_s={fw['tok_s']:.1f} forward_frac_of_peak={frac:.3f} decode_tok_s={best['tok_s']:.1f}")


if __name__ == "__main__":
    main()
