"""Where the time goes: per-HLO-op time from a jax.profiler trace, grouped into kinds for each bench's table
(`--profile` of bench/train.py, bench/forward.py and bench/rollout.py), and the parts of one decode step timed alone
through the sampler's own functions (`rl.sampler.prefill`, `sample_token`, `decode_step`, `generate`)."""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time
from functools import partial

import jax
import jax.numpy as jnp

from bench.common import med, wait_quiet

# ---- per-op time from a trace ------------------------------------------------------------------------------


def hlo_op_meta(hlo: str) -> dict[str, tuple[str, str]]:
    """{HLO instruction name: (its shape, its op_name metadata)} from a compiled module's text; profiler trace
    events are named after these instructions."""
    meta = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
        if m and m.group(1) not in meta:
            on = re.search(r'op_name="([^"]*)"', line)
            meta[m.group(1)] = (m.group(2), on.group(1) if on else "")
    return meta


def trace_ops(call, hlo: str, calls: int, label: str, counts: bool = False,
              quiet_wait: float = 0.0) -> list[tuple[str, float, str]]:
    """(HLO op, ms per call summed over threads, 'op_name  shape') from a jax.profiler trace of `calls` calls of
    `call()` (after one untraced call), whose compiled module's text is `hlo`, most costly first. With `counts`,
    the description starts with how many times the op ran per call ('128x  ...')."""
    meta = hlo_op_meta(hlo)
    jax.block_until_ready(call())
    d = tempfile.mkdtemp(prefix=f"bench_{label}_")
    if quiet_wait:
        wait_quiet(quiet_wait)
    with jax.profiler.trace(d):
        for _ in range(calls):
            jax.block_until_ready(call())
    files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return []
    data = jax.profiler.ProfileData.from_file(files[0])
    per_op, count = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in meta:
                    per_op[ev.name] += ev.duration_ns
                    count[ev.name] += 1
    return [(name, ns / calls / 1e6, (f"{count[name] // calls}x  " if counts else "") + meta[name][1] + "  "
             + meta[name][0]) for name, ns in per_op.most_common()]


def _top(ops, top: int, width: int, head: str = "op_name / shape", fmt: str = ".1f"):
    print(f"\nTop {top} ops:\n\n| op | ms | {head} |\n|---|---|---|")
    for name, ms, desc in ops[:top]:
        print(f"| {name} | {ms:{fmt}} | `{desc[:width]}` |")


# ---- bench/train.py: the train step ------------------------------------------------------------------------

def train_kind(name: str, desc: str, cfg, batch: int, seq: int) -> tuple[str, str]:
    """(component, op type + fwd/bwd) of an HLO op of the train step, from its name, op_name metadata and shape."""
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
    elif "gbd,gdf" in on or "gbf,gfd" in on:  # model.dispatch's dropless blocks [R/block, block, d]
        comp = "MoE routed experts (dropless blocks)"
    else:
        comp = "everything else (q/k/v/o projections, MLP, norms, rope, head, loss)"
    # a `dot` whose op_name ends in /transpose is a weight gradient (jax transposes the product's output), not a copy
    if name.startswith("dot") or (name.startswith("ynn_fusion") and "dot_general" in on):
        typ = "matmul"
    elif name.startswith(("copy", "transpose")) or on.endswith("/transpose"):
        typ = "layout copies (transposes)"
    else:
        typ = "elementwise / reductions"
    return comp, f"{typ}, {phase}"


def print_train_profile(ops, cfg, batch: int, seq: int, wall: float, top=12):
    total = sum(ms for _, ms, _ in ops)
    comps, kinds = collections.Counter(), collections.Counter()
    for name, ms, desc in ops:
        c, k = train_kind(name, desc, cfg, batch, seq)
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
    _top(ops, top, 120)


# ---- bench/forward.py: forward and decode step -------------------------------------------------------------

_FORWARD_KINDS = [  # (substring of the HLO op_name metadata, kind), first match wins
    ("bkgtd,bksd->bkgts", "attention QKᵀ"), ("bhtc,bsc->bhts", "attention QKᵀ"), ("bhtr,bsr->bhts", "attention QKᵀ"),
    ("bkgts,bksd->bkgtd", "attention softmax+PV"), ("bhts,bsc->bhtc", "attention softmax+PV"),
    ("select_n", "attention mask (where)"), ("reduce_max", "softmax"), ("/exp", "softmax"),
    ("btd,dhk->bhtk", "q/k/v projections"), ("btc,chk->bhtk", "q/k/v projections"),
    ("bsc,chk->bhsk", "MLA latent up-projection"), ("bhtk,chk->bhtc", "MLA absorb"), ("bhtc,chv->bhtv", "MLA absorb"),
    ("bhtk,hkd->btd", "o_proj"), ("nd,edf->enf", "routed experts"), ("enf,efd->nd", "routed experts"),
    ("top_k", "router"), ("one_hot", "router"), ("dynamic_update_slice", "cache write"),
    ("concatenate", "RoPE / concat"), ("dot_general", "dense matmul (MLP, lm_head, MLA down-proj)"),
]


def forward_kind(name: str, desc: str) -> str:
    """Kind of one executed op of a forward from its HLO instruction name and `op_name  shape` description."""
    if "dynamic_update_slice" in desc:
        return "cache write"
    if "/while/" in desc:  # the only loop in a forward is the blocked causal attention kernel's lax.map
        return "attention (blocked causal kernel, in its loop)"
    if name.startswith(("copy", "transpose")):  # XLA names a fusion after its root ops: a relayout (+ fused math)
        return "layout copies (transposes, with fused elementwise)"
    for key, kind in _FORWARD_KINDS:
        if key in desc:
            return kind
    return "other elementwise / reductions"


def print_forward_profile(ops, title, top=12):
    total = sum(ms for _, ms, _ in ops)
    kinds = collections.Counter()
    for name, ms, desc in ops:
        kinds[forward_kind(name, desc)] += ms
    print(f"\n### {title}: per-op time from jax.profiler (ms per call, summed over threads; total {total:.1f} ms)\n")
    print("| kind (by HLO op_name) | ms | share |\n|---|---|---|")
    for k, ms in kinds.most_common():
        print(f"| {k} | {ms:.2f} | {ms / total:.0%} |")
    _top(ops, top, 110, fmt=".2f")


# ---- bench/rollout.py: generate ----------------------------------------------------------------------------

def generate_hlo(ours) -> str:
    """The compiled text of the program `rl.sampler.generate` runs for `ours` (a bench.rollout.Ours): the library's
    own jitted `_generate`, lowered with the arguments `generate` passes it (read, not re-implemented)."""
    from rl.sampler import _generate, resolve_streams
    kw = dict(max_new_tokens=ours.new, temperature=1.0, top_k=0, top_p=1.0, greedy=False, eos_id=None,
              stop_sequences=(), pad_id=0, vocab_limit=None)
    rows = ours.prompts.shape[0] // resolve_streams(ours.streams, ours.prompts.shape[0], ours.mesh)  # one stream's
    return _generate.lower(ours.cfg, ours.params, ours.prompts[:rows], ours.lens[:rows], jax.random.key(0),
                           jnp.int32(0), **kw).compile().as_text()


def rollout_kind(name: str, desc: str) -> str:
    on = desc.lower()
    if "gumbel" in on or "uniform" in on or "threefry" in on or "iota_reduce" in name or "log_softmax" in on:
        return "sampling (RNG, argmax of the Gumbel trick, log_softmax)"
    if name.startswith(("copy", "transpose")) and on.split("  ")[1].strip() in ("", "reshape"):
        return "layout copies of loop-invariant weights / activations"
    if "dynamic-update-slice" in name or "dynamic_update_slice" in on or "scatter" in on:
        return "cache / buffer writes (dynamic-update-slice, scatter)"
    if "bkgt" in on or "bksd" in on or (re.search(r"\[\d+,\d+,\d+,\d+", desc) and any(
            w in on for w in ("select_n", "reduce_max", "reduce_sum", "exp", "sub", "div"))):
        return "attention core (scores, mask, softmax, weighted sum)"
    if "dot_general" in on or name.startswith("dot"):
        return "matmuls (q/k/v/o projections, MLP, lm_head)"
    return "other elementwise (norms, rope, residuals, glue)"


def print_rollout_profile(ops, wall: float, top: int = 15):
    """ops: (name, ms per call, 'COUNTx  op_name  shape'); ops run once per call are prefill (and setup)."""
    total = sum(ms for _, ms, _ in ops)
    kinds, phases = collections.Counter(), collections.Counter()
    for name, ms, desc in ops:
        phase = "prefill" if desc.startswith("1x") else "decode loop"
        kinds[phase, rollout_kind(name, desc)] += ms
        phases[phase] += ms
    print(f"\n### generate: per-op time from jax.profiler (ms per call; total {total:.0f} ms of ops vs {wall * 1e3:.0f} ms "
          "wall untraced)\n")
    print("| phase | kind | ms | share |\n|---|---|---|---|")
    for ph in ("prefill", "decode loop"):
        print(f"| **{ph}** | all | **{phases[ph]:.0f}** | **{phases[ph] / total:.0%}** |")
        for (p2, k), ms in kinds.most_common():
            if p2 == ph:
                print(f"| | {k} | {ms:.0f} | {ms / total:.0%} |")
    _top(ops, top, 140, head="calls, op_name, shape")


def decode_parts(ours, quiet_wait: float = 0.0) -> list[tuple[str, float, str]]:
    """(what, seconds per `generate` call, note): the whole call against its parts, each jitted alone. Prefill,
    sampling and the decode step are the sampler's own `prefill`, `sample_token` and `decode_step`; the matmuls and
    the attention over the cache are timed alone at the step's shapes (`model.attention.attend`). The parts run
    the whole batch as one stream; `generate` (the last two rows) runs with the caller's streams (ours.streams)."""
    import rl.sampler as S
    from model.attention import attend, attention_mask

    def calls(fn, n: int, warmup: int = 2) -> float:
        """Median seconds of fn() over n calls (fn blocks)."""
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(n):
            if quiet_wait:
                wait_quiet(quiet_wait)
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return med(ts)

    cfg, params, new, prompts, lens = ours.cfg, ours.params, ours.new, ours.prompts, ours.lens
    b, p = prompts.shape
    total = p + new
    rows = []
    prefill = jax.jit(lambda params, prompts, lens: S.prefill(cfg, params, prompts, lens, new))
    last, cache = jax.block_until_ready(prefill(params, prompts, lens))
    t_pre = calls(lambda: jax.block_until_ready(prefill(params, prompts, lens)), 5)
    rows.append(("prefill alone (`rl.sampler.prefill`: the prompts into a fresh cache)", t_pre, f"{b}x{p} tokens"))
    draw = jax.jit(partial(S.sample_token, temperature=1.0, top_k=0, top_p=1.0, greedy=False, vocab_limit=None))
    key = jax.random.split(jax.random.key(1), b)  # one per row, as generate draws

    def half_full(c):  # the cache as in the middle of decoding: prompt + new/2 slots filled
        k = p + new // 2
        return {**c, "index": jnp.int32(k),
                "pos": jnp.broadcast_to(jnp.where(jnp.arange(total) < k, jnp.arange(total), -1), (b, total))
                .astype(jnp.int32)}

    def steps_timed(step, n=16):
        """Median seconds of one call of `step(cache) -> cache` with the cache donated (updated in place)."""
        ts = []
        for _ in range(3):
            c = jax.block_until_ready(half_full(jax.tree.map(jnp.copy, cache)))
            c = jax.block_until_ready(step(c))  # warm up
            if quiet_wait:
                wait_quiet(quiet_wait)
            for _ in range(n):
                t0 = time.perf_counter()
                c = jax.block_until_ready(step(c))
                ts.append(time.perf_counter() - t0)
        return med(ts)

    @partial(jax.jit, donate_argnums=(1,))
    def step_full(params, c, last):  # what one iteration of generate's loop runs
        tok = draw(last, key)[0]
        return S.decode_step(cfg, params, tok, jnp.broadcast_to(c["index"], (b,)), c)[1]

    tok = jnp.ones((b,), jnp.int32)
    step_fwd = jax.jit(lambda params, c: S.decode_step(cfg, params, tok, jnp.broadcast_to(c["index"], (b,)), c)[1],
                       donate_argnums=(1,))
    t_step = steps_timed(lambda c: step_full(params, c, last))
    rows.append((f"one decode step, jitted alone, cache donated (`sample_token` + `decode_step`) x {new}", t_step * new,
                 f"{t_step * 1e3:.2f} ms/step incl. dispatch"))
    t_fwd = steps_timed(lambda c: step_fwd(params, c))
    rows.append((f"  `decode_step` alone (forward of 1 token with the cache) x {new}", t_fwd * new,
                 f"{t_fwd * 1e3:.2f} ms/step"))
    t_samp = calls(lambda: jax.block_until_ready(draw(last, key)), 50)
    rows.append((f"  `sample_token` alone (over [{b}, {cfg.vocab_size}]) x {new}", t_samp * new,
                 f"{t_samp * 1e3:.3f} ms/step incl. dispatch"))

    # the step's matmuls alone: per layer x@Wq, x@Wk, x@Wv, o@Wo, x@Wgate, x@Wup, h@Wdown, then the lm_head
    d, f, h, kv, hd, v = cfg.d_model, cfg.mlp_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size
    ws = [jnp.ones((d, (h + 2 * kv) * hd)) * 0.01, jnp.ones((h * hd, d)) * 0.01, jnp.ones((d, 2 * f)) * 0.01,
          jnp.ones((f, d)) * 0.01]
    head = jnp.ones((d, v)) * 0.01

    @jax.jit
    def matmuls(x):
        for _ in range(cfg.n_layers):
            qkv = x @ ws[0]
            x = x + qkv[:, : h * hd] @ ws[1]
            gu = x @ ws[2]
            x = x + gu[:, :f] @ ws[3]
        return x @ head

    x = jnp.ones((b, d))
    t_mm = calls(lambda: jax.block_until_ready(matmuls(x)), 30)
    flops = 2 * b * (cfg.n_layers * (d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f) + d * v)
    rows.append((f"  its matmuls alone (fused q/k/v, o, gate/up, down x {cfg.n_layers} layers + lm_head) x {new}",
                 t_mm * new, f"{t_mm * 1e3:.2f} ms/step, {flops / t_mm / 1e9:.0f} GFLOP/s"))

    kc = jnp.ones((b, kv, total, hd)) * 0.1
    kt = jnp.ones((b, kv, hd, total)) * 0.1  # keys as the cache holds them (model/attention.py)
    q = jnp.ones((b, h, 1, hd)) * 0.1
    qpos = jnp.full((b, 1), p + new // 2, jnp.int32)
    kvpos = jnp.broadcast_to(jnp.where(jnp.arange(total) <= p + new // 2, jnp.arange(total), -1), (b, total))

    @jax.jit
    def attn(q, k, vv):
        m = attention_mask(qpos, kvpos)
        o = q
        for _ in range(cfg.n_layers):
            o = attend(o, k, vv, m, cfg.attn_scale, keys_transposed=True)
        return o

    t_att = calls(lambda: jax.block_until_ready(attn(q, kt, kc)), 30)
    rows.append((f"  attention over the {total}-slot cache alone (x {cfg.n_layers} layers) x {new}", t_att * new,
                 f"{t_att * 1e3:.2f} ms/step"))
    whole = calls(ours.run, 5, warmup=1)
    t_one = calls(lambda: jax.device_get(S.generate(cfg, params, prompts, lens, 1, 1.0, jax.random.key(1),
                                                    streams=ours.streams).tokens), 5)
    rows.append(("`generate` with 1 new token (prefill + 1 sample; cache of prompt + 1 slots)", t_one,
                 f"in-loop step = (whole - this) / {new - 1} = {(whole - t_one) / max(new - 1, 1) * 1e3:.2f} ms"))
    rows.append(("whole `generate` call (timed again here)", whole, f"{(whole - t_pre) / new * 1e3:.2f} ms/step "
                 "after prefill"))
    return rows
