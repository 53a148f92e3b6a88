"""Forward throughput and per-token decode latency of `model.forward` on CPU, against the measured matmul peak.

    python -m bench.forward [--config small|tiny] [--batch 16 --seq 256] [--decode-batch 64 --prompt 64 --new 128]
                            [--rounds 7] [--decode-rounds 3] [--no-hf | --hf-threads N --hf-decode-budget S]
                            [--breakdown] [--profile]

In one process:
1. float32 matmul peak (bench.common.MatmulPeak): `jax.jit(jnp.dot)` on 2048x2048 (--peak-n), 4 dots per sample,
   median of 9 samples after a warm-up, GFLOP/s = 2n^3/t; one more sample in every forward round.
2. forward: jitted `forward(cfg, params, tokens, with_mtp=False)` on [batch, seq], median over `rounds` after
   warm-up; tokens/s and achieved GFLOP/s with forward FLOPs = flops_per_token(cfg, seq, with_mtp=False) / 3
   (the counter is forward+backward). The fraction of peak is the median over rounds of (forward GFLOP/s ÷
   GFLOP/s of the peak sample timed in the same round): on a machine shared with other jobs the available
   cores change within seconds, and pairing cancels most of that. XLA's own FLOP count of the compiled forward
   is printed too (it differs: MoE routed experts run densely, the causal kernel skips masked blocks).
3. decode, through the sampler's own functions: `rl.sampler.prefill` of [decode_batch, prompt] into a cache of
   prompt+new slots, then `new` greedy single-token steps of `rl.sampler.decode_step` (argmax of its logits),
   (a) a Python loop over one jitted step with the cache donated, (b) one jitted `lax.scan` over all steps with
   the cache donated. ms per step and new tokens/s; the faster is reported.
4. optionally Hugging Face transformers (bench.peers.HFForward: PyTorch eager, SDPA, CPU, torch threads = CPUs
   unless --hf-threads) on the same config through `model.hf.config_to_hf`: Qwen2ForCausalLM for `small`, DeepseekV3ForCausalLM for `tiny` (random weights; only
   speed is compared). Its forward runs in the same rounds as JAX's; its greedy `generate` decode runs once
   per decode round (prefill subtracted); skipped if transformers/torch are not importable.
5. `--breakdown`: the forward's pieces jitted and timed alone (attention core, attention block, MLP/MoE, head).
   `--profile`: a jax.profiler trace of the forward and of one decode step, per-HLO-op time grouped by kind.

Starts with the CPU model and the kernel libraries each side runs (bench.common.header); ends with
`RESULT forward_tok_s=<x> forward_frac_of_peak=<f> decode_tok_s=<y>`.
"""

from __future__ import annotations

import collections
import os
import sys

if __name__ == "__main__" and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root: see bench/common.py

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import rl.sampler as S
from bench.common import MatmulPeak, command, header, med, n_cpus, timed
from bench.peers import HFForward
from bench.profile import print_forward_profile, trace_ops
from model import count_params, flops_per_token, forward, graphdef, init_params
from model.attention import attend, attention_mask, self_attention
from model.config import ModelConfig, small_qwen2, tiny_deepseek
from model.rope import rope_tables

CONFIGS = {"small": small_qwen2, "tiny": tiny_deepseek}


def spread(xs):
    return f"{min(xs) * 1e3:.0f}–{max(xs) * 1e3:.0f}"


# ---- 2. forward -----------------------------------------------------------------------------------------

def bench_forward(cfg: ModelConfig, params, batch: int, seq: int, rounds: int, peak: MatmulPeak, peer=None) -> dict:
    """Median forward time over `rounds` after warm-up. Each round also takes one peak sample so the fraction of
    peak can be taken round by round, and, with a `peer` (HFForward), times its forward, so all of them see the
    same machine load."""
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
        peak_ts.append(peak.sample().wall)
        ts += timed(lambda: compiled(params, tokens).block_until_ready(), 1, warmup=0, cpu=cpu)
        if peer is not None:
            peer_ts += timed(peer.forward, 1, warmup=0)
    t = med(ts)
    fwd_flops = flops_per_token(cfg, seq, with_mtp=False) / 3 * batch * seq
    paired = [(fwd_flops / tf) / (peak.flops / tp) for tf, tp in zip(ts, peak_ts)]
    return {"time": t, "times": ts, "cpu": med(cpu), "cpu_gflops": fwd_flops / med(cpu) / 1e9,
            "tok_s": batch * seq / t, "gflops": fwd_flops / t / 1e9, "xla_gflops": xla_flops / t / 1e9,
            "flops": fwd_flops, "xla_flops": xla_flops, "compile_s": compile_s, "fn": compiled, "tokens": tokens,
            "peer_times": peer_ts, "paired_frac": med(paired), "paired_fracs": paired,
            "round_peak_gflops": med([peak.flops / tp / 1e9 for tp in peak_ts])}


# ---- 3. decode ------------------------------------------------------------------------------------------

def make_decoders(cfg: ModelConfig, batch: int, prompt_len: int, new: int):
    """Greedy decoding from the sampler's own pieces: prefill(params, prompt) -> (token, cache);
    step(params, token, positions, cache) -> (token, cache) with the cache donated; scan(params, token, cache) ->
    (tokens [batch, new], cache), all `new` steps in one jitted lax.scan."""
    lens = jnp.full((batch,), prompt_len, jnp.int32)

    def greedy(logits_cache):
        logits, cache = logits_cache
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    prefill = jax.jit(lambda params, prompt: greedy(S.prefill(cfg, params, prompt, lens, new)))
    step = jax.jit(lambda p, t, pos, c: greedy(S.decode_step(cfg, p, t, pos, c)), donate_argnums=(3,))

    def scan_all(params, tok, cache):
        def body(carry, i):
            tok, cache = carry
            nxt, cache = greedy(S.decode_step(cfg, params, tok, lens + i, cache))
            return (nxt, cache), nxt
        (_, cache), toks = jax.lax.scan(body, (tok, cache), jnp.arange(new, dtype=jnp.int32))
        return toks.T, cache

    scan = jax.jit(scan_all, donate_argnums=(2,))
    return prefill, step, scan


def bench_decode(cfg: ModelConfig, params, batch: int, prompt_len: int, new: int, rounds: int, peer=None,
                 peer_budget_s: float = 30.0) -> dict:
    """Loop and scan decoders, `rounds` each after a warm-up. With a `peer`, one HF decode is timed in each
    round too (fewer new tokens if `rounds` of them would exceed `peer_budget_s`)."""
    prompt = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    prefill, step, scan = make_decoders(cfg, batch, prompt_len, new)
    positions = [jnp.full((batch,), prompt_len + i, jnp.int32) for i in range(new)]

    def run_loop():
        tok, cache = prefill(params, prompt)
        jax.block_until_ready(cache)
        c0, t0 = time.process_time(), time.perf_counter()
        out = []
        for i in range(new):
            tok, cache = step(params, tok, positions[i], cache)
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
    ap.add_argument("--peak-n", type=int, default=2048,
                    help="matmul size of the float32 peak (figures quote 2048; smaller only for smoke tests)")
    ap.add_argument("--profile", action="store_true", help="jax.profiler per-op times of forward and decode step")
    args = ap.parse_args(argv)
    cmd = command("bench.forward", argv)

    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    cfg = CONFIGS[args.config]()
    if args.prompt + args.new > cfg.max_seq_len:
        ap.error(f"prompt + new = {args.prompt + args.new} exceeds max_seq_len {cfg.max_seq_len}")
    params = init_params(cfg)
    counts = count_params(cfg)

    peer, hf_err = None, None
    if not args.no_hf:
        try:
            peer = HFForward(cfg, args.batch, args.seq, args.decode_batch, args.prompt, args.hf_threads)
        except ImportError as e:
            hf_err = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001 - a peer failing must not sink the benchmark
            hf_err = f"failed: {type(e).__name__}: {e}"
    header("bench.forward", torch=peer is not None)
    print(f"config={args.config} params total={counts['total']:,} active={counts['active']:,} "
          f"(MTP {counts['mtp']:,} not used)")
    if hf_err:
        print(f"hugging face: {hf_err}", flush=True)

    pk = MatmulPeak(args.peak_n)
    pk.sample(9, warmup=1)
    peak = pk.stats()
    print(f"matmul peak: {peak['gflops']:.1f} GFLOP/s (best {peak['max']:.1f})", flush=True)
    fw = bench_forward(cfg, params, args.batch, args.seq, args.rounds, pk, peer)
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
    print(f"| f32 matmul peak, {pk.label()} (median of {peak['n']}/{peak['of']} samples) | "
          f"{peak['gflops']:.1f} GFLOP/s |")
    print(f"| forward, median of {args.rounds} (range ms) | {fw['time'] * 1e3:.0f} ms ({spread(fw['times'])}) |")
    print(f"| forward throughput | **{fw['tok_s']:,.0f} tok/s** |")
    print(f"| forward FLOPs/token (flops_per_token/3) | {fw['flops'] / fwd_tok / 1e6:.2f} MFLOP |")
    print(f"| f32 matmul peak, one sample in each forward round (median) | "
          f"{fw['round_peak_gflops']:.1f} GFLOP/s |")
    print(f"| achieved (model FLOPs) | {fw['gflops']:.1f} GFLOP/s = {fw['gflops'] / peak['gflops']:.0%} of the "
          f"peak; **{frac:.0%} of peak** as the median of per-round ratios (forward ÷ that round's matmul: "
          f"{', '.join(f'{x:.2f}' for x in fw['paired_fracs'])}) |")
    print(f"| achieved (XLA cost_analysis FLOPs, {fw['xla_flops'] / fwd_tok / 1e6:.2f} MFLOP/token) | "
          f"{fw['xla_gflops']:.1f} GFLOP/s = {frac * fw['xla_flops'] / fw['flops']:.0%} of peak (per-round) |")
    print(f"| CPU time (all threads) per {pk.n}² matmul / per forward; fraction of peak by CPU time | "
          f"{2 * pk.n ** 3 / peak['per_cpu_s'] / 1e9 * 1e3:.0f} ms / {fw['cpu'] * 1e3:.0f} ms; "
          f"{fw['cpu_gflops'] / peak['per_cpu_s']:.0%} |")
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
        ops = trace_ops(lambda: fw["fn"](params, fw["tokens"]), fw["fn"].as_text(), 3, "fwd")
        print_forward_profile(ops, f"forward [{args.batch}×{args.seq}]")
        step, prefill, prompt = dec["step_fn"], dec["prefill_fn"], dec["prompt"]
        tok, cache = prefill(params, prompt)
        pos = jnp.full((args.decode_batch,), args.prompt + args.new // 2, jnp.int32)
        hlo = step.lower(params, tok, pos, cache).compile().as_text()
        state = {"tok": tok, "cache": cache}

        def one_step():  # the cache is donated: thread the live buffer through each call
            state["tok"], state["cache"] = step(params, state["tok"], pos, state["cache"])
            return state["tok"]
        ops = trace_ops(one_step, hlo, 20, "decode")
        print_forward_profile(ops, f"decode step [{args.decode_batch}×1, cache {args.prompt + args.new}]")

    load_end = os.getloadavg()[0]
    busy = " — other processes were competing for the cores" if max(load_start, load_end) > n_cpus() + 0.5 else ""
    print(f"\ncommand: `{cmd}`  (wall {time.perf_counter() - t_start:.0f} s; 1-min load average "
          f"{load_start:.1f} at start, {load_end:.1f} at end, {n_cpus()} CPUs{busy})")
    print(f"RESULT forward_tok_s={fw['tok_s']:.1f} forward_frac_of_peak={frac:.3f} decode_tok_s={best['tok_s']:.1f}")


if __name__ == "__main__":
    main()
