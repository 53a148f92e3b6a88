"""`model.scan_layers` on vs off: compile time and program size of a deep model, step and decode time of small ones.

    python -m bench.scan                    # the docs/benchmarks.md table (~3-4 min on 2 cores, most of it unrolled)
    python -m bench.scan --tiny             # smoke test: 6 layers, tiny shapes (tests/test_gpu_bench.py)
    python -m bench.scan --layers 24 --presets small_qwen2 --skip-compile

1. compile: `deepseek_v3_671b(...)` at 61 layers (3 dense + 58 MoE) with MTP depth 1, narrowed to d_model 64,
   4 heads, MLA (q_lora 48, kv_lora 32, qk 16+8, v 16), 32 routed experts top-8 in 8 groups (top-4 groups) + 1
   shared, expert mlp 32, dense mlp 128, vocab 512, remat 'block', float32 (params and compute). The function is a
   `jax.value_and_grad` of next-token NLL + the balance loss through `model.forward` at batch 4 x seq 128;
   `jax.jit(f).lower(abstract params, tokens)` is timed (lower_s), then `.compile()` (compile_s); the lowered
   StableHLO text's line count and its `dot_general` count are the program size. Unrolled first, then scanned.
2. steps, per preset (`small_qwen2`, `tiny_deepseek`; as built, float32): the same value_and_grad jitted at batch 8 x
   seq 128, first call (trace + compile + run) then the median of 5 calls; `rl.sampler.generate` (greedy) of 32
   new tokens after 16-token prompts at batch 8, first call then the median of 3. Unrolled and scanned
   alternate within each preset.

Prints the CPU (`bench.common.cpu_name()`), markdown tables, and one RESULT line (times in seconds or ms as
named; `_scanned` / `_unrolled` the two layouts; preset `dense` = small_qwen2, `moe` = tiny_deepseek):

    RESULT scan_lower_s_unrolled=... scan_lower_s_scanned=... scan_compile_s_unrolled=... scan_compile_s_scanned=...
           scan_hlo_lines_unrolled=... scan_hlo_lines_scanned=... scan_dots_unrolled=... scan_dots_scanned=...
           scan_dense_step_ms_unrolled=... scan_dense_step_ms_scanned=... scan_dense_first_s_unrolled=... ...
           scan_dense_generate_ms_unrolled=... scan_dense_generate_ms_scanned=... (and scan_moe_* likewise)

`--tiny`: 4 layers (3 dense + 1 MoE) at batch 2 x seq 16 for the compile part; the dense preset shrunk to
d_model 64, 2 layers at batch 2 x seq 16 with 2 timed steps and 4 generated tokens; no MoE preset.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root: see bench/common.py

import argparse
import shlex
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import cpu_name, first_and_median, kernel_libs
from model import abstract_params, forward, init_params
from model.config import MLAConfig, ModelConfig, MoEConfig, deepseek_v3_671b, small_qwen2, tiny_deepseek


def v3_narrow(n_layers: int, scan: bool) -> ModelConfig:
    """DeepSeek-V3's structure (first 3 dense, MoE after, MTP 1, YaRN rope, sigmoid group-limited routing) at a
    narrow width, float32."""
    return deepseek_v3_671b(
        n_layers=n_layers, d_model=64, n_heads=4, mlp_dim=128, vocab_size=512,
        mla=MLAConfig(kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
        moe=MoEConfig(n_routed_experts=32, n_shared_experts=1, experts_per_token=8, mlp_dim=32, first_k_dense=3,
                      n_groups=8, topk_groups=4, routed_scaling_factor=2.5),
        remat="block", param_dtype="float32", compute_dtype="float32", scan_layers=scan)


def loss_fn(cfg: ModelConfig):
    """Next-token NLL (+ the MoE balance loss) of tokens [batch, seq] through `model.forward`."""
    def f(params, tokens):
        logits, _, aux = forward(cfg, params, tokens)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
        return nll + (aux["balance_loss"] if "balance_loss" in aux else 0.0)
    return f


def compile_part(n_layers: int, batch: int, seq: int) -> dict:
    out = {}
    for name, scan in (("unrolled", False), ("scanned", True)):
        cfg = v3_narrow(n_layers, scan)
        tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        t0 = time.perf_counter()
        lowered = jax.jit(jax.value_and_grad(loss_fn(cfg))).lower(abstract_params(cfg), tokens)
        text = lowered.as_text()
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        out[name] = {"lower_s": t1 - t0, "compile_s": t2 - t1, "hlo_lines": len(text.splitlines()),
                     "dots": text.count("stablehlo.dot_general")}
        print(f"# {n_layers} layers {name}: lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s, "
              f"{out[name]['hlo_lines']} StableHLO lines, {out[name]['dots']} dot_general", flush=True)
    return out


def step_part(base: ModelConfig, batch: int, seq: int, steps: int, gen_batch: int, prompt: int, new: int,
              gen_runs: int) -> dict:
    from rl.sampler import generate
    rs = np.random.RandomState(0)
    tokens = jnp.asarray(rs.randint(0, base.vocab_size, (batch, seq)), jnp.int32)
    prompts = rs.randint(1, base.vocab_size, (gen_batch, prompt)).astype(np.int32)
    lens = np.full((gen_batch,), prompt, np.int32)
    out = {}
    for name, scan in (("unrolled", False), ("scanned", True)):
        cfg = base.replace(scan_layers=scan)
        params = init_params(cfg, 0)
        step = jax.jit(jax.value_and_grad(loss_fn(cfg)))
        first, t = first_and_median(lambda: jax.block_until_ready(step(params, tokens)), steps)
        gfirst, gt = first_and_median(lambda: jax.block_until_ready(
            generate(cfg, params, prompts, lens, new, greedy=True).tokens), gen_runs)
        out[name] = {"step_ms": t * 1e3, "first_s": first, "generate_ms": gt * 1e3, "generate_first_s": gfirst}
        print(f"# {name}: step {t * 1e3:.0f} ms (first {first:.1f} s), generate {gt * 1e3:.0f} ms "
              f"(first {gfirst:.1f} s)", flush=True)
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    p.add_argument("--layers", type=int, default=None, help="depth of the V3-shaped compile test (61; tiny 4)")
    p.add_argument("--presets", default=None, help="comma-separated: small_qwen2,tiny_deepseek (tiny: small_qwen2)")
    p.add_argument("--skip-compile", action="store_true", help="only the presets' step / generate times")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Runs the comparison, prints tables and the RESULT line; returns {RESULT key: value}."""
    a = parse(argv)
    t_start = time.perf_counter()
    layers = a.layers or (4 if a.tiny else 61)
    presets = [s for s in (a.presets or ("small_qwen2" if a.tiny else "small_qwen2,tiny_deepseek")).split(",") if s]
    if a.tiny:
        build = {"small_qwen2": lambda: small_qwen2(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                                    mlp_dim=128, vocab_size=256),
                 "tiny_deepseek": lambda: tiny_deepseek(n_layers=2, d_model=64, vocab_size=256)}
        cb, cs, sb, ss, steps, gb, gp, gn, gr = 2, 16, 2, 16, 2, 2, 4, 4, 2
    else:
        build = {"small_qwen2": small_qwen2, "tiny_deepseek": tiny_deepseek}
        cb, cs, sb, ss, steps, gb, gp, gn, gr = 4, 128, 8, 128, 5, 8, 16, 32, 3
    unknown = set(presets) - set(build)
    if unknown:
        raise SystemExit(f"--presets: unknown {sorted(unknown)}; choose from {', '.join(build)}")
    print(f"# bench.scan on {cpu_name() if jax.default_backend() == 'cpu' else jax.devices()[0].device_kind} "
          f"(backend {jax.default_backend()}, jax {jax.__version__}){' [--tiny]' if a.tiny else ''}", flush=True)
    print(f"# {kernel_libs(torch=False)}", flush=True)
    res = {}
    if not a.skip_compile:
        c = compile_part(layers, cb, cs)
        for k in ("lower_s", "compile_s", "hlo_lines", "dots"):
            for v in ("unrolled", "scanned"):
                res[f"scan_{k}_{v}"] = c[v][k]
        print(f"\n{layers}-layer V3-shaped train step, batch {cb} x seq {cs}:\n\n"
              "| | lower | XLA compile | StableHLO lines | dot_general ops |\n|---|---|---|---|---|")
        for v in ("unrolled", "scanned"):
            print(f"| {v} (`scan_layers={v == 'scanned'}`) | {c[v]['lower_s']:.1f} s | {c[v]['compile_s']:.1f} s | "
                  f"{c[v]['hlo_lines']:,} | {c[v]['dots']:,} |")
    table = []
    for name in presets:
        tag = "dense" if name == "small_qwen2" else "moe"
        print(f"# preset {name}", flush=True)
        s = step_part(build[name](), sb, ss, steps, gb, gp, gn, gr)
        for k in ("step_ms", "first_s", "generate_ms", "generate_first_s"):
            for v in ("unrolled", "scanned"):
                res[f"scan_{tag}_{k}_{v}"] = s[v][k]
        u, sc = s["unrolled"], s["scanned"]
        table.append(f"| `{name}` | {u['step_ms']:.0f} / {sc['step_ms']:.0f} ms | {u['first_s']:.1f} / "
                     f"{sc['first_s']:.1f} s | {u['generate_ms']:.0f} / {sc['generate_ms']:.0f} ms | "
                     f"{u['generate_first_s']:.1f} / {sc['generate_first_s']:.1f} s |")
    if table:
        print(f"\nTrain step at batch {sb} x seq {ss} (median of {steps}); generate {gn} greedy new tokens after "
              f"{gp}-token prompts at batch {gb} (median of {gr}); unrolled / scanned:\n\n"
              "| preset | train step | first call | generate | generate first call |\n|---|---|---|---|---|")
        print("\n".join(table))
    print("\nRESULT " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    print(f"command: python -m bench.scan {shlex.join(argv if argv is not None else sys.argv[1:])}"
          f"\n# total {time.perf_counter() - t_start:.0f} s", flush=True)
    return res


if __name__ == "__main__":
    main()
