"""GPU readiness benchmark: training MFU (dense and MoE), sampler throughput and compile times, in one command.

    python -m bench.gpu                     # on a GPU node: one device, bf16 compute, seq 4096 (< 5 min planned)
    python -m bench.gpu --tiny              # CPU smoke test: tiny sizes, < 60 s on 2 cores (tests/test_gpu_bench.py)
    python -m bench.gpu --parts dense,moe --dense-batch 32 --moe-impl capacity --no-scan --remat block --devices 8

In one process, on `--devices` devices (default 1) of the default backend:
1. peak: a bf16 [n, n] @ [n, n] matmul chain (n = 8192; 16 matmuls in one jitted `fori_loop`), median of 5;
   TFLOP/s = 16 * 2n^3 / t per device. The datasheet dense-bf16 peak is printed beside it when the device kind is
   an H100 / H200 (and A100).
2. dense: a ~1.1B-parameter Llama-style model (TinyLlama-1.1B's shape: d 2048, 22 layers, 32 heads, 4 KV heads of
   64, SwiGLU 5632, vocab 32000, untied), float32 master weights and AdamW moments with bf16 compute
   (`model.config.ACCELERATOR_PRECISION`), layers scanned (`scan_layers`), `attention_impl='auto'` (cuDNN flash on
   GPU). `train.step.Trainer` over `sharding.make_mesh(MeshConfig(data=devices))`, random tokens [batch, seq]
   (batch 4 per device, seq 4096: at 8 the step holds ~105 GiB, jax's default 75 % of an H200; counted from the
   backward's residuals, `jax.vjp`); the first step is timed on its own (trace + compile + one step), then
   `--steps` steps, each blocked on the new state. tokens/s = batch*seq / median step;
   MFU = `model.flops_per_token(cfg, seq)` (6 x matmul params + full T x T attention, PaLM's convention)
   * tokens/s / (measured peak * devices).
3. moe: a DeepSeek-style MoE of similar active size (~0.9B active of ~2.7B): MLA (16 heads, q_lora 1536,
   kv_lora 512, qk 128+64, v 128), 12 layers (first dense), 32 routed experts top-6 + 2 shared, expert SwiGLU
   1024, sigmoid router with aux-loss-free bias, no MTP, batch 4 per device; `--moe-impl dropless` (default) or
   `capacity`.
   Same measurement; MFU counts active FLOPs only (`flops_per_token` counts shared + top-k routed experts).
4. sampler (right after the dense part): `rl.sampler.generate` on the dense model's trained parameters (float32
   masters, bf16 compute, the trainer's sharding) at batch 256, 128-token prompts, 256 new tokens, temperature 1,
   no EOS (every row generates all of them); first call timed alone, then median of 3. new tokens/s = generated
   tokens / time (prefill included).
Compile time = first call - median of the later calls (trace + lower + XLA compile, as a user waits for it).
A step that runs out of device memory (RESOURCE_EXHAUSTED) is retried at half the batch (a '#' line says so;
the table shows the batch that ran). A part that fails otherwise prints its traceback and the next part still runs
(the sampler needs the dense part); the exit status is then 1. `--attention-impl xla` measures without cuDNN.

Prints the machine (CPU model via `bench.common.cpu_name()`, or the accelerator's `device_kind`), a markdown
table, and one RESULT line per part (space-separated key=value; s = seconds, tok_s = tokens per second,
mfu = fraction of the measured peak):

    RESULT gpu_peak_tflops=<measured bf16 matmul TFLOP/s per device> [gpu_nominal_tflops=<datasheet>]
    RESULT gpu_dense_tok_s=<train tokens/s> gpu_dense_mfu=<fraction> gpu_dense_step_s=<s> gpu_dense_compile_s=<s>
           [gpu_dense_mfu_nominal=<fraction of the datasheet peak>]
    RESULT gpu_moe_tok_s=... gpu_moe_mfu=... gpu_moe_step_s=... gpu_moe_compile_s=... [gpu_moe_mfu_nominal=...]
    RESULT gpu_sampler_tok_s=<new tokens/s at batch 256> gpu_sampler_compile_s=<s>

The bracketed fields appear only when the device kind has a datasheet peak here. `--tiny` keeps the names (the
figures are then a CPU smoke test, not a measurement).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root: see bench/common.py

import argparse
import gc
import shlex
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import cpu_name, first_and_median, kernel_libs
from model import count_params, flops_per_token
from model.attention import resolve_impl
from model.config import ACCELERATOR_PRECISION, ATTENTION_IMPLS, MLAConfig, ModelConfig, MoEConfig, RopeConfig
from sharding import MeshConfig, make_mesh
from train.config import LossConfig, OptimConfig
from train.step import Trainer

# datasheet dense bf16 tensor-core peaks in TFLOP/s (without sparsity), matched on jax's device_kind, first hit
NOMINAL_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.4),
                  ("H200", 989.4), ("GH200", 989.4), ("A100", 312.0))


def nominal_tflops(kind: str) -> float | None:
    return next((v for k, v in NOMINAL_TFLOPS if k.lower() in kind.lower()), None)


def device_name() -> str:
    d = jax.devices()[0]
    return cpu_name() if d.platform == "cpu" else d.device_kind


def _ready(x):
    return jax.block_until_ready(x)


# ---- configurations ------------------------------------------------------------------------------------------

def dense_config(args) -> ModelConfig:
    if args.tiny:
        return ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                           mlp_dim=128, max_seq_len=args.seq, scan_layers=args.scan, remat=args.remat,
                           attention_impl=args.attention_impl, **ACCELERATOR_PRECISION)
    return ModelConfig(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64,
                       mlp_dim=5632, norm_eps=1e-5, rope=RopeConfig(theta=10000.0), max_seq_len=args.seq,
                       scan_layers=args.scan, remat=args.remat, attention_impl=args.attention_impl,
                       **ACCELERATOR_PRECISION)


def moe_config(args) -> ModelConfig:
    if args.tiny:
        return ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, mlp_dim=128,
                           mla=MLAConfig(kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                         v_head_dim=16),
                           moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, experts_per_token=2, mlp_dim=32,
                                         first_k_dense=1, impl=args.moe_impl),
                           max_seq_len=args.seq, scan_layers=args.scan, remat=args.remat,
                           attention_impl=args.attention_impl, **ACCELERATOR_PRECISION)
    return ModelConfig(vocab_size=32000, d_model=2048, n_layers=12, n_heads=16, mlp_dim=5632, norm_eps=1e-6,
                       mla=MLAConfig(kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                     v_head_dim=128),
                       moe=MoEConfig(n_routed_experts=args.moe_experts, n_shared_experts=2, experts_per_token=6,
                                     mlp_dim=1024, first_k_dense=1, score_func="sigmoid", n_groups=1, topk_groups=1,
                                     impl=args.moe_impl),
                       mtp_depth=0, max_seq_len=args.seq, scan_layers=args.scan, remat=args.remat,
                       attention_impl=args.attention_impl, **ACCELERATOR_PRECISION)


# ---- parts ---------------------------------------------------------------------------------------------------

def measure_peak(n: int, chain: int = 16, samples: int = 5) -> float:
    """bf16 matmul TFLOP/s of one device: `chain` dependent [n, n] @ [n, n] products in one jit."""
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, n), jnp.bfloat16)
    w = (jax.random.normal(kw, (n, n), jnp.float32) / np.sqrt(n)).astype(jnp.bfloat16)
    f = jax.jit(lambda x, w: jax.lax.fori_loop(0, chain, lambda _, y: y @ w, x))
    _ready(f(x, w))
    _, t = first_and_median(lambda: _ready(f(x, w)), samples)
    return chain * 2 * n ** 3 / t / 1e12


def _oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def _train_once(cfg: ModelConfig, batch: int, seq: int, steps: int, mesh) -> tuple[float, float, float, dict]:
    """-> (first call s, median step s, last loss, trained params). Its locals (state, trainer) die with it."""
    trainer = Trainer(cfg, OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"), LossConfig(), mesh)
    toks = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    b = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((batch, seq), np.float32)}
    box = {"state": trainer.init_state(0)}

    def step():
        box["state"], m = trainer.step(box["state"], b)
        _ready((box["state"], m))
        box["loss"] = float(m["loss"])

    first, step_s = first_and_median(step, steps)
    return first, step_s, box["loss"], box["state"]["params"]


def train_part(cfg: ModelConfig, batch: int, seq: int, steps: int, mesh) -> dict:
    """Trainer step timing for `cfg`; halves the batch on device OOM. -> row dict with the trained params."""
    n_dev = mesh.devices.size
    while True:
        try:
            first, step_s, loss, params = _train_once(cfg, batch, seq, steps, mesh)
            break
        except Exception as e:  # noqa: BLE001 - only device OOM is retried
            if not _oom(e) or batch // 2 < n_dev or (batch // 2) % n_dev:
                raise
            print(f"# out of device memory at batch {batch}; retrying at batch {batch // 2}", flush=True)
        gc.collect()
        batch //= 2
    return {"batch": batch, "seq": seq, "step_s": step_s, "compile_s": max(first - step_s, 1e-6),
            "tok_s": batch * seq / step_s, "flops_per_token": flops_per_token(cfg, seq), "params": count_params(cfg),
            "loss": loss, "trained_params": params}


def sampler_part(cfg: ModelConfig, params, mesh, batch: int, prompt: int, new: int, runs: int) -> dict:
    from rl.sampler import generate
    rs = np.random.RandomState(1)
    prompts = rs.randint(1, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    lens = np.full((batch,), prompt, np.int32)
    box = {"i": 0}

    def run():
        box["i"] += 1
        out = generate(cfg, params, prompts, lens, new, temperature=1.0, rng=jax.random.key(box["i"]), mesh=mesh)
        box["generated"] = int(np.asarray(_ready(out.lengths)).sum())

    first, t = first_and_median(run, runs)
    return {"batch": batch, "prompt": prompt, "new": new, "gen_s": t, "compile_s": max(first - t, 1e-6),
            "tok_s": box["generated"] / t}


# ---- main ----------------------------------------------------------------------------------------------------

def train_result(part: str, cfg: ModelConfig, r: dict, peak: float, nominal: float | None,
                 devices: int) -> tuple[dict, tuple]:
    """-> (RESULT fields, table row) of a `train_part` row."""
    mfu = r["flops_per_token"] * r["tok_s"] / (peak * 1e12 * devices)
    f = {f"gpu_{part}_tok_s": r["tok_s"], f"gpu_{part}_mfu": mfu, f"gpu_{part}_step_s": r["step_s"],
         f"gpu_{part}_compile_s": r["compile_s"]}
    if nominal:
        f[f"gpu_{part}_mfu_nominal"] = r["flops_per_token"] * r["tok_s"] / (nominal * 1e12 * devices)
    p = r["params"]
    size = _count(p["total"]) + (f" ({_count(p['active'])} active)" if p["active"] != p["total"] else "")
    row = (f"{part} train step ({size}, {cfg.moe.impl if cfg.moe else 'dense'}, {resolve_impl(cfg)} attention)",
           f"batch {r['batch']} x seq {r['seq']}", f"{r['tok_s']:,.0f} tok/s, {r['step_s'] * 1e3:.1f} ms",
           f"{mfu:.1%}" + (f" ({f[f'gpu_{part}_mfu_nominal']:.1%} of datasheet)" if nominal else ""),
           f"{r['compile_s']:.1f} s")
    return f, row


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke test (< 60 s on 2 cores)")
    p.add_argument("--parts", default="dense,moe,sampler", help="comma-separated subset of dense,moe,sampler")
    p.add_argument("--devices", type=int, default=1, help="data-parallel mesh over this many local devices")
    p.add_argument("--seq", type=int, default=None, help="training sequence length (4096; tiny 32)")
    p.add_argument("--dense-batch", type=int, default=None, help="dense global batch (4 per device; tiny 2)")
    p.add_argument("--moe-batch", type=int, default=None, help="MoE global batch (4 per device; tiny 2)")
    p.add_argument("--moe-impl", default="dropless", choices=("dropless", "capacity"))
    p.add_argument("--moe-experts", type=int, default=32, help="routed experts of the MoE config (16 for 80 GB)")
    p.add_argument("--steps", type=int, default=None, help="timed train steps after the first (8; tiny 2)")
    p.add_argument("--remat", default="none", choices=("none", "block", "dots"))
    p.add_argument("--attention-impl", default="auto", choices=ATTENTION_IMPLS,
                   help="ModelConfig.attention_impl (auto: cuDNN flash on GPU, the blocked kernel on CPU)")
    p.add_argument("--no-scan", dest="scan", action="store_false", help="unrolled layers (scan_layers=False)")
    p.add_argument("--sampler-batch", type=int, default=None, help="sampler rows (256; tiny 8)")
    p.add_argument("--prompt", type=int, default=None, help="sampler prompt tokens (128; tiny 4)")
    p.add_argument("--new", type=int, default=None, help="sampler new tokens per row (256; tiny 4)")
    p.add_argument("--peak-n", type=int, default=None, help="matmul size of the peak measurement (8192; tiny 256)")
    a = p.parse_args(argv)
    big, tiny = dict(seq=4096, dense_batch=4, moe_batch=4, steps=8, sampler_batch=256, prompt=128, new=256,
                     peak_n=8192), dict(seq=32, dense_batch=2, moe_batch=2, steps=2, sampler_batch=8, prompt=4, new=4,
                                        peak_n=256)
    for k, v in (tiny if a.tiny else big).items():
        if getattr(a, k) is None:  # train batches are per device by default, global when given
            setattr(a, k, v * a.devices if k in ("dense_batch", "moe_batch") else v)
    a.parts = [s for s in a.parts.split(",") if s]
    bad = set(a.parts) - {"dense", "moe", "sampler"}
    if bad:
        p.error(f"--parts: unknown {sorted(bad)}; choose from dense, moe, sampler")
    return a


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def result_line(fields: dict) -> str:
    return "RESULT " + " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())


def main(argv=None) -> dict:
    """Runs the benchmark, prints the table and RESULT lines; returns {RESULT key: value}."""
    a = parse(argv)
    t_start = time.perf_counter()
    devs = jax.devices()[: a.devices]
    if len(devs) < a.devices:
        raise SystemExit(f"--devices {a.devices}: only {len(devs)} {jax.default_backend()} devices")
    mesh = make_mesh(MeshConfig(data=a.devices), devs)
    kind = devs[0].device_kind
    nominal = nominal_tflops(kind) if devs[0].platform == "gpu" else None
    print(f"# bench.gpu on {device_name()} x {a.devices} (backend {jax.default_backend()}, jax {jax.__version__})"
          f"{' [--tiny: a smoke test, not a measurement]' if a.tiny else ''}", flush=True)
    print(f"# {kernel_libs(torch=False)}", flush=True)
    results, rows = {}, []

    peak = measure_peak(a.peak_n)
    results["gpu_peak_tflops"] = peak
    if nominal:
        results["gpu_nominal_tflops"] = nominal
    print(f"# bf16 matmul peak (n={a.peak_n}): {peak:.1f} TFLOP/s per device"
          + (f"; datasheet {nominal:.1f} TFLOP/s ({peak / nominal:.0%})" if nominal else ""), flush=True)
    print(result_line(results), flush=True)

    failed = []
    for part in ("dense", "moe"):
        if part not in a.parts and not (part == "dense" and "sampler" in a.parts):
            continue
        cfg = dense_config(a) if part == "dense" else moe_config(a)
        try:  # a part that breaks is reported and the next one still runs: the first GPU run is one call
            r = train_part(cfg, a.dense_batch if part == "dense" else a.moe_batch, a.seq, a.steps, mesh)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failed += [part] + (["sampler"] if part == "dense" and "sampler" in a.parts else [])
            gc.collect()
            continue
        params = r.pop("trained_params")
        if part in a.parts:
            f, row = train_result(part, cfg, r, peak, nominal, a.devices)
            results.update(f)
            rows.append(row)
            print(result_line(f), flush=True)
        if part == "dense" and "sampler" in a.parts:  # on the trained dense params, freed before the MoE state
            try:
                r = sampler_part(cfg, params, mesh, a.sampler_batch, a.prompt, a.new, runs=3)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                failed.append("sampler")
            else:
                f = {"gpu_sampler_tok_s": r["tok_s"], "gpu_sampler_compile_s": r["compile_s"]}
                results.update(f)
                rows.append(("sampler (dense, rl.sampler.generate)",
                             f"batch {r['batch']}, prompt {r['prompt']} + {r['new']} new",
                             f"{r['tok_s']:,.0f} new tok/s, {r['gen_s'] * 1e3:.0f} ms/call", "",
                             f"{r['compile_s']:.1f} s"))
                print(result_line(f), flush=True)
        del params
        gc.collect()

    print("\n| part | shape | throughput | MFU (measured peak) | compile |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\ncommand: python -m bench.gpu {shlex.join(argv if argv is not None else sys.argv[1:])}"
          f"\n# total {time.perf_counter() - t_start:.0f} s", flush=True)
    if failed:
        raise SystemExit(f"bench.gpu: {', '.join(failed)} failed (tracebacks above); the other parts' RESULT lines "
                         f"stand")
    return results


if __name__ == "__main__":
    main()
