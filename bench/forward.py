"""Forward throughput and per-token decode latency of `model.forward` on CPU, against the measured matmul peak.

    python -m bench.forward [--config small|tiny] [--batch 16 --seq 256] [--decode-batch 64 --prompt 64 --new 128]
                            [--rounds 7] [--decode-rounds 3] [--no-hf] [--breakdown] [--profile]

In one process:
1. float32 matmul peak: `jax.jit(jnp.dot)` on 2048x2048, median of 9 runs after 2 warm-ups, GFLOP/s = 2n^3/t.
2. forward: jitted `forward(cfg, params, tokens, with_mtp=False)` on [batch, seq], median over `rounds` after
   warm-up; tokens/s and achieved GFLOP/s with forward FLOPs = flops_per_token(cfg, seq, with_mtp=False) / 3
   (the counter is forward+backward), as a fraction of the measured peak. XLA's own FLOP count of the compiled
   forward is printed too (it differs for MoE, whose routed experts run densely).
3. decode: prefill [decode_batch, prompt] into init_cache(cfg, batch, prompt+new), then `new` greedy single-token
   steps, (a) a Python loop over one jitted step with the cache donated, (b) one jitted `lax.scan` over all
   steps with the cache donated. ms per step and new tokens/s; the faster is reported.
4. optionally Hugging Face transformers (PyTorch eager, SDPA, CPU, same thread count) on the equivalent config:
   Qwen2ForCausalLM for `small`, DeepseekV3ForCausalLM for `tiny` (random weights; only speed is compared),
   forward and `generate` decode; skipped if transformers/torch are not importable.
5. `--breakdown`: the forward's pieces jitted and timed alone (attention core, attention block, MLP/MoE, head).
   `--profile`: a jax.profiler trace of the forward and of one decode step, per-HLO-op time grouped by kind.

Ends with `RESULT forward_tok_s=<x> forward_frac_of_peak=<f> decode_tok_s=<y>`.
"""

from __future__ import annotations

import argparse
import collections
import glob
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
from flax import nnx

from model import count_params, flops_per_token, forward, graphdef, init_cache, init_params
from model.attention import attend, attention_mask
from model.config import ModelConfig, small_qwen2, tiny_deepseek
from model.rope import rope_tables

CONFIGS = {"small": small_qwen2, "tiny": tiny_deepseek}


def n_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


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


def med(xs):
    return statistics.median(xs)


def spread(xs):
    return f"{min(xs) * 1e3:.0f}–{max(xs) * 1e3:.0f}"


# ---- 1. peak --------------------------------------------------------------------------------------------

def matmul_peak(n: int = 2048, runs: int = 9) -> dict:
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    cpu = []
    ts = timed(lambda: dot(a, b).block_until_ready(), runs, warmup=2, cpu=cpu)
    return {"gflops": 2 * n ** 3 / med(ts) / 1e9, "best": 2 * n ** 3 / min(ts) / 1e9, "times": ts,
            "cpu_gflops": 2 * n ** 3 / med(cpu) / 1e9}


# ---- 2. forward -----------------------------------------------------------------------------------------

def bench_forward(cfg: ModelConfig, params, batch: int, seq: int, rounds: int) -> dict:
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    fwd = jax.jit(lambda p, t: forward(cfg, p, t, with_mtp=False)[0])
    t0 = time.perf_counter()
    compiled = fwd.lower(params, tokens).compile()
    compile_s = time.perf_counter() - t0
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        xla_flops = float(ca.get("flops", float("nan")))
    except Exception:  # cost analysis is best-effort
        xla_flops = float("nan")
    cpu = []
    ts = timed(lambda: compiled(params, tokens).block_until_ready(), rounds, warmup=2, cpu=cpu)
    t = med(ts)
    fwd_flops = flops_per_token(cfg, seq, with_mtp=False) / 3 * batch * seq
    return {"time": t, "times": ts, "cpu": med(cpu), "cpu_gflops": fwd_flops / med(cpu) / 1e9, "tok_s": batch * seq / t, "gflops": fwd_flops / t / 1e9,
            "xla_gflops": xla_flops / t / 1e9, "flops": fwd_flops, "xla_flops": xla_flops, "compile_s": compile_s,
            "fn": compiled, "tokens": tokens}


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


def bench_decode(cfg: ModelConfig, params, batch: int, prompt_len: int, new: int, rounds: int) -> dict:
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
    tok, cache = prefill(params, prompt)
    jax.block_until_ready(cache)
    prefill_compile = time.perf_counter() - t0
    ts = timed(lambda: jax.block_until_ready(prefill(params, prompt)), 3, warmup=0)
    res = {"prefill_time": med(ts), "prefill_compile_s": prefill_compile}
    for name, fn in (("loop", run_loop), ("scan", run_scan)):
        c0 = time.perf_counter()
        fn()  # warm-up (compiles)
        warm = time.perf_counter() - c0
        times, cpus, toks = [], [], None
        for _ in range(rounds):
            t, c, toks = fn()
            times.append(t)
            cpus.append(c)
        t = med(times)
        res[name] = {"time": t, "times": times, "ms_step": t / new * 1e3, "tok_s": batch * new / t,
                     "cpu_ms_step": med(cpus) / new * 1e3,
                     "warmup_s": warm, "tokens": np.asarray(toks)}
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


def bench_hf(cfg: ModelConfig, batch: int, seq: int, rounds: int, dbatch: int, prompt_len: int, new: int,
             decode_rounds: int, decode_budget_s: float, threads: int) -> dict:
    """HF forward (median of `rounds` after one warm-up) and greedy `generate` decode. If the decode would take
    longer than `decode_budget_s` (estimated from a short warm-up generation), fewer new tokens are generated
    and the result says how many."""
    import torch

    torch.set_num_threads(threads)
    model = hf_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    with torch.inference_mode():
        def fwd():
            model(input_ids=tokens, use_cache=False, logits_to_keep=0)
        ts = timed(fwd, rounds, warmup=1)
        prompt = torch.randint(0, cfg.vocab_size, (dbatch, prompt_len), generator=g)
        mask = torch.ones_like(prompt)

        def gen(n):
            t0 = time.perf_counter()
            out = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
            assert out.shape[1] == prompt_len + n, out.shape
            return time.perf_counter() - t0
        gen(2)  # warm-up
        per_token = gen(8) / 8
        n_new = new
        if per_token * new * decode_rounds > decode_budget_s:
            n_new = max(8, min(new, int(decode_budget_s / (per_token * decode_rounds))))
        dts = [gen(n_new) for _ in range(decode_rounds)]
    return {"time": med(ts), "times": ts, "tok_s": batch * seq / med(ts), "params": n_params,
            "threads": torch.get_num_threads(), "decode_time": med(dts), "decode_tok_s": dbatch * n_new / med(dts),
            "decode_times": dts, "decode_new": n_new}


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

    def attn_block(m, i, x):
        mask = attention_mask(pos, pos)
        rope = rope_tables(cfg.rope, cfg.rope_dim, cfg.max_seq_len, pos)
        return m.layers[i].self_attn(m.layers[i].input_layernorm(x), rope, {"mask": mask, "index": 0})[0]

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
        core = jax.jit(lambda q, k, v: attend(q, k, v, attention_mask(pos, pos), cfg.attn_scale))
        pieces.append(("attention core `attend` (mask, QKᵀ, softmax, PV)", lambda: core(q, k, v).block_until_ready(),
                       cfg.n_layers))
    pieces.append(("attention block (norm, projections, RoPE, attend, o_proj)",
                   (lambda f: lambda: f(params, x).block_until_ready())(layer_piece(0, attn_block)), cfg.n_layers))
    kinds = collections.Counter(cfg.is_moe_layer)
    for is_moe, count in sorted(kinds.items()):
        i = cfg.is_moe_layer.index(is_moe)
        name = "MoE (router, 16 experts dense, shared expert)" if is_moe else "dense SwiGLU MLP (with its norm)"
        pieces.append((name, (lambda f: lambda: f(params, x).block_until_ready())(layer_piece(i, mlp)), count))
    pieces.append(("final norm + lm_head", (lambda f: lambda: f(params, x).block_until_ready())(layer_piece(0, head)), 1))
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
    meta = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
        if m and m.group(1) not in meta:
            on = re.search(r'op_name="([^"]*)"', line)
            meta[m.group(1)] = (m.group(2), on.group(1) if on else "")
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
    ap.add_argument("--hf-rounds", type=int, default=3, help="timed HF forward rounds (median)")
    ap.add_argument("--hf-threads", type=int, default=n_cpus(),
                    help="torch.set_num_threads for the HF peer (default: all CPUs, as XLA uses)")
    ap.add_argument("--hf-decode-budget", type=float, default=30.0,
                    help="seconds allowed for the timed HF decode; fewer new tokens are generated if it would exceed")
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

    peak = matmul_peak()
    print(f"matmul peak: {peak['gflops']:.1f} GFLOP/s (best {peak['best']:.1f})", flush=True)
    fw = bench_forward(cfg, params, args.batch, args.seq, args.rounds)
    frac = fw["gflops"] / peak["gflops"]
    print(f"forward: {fw['time'] * 1e3:.0f} ms, {fw['tok_s']:,.0f} tok/s, {fw['gflops']:.1f} GFLOP/s "
          f"({frac:.0%} of peak); compile {fw['compile_s']:.1f} s", flush=True)
    dec = bench_decode(cfg, params, args.decode_batch, args.prompt, args.new, args.decode_rounds)
    best = dec[dec["best"]]
    print(f"decode: loop {dec['loop']['ms_step']:.2f} ms/step, scan {dec['scan']['ms_step']:.2f} ms/step; "
          f"tokens agree {dec['agree']:.1%}", flush=True)

    hf, hf_err = None, None
    if not args.no_hf:
        try:
            hf = bench_hf(cfg, args.batch, args.seq, args.hf_rounds, args.decode_batch, args.prompt, args.new,
                          1, args.hf_decode_budget, args.hf_threads)
        except ImportError as e:
            hf_err = f"skipped: {e}"
        except Exception as e:  # a peer failing must not sink the benchmark
            hf_err = f"failed: {type(e).__name__}: {e}"
        if hf_err:
            print(f"hugging face: {hf_err}", flush=True)

    fwd_tok = args.batch * args.seq
    dec_flops = flops_per_token(cfg, args.prompt + args.new, with_mtp=False) / 3
    print(f"\n## {args.config}: forward [{args.batch}×{args.seq}], decode [{args.decode_batch}, prompt {args.prompt}, "
          f"+{args.new}]\n")
    print("| measurement | value |\n|---|---|")
    print(f"| f32 matmul peak, `jit(jnp.dot)` 2048² (median of 9) | {peak['gflops']:.1f} GFLOP/s |")
    print(f"| forward, median of {args.rounds} (range ms) | {fw['time'] * 1e3:.0f} ms ({spread(fw['times'])}) |")
    print(f"| forward throughput | **{fw['tok_s']:,.0f} tok/s** |")
    print(f"| forward FLOPs/token (flops_per_token/3) | {fw['flops'] / fwd_tok / 1e6:.2f} MFLOP |")
    print(f"| achieved (model FLOPs) | {fw['gflops']:.1f} GFLOP/s = **{frac:.0%} of peak** |")
    print(f"| achieved (XLA cost_analysis FLOPs, {fw['xla_flops'] / fwd_tok / 1e6:.2f} MFLOP/token) | "
          f"{fw['xla_gflops']:.1f} GFLOP/s = {fw['xla_gflops'] / peak['gflops']:.0%} of peak |")
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
          f"{best['tok_s'] * dec_flops / 1e9 / peak['gflops']:.0%} of peak |")
    print(f"| loop vs scan greedy tokens identical | {dec['agree']:.1%} |")
    if hf is not None:
        print(f"| HF transformers eager ({hf['params']:,} params, {hf['threads']} threads) forward | "
              f"{hf['time'] * 1e3:.0f} ms, {hf['tok_s']:,.0f} tok/s → JAX/HF = **{fw['tok_s'] / hf['tok_s']:.2f}×** |")
        short = "" if hf["decode_new"] == args.new else f", only {hf['decode_new']} new tokens (time budget)"
        print(f"| HF transformers eager forward, median of {len(hf['times'])} (range ms) | {spread(hf['times'])} |")
        print(f"| HF `generate` greedy decode ({len(hf['decode_times'])} run{short}) | "
              f"{hf['decode_tok_s']:,.0f} new tok/s → JAX/HF = **{best['tok_s'] / hf['decode_tok_s']:.2f}×** |")
    elif hf_err:
        print(f"| HF transformers | {hf_err} |")

    if args.breakdown:
        rows = breakdown(cfg, params, args.batch, args.seq, args.rounds)
        print(f"\n### Pieces of the forward, each jitted alone (median of {args.rounds}); whole forward "
              f"{fw['time'] * 1e3:.0f} ms\n")
        print("| piece | ms once | × per forward | ms per forward | share of forward |\n|---|---|---|---|---|")
        for name, ms, n in rows:
            print(f"| {name} | {ms:.1f} | {n} | {ms * n:.0f} | {ms * n / (fw['time'] * 1e3):.0%} |")

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
