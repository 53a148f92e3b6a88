"""Plan a run before paying for it: parameters, FLOPs, per-device memory on the experiment's mesh, KV cache, GPU-hours.

    python -m experiments.plan experiments/deepseek_v3.py --tokens 14.8e12
    python -m experiments.plan experiments/tiny_pretrain.py mesh.fsdp=2 model.remat=block --devices 8

Everything is computed from shapes (`model.abstract_params`, `jax.eval_shape`): nothing is allocated, no device
is needed. `plan(exp, ...) -> dict` is the core; the CLI prints it.

Parameters are `model.budget.count_params` (total / active / MTP); training FLOPs per token are
`model.budget.flops_per_token` at the sequence length (6·active matmul params + 6·L·H·T·(d_qk + d_v), MTP
included; full T×T attention, PaLM's convention).

Memory per device (bytes), on the mesh `exp.mesh` resolved over `devices` (default: the product of the fixed
axes; a -1 axis takes the rest):

- parameters: for every variable of `abstract_params(cfg)` (Params and the RouterBias buffers), its size times
  its dtype's bytes divided by the product of the mesh axes its logical axes map to under
  `sharding.rules.spec_for` (the same table and divisibility check the trainer uses). A parameter whose logical
  axes map only to size-1 mesh axes is replicated; the planner reports how much that is.
- optimizer state: AdamW's two moments at `moment_bytes` (4 = fp32) per trainable `nnx.Param`, plus an fp32
  master copy when the parameter dtype is 16-bit (`master_fp32`, default on for bf16/fp16), sharded like the
  parameter. This is the usual mixed-precision layout. Note: `train/optim.py` today uses `optax.adamw` with
  moments in the parameter dtype and no master copy (pass `moment_bytes=2, master_fp32=False` to plan that);
  DeepSeek-V3 itself kept bf16 moments and fp32 master weights + gradients (V3 report §3.3.3).
- gradients: one per trainable Param, in the parameter dtype, sharded like the parameter.
- activations, from the tokens one device holds per micro-step, n = (batch_size / loss.micro_batches /
  batch-parallel size)·seq, where the batch-parallel size is the product of the mesh axes the logical `batch`
  axis maps to (data·fsdp·expert by default). Per token and per layer, in compute-dtype bytes β, counting the
  tensors kept for the backward pass as Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models") do — their GPT layer with dropout and a materialised softmax is (34·d + 5·H·T)·T·b bytes
  (16-bit) — but for this code: pre-norm SwiGLU, flash-style attention (`model.fast_attention` keeps only the
  output and the fp32 log-sum-exp, no T×T residual) and no dropout. Head/MLP-sized terms are divided by the
  `tensor` axis size t.

      remat='none'   what the code keeps (jax's saved residuals, counted per tensor in experiments/memory.py):
                     every RMSNorm its output (β·width; its float32 statistics are recomputed), the residual
                     stream β·2d;
                     attention  MLA: β·(q_lora + kv_lora + 2·rope) (projection outputs) + β·H·(2·d_qk + 2·d_v)/t
                                    (q, k, v, output) + 4H/t (fp32 log-sum-exp); GQA: β·(2H + 2H_kv)·hd/t + 4H/t
                     dense MLP  β·3f/t  (SwiGLU: gate and up outputs and the product; silu is recomputed)
                     MoE        β·((1 + r + k)·d + (2r + 3s)·f_e/t) + 8E  (the flat input, r expert rows per
                                    token in, the k rows gathered to combine; gate/up outputs per row (6r for
                                    capacity and expert-parallel dispatch), the SwiGLU set per shared expert;
                                    fp32 router scores). 'dense': β·(d + (8r + 3s)·f_e/t) + 8E (+ the repeated
                                    gate weights and the gated product per row)
      remat='dots'   the layer input plus the projections' outputs (matmuls without batch dimensions) and the
                     routed experts' gate/up outputs (model.transformer._REMAT_POLICIES):
                     attention  β·(2d + [MLA: q_lora + kv_lora + rope]) + β·[MLA: H·(d_qk + d_nope + d_v) |
                                    GQA: (H + 2·H_kv)·hd]/t   (layer input, o_proj output, projection outputs)
                     dense MLP  β·(d + 2f/t);  MoE  β·((r+1)·d + (r+s)·2f_e/t) + 4E
      remat='block'  β·d per layer (its input).

  plus, outside the remat region, the head: (4 + β)·d + 4·V/t (final norm; fp32 exp(logits) kept for the
  cross-entropy backward), and per MTP depth: β·4d + (4 + β)·2d + one block under the same policy + the same
  head. On top, the backward's working set: the gradients of one layer's intermediates (the widest layer's
  'none' bytes, at least the fp32 logits' gradient 4·V/t), and under 'block' that layer's recomputed
  activations too. The MoE rows per token r come from the config's `moe.impl` and `moe.capacity_factor`
  (`experiments.memory.moe_rows_per_token`): E for 'dense', capacity_factor·k for 'capacity', k plus block
  padding for 'dropless' (E under expert parallelism, whose exact buffers hold n slots per expert).
- gradient accumulator: with loss.micro_batches > 1 a second gradient tree (the scan's running sum beside the
  micro-step's gradients, train/step.py).
- gathered experts: under expert parallelism with a sparse impl and remat='none', each MoE layer's E/ep
  experts' gate/up/down weights whole (gathered over fsdp on entry to the shard_map, kept for the backward).

  Checked against XLA: tests/test_plan.py compiles a Trainer step of a tiny DeepSeek-V3 on 8 devices (data 2 ×
  fsdp 2 × expert 2) for each impl and asserts the total within ±25 % of `memory_analysis()` argument + output
  + temp − alias bytes. Not modelled: the optimizer update's temporaries (XLA fuses AdamW's elementwise update
  into the donated buffers), collective staging buffers, fragmentation — keep headroom.
- KV cache for decoding `decode_batch` sequences of `decode_len` tokens: per token per layer MLA caches
  kv_lora + rope numbers (the normalised latent and the shared RoPE key), GQA caches 2·kv_heads·head_dim,
  in the compute dtype. MTP modules are not cached (dropped at inference). Per device: the decode batch split
  over the batch-parallel axes.

GPU-hours for `tokens` training tokens: flops_per_token·tokens / (mfu·gpu_flops) / 3600. Default peak
`gpu_flops` = 989e12: the dense BF16 tensor-core peak of an H800 SXM5 (same tensor throughput as the H100
SXM5: NVIDIA H100 datasheet, 1,979 TFLOP/s BF16 *with* 2:4 sparsity, i.e. ~989.5 dense; the H800 differs in
NVLink bandwidth and FP64). Default `mfu` = 0.40. An experiment module may define `REFERENCE = {...,
'gpu_hours': H, 'tokens': N}` (see experiments/deepseek_v3.py): the planner then prints the MFU that would
reproduce H GPU-hours at that peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from experiments.memory import BYTES as _BYTES
from experiments.memory import activation_bytes_per_token, gathered_expert_bytes  # noqa: F401  (re-exported)
from experiments.memory import kv_cache_bytes_per_token  # noqa: F401  (re-exported)

DEFAULT_GPU_FLOPS = 989e12  # H800/H100 SXM5 BF16 dense tensor-core peak
DEFAULT_MFU = 0.40
DEFAULT_GPU_MEM_GIB = 80.0  # H800 SXM5: 80 GB HBM3
GIB = 2 ** 30


# ---- mesh ------------------------------------------------------------------------------------------------

def mesh_sizes(mesh_cfg, devices: int | None = None) -> dict[str, int]:
    """Resolve a MeshConfig: a -1 axis is 'the rest' of `devices` (default: product of the fixed axes, or 1)."""
    from sharding.mesh import AXES
    fixed = math.prod(s for s in (getattr(mesh_cfg, a) for a in AXES) if s != -1)
    return mesh_cfg.resolve(fixed if devices is None else devices)


def _abstract_mesh(sizes: dict[str, int]):
    from jax.sharding import AbstractMesh

    from sharding.mesh import AXES
    return AbstractMesh(tuple(sizes[a] for a in AXES), AXES)


def _axes_product(logical: str, rules: dict, sizes: dict[str, int]) -> tuple[tuple[str, ...], int]:
    from sharding.rules import spec_for
    entry = spec_for((logical,), rules, _abstract_mesh(sizes))[0]
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return axes, math.prod(sizes[a] for a in axes)


# ---- parameters, optimizer, gradients ------------------------------------------------------------------

def sharded_param_bytes(cfg, sizes: dict[str, int], rules: dict | None = None) -> list[dict]:
    """Per variable of abstract_params(cfg): name, dtype bytes, global size, shard factor, trainable."""
    from flax import nnx

    from model import abstract_params
    from sharding.rules import DEFAULT_RULES, spec_for

    rules = DEFAULT_RULES if rules is None else rules
    mesh = _abstract_mesh(sizes)
    out = []
    for path, var in nnx.to_flat_state(abstract_params(cfg)):
        value = var.get_value()
        name = ".".join(map(str, path))
        spec = spec_for(var.get_metadata().get("axes"), rules, mesh, value.shape, name)
        factor = 1
        for entry in spec:
            for a in ((entry,) if isinstance(entry, str) else tuple(entry or ())):
                factor *= sizes[a]
        out.append({"name": name, "size": math.prod(value.shape), "itemsize": value.dtype.itemsize,
                    "shards": factor, "trainable": isinstance(var, nnx.Param)})
    return out


# ---- the plan ------------------------------------------------------------------------------------------

def gpu_hours(flops_per_tok: float, tokens: float, mfu: float, gpu_flops: float) -> float:
    return flops_per_tok * tokens / (mfu * gpu_flops) / 3600.0


def plan(exp, tokens: float | None = None, *, mfu: float = DEFAULT_MFU, gpu_flops: float = DEFAULT_GPU_FLOPS,
         gpu_mem_gib: float = DEFAULT_GPU_MEM_GIB, seq: int | None = None, batch_tokens: int | None = None,
         devices: int | None = None, decode_batch: int = 1, decode_len: int | None = None, rules: dict | None = None,
         moment_bytes: int = 4, master_fp32: bool | None = None,
         reference: dict | None = None) -> dict:
    """The planner's figures for an Experiment, as a dict (see the module docstring for every formula).

    tokens: training-token budget (default: `reference['tokens']` if given, else steps × batch tokens).
    seq: sequence length (default exp.data.seq_len); batch_tokens: global batch in tokens (default
    exp.batch_size × seq). reference: {'gpu_hours': H, 'tokens': N, ...} to compare with (implied MFU).
    """
    from model.budget import count_params, flops_per_token
    from sharding.rules import DEFAULT_RULES

    if not 0 < mfu <= 1:
        raise ValueError(f"mfu: must be in (0, 1], got {mfu}")
    rules = DEFAULT_RULES if rules is None else rules
    cfg = exp.model
    seq = seq or exp.data.seq_len
    batch_seqs = (batch_tokens / seq) if batch_tokens else exp.batch_size
    sizes = mesh_sizes(exp.mesh, devices)
    n_dev = math.prod(sizes.values())
    notes = []

    # parameters and FLOPs
    counts = count_params(cfg)
    fpt = flops_per_token(cfg, seq)
    dqk, dv = (cfg.mla.qk_head_dim, cfg.mla.v_head_dim) if cfg.mla else (cfg.head_dim, cfg.head_dim)
    attn_fpt = 6 * (cfg.n_layers + cfg.mtp_depth) * cfg.n_heads * seq * (dqk + dv)

    # parameters / optimizer / gradients per device
    variables = sharded_param_bytes(cfg, sizes, rules)
    p_bytes = sum(v["size"] * v["itemsize"] / v["shards"] for v in variables)
    p_repl = sum(v["size"] * v["itemsize"] for v in variables if v["shards"] == 1)
    if master_fp32 is None:
        master_fp32 = _BYTES[cfg.param_dtype] < 4
    opt_per_elem = 2 * moment_bytes + (4 if master_fp32 else 0)
    trainable = [v for v in variables if v["trainable"]]
    o_bytes = sum(v["size"] * opt_per_elem / v["shards"] for v in trainable)
    g_bytes = sum(v["size"] * v["itemsize"] / v["shards"] for v in trainable)

    # activations
    _, batch_par = _axes_product("batch", rules, sizes)
    micro = exp.loss.micro_batches
    micro_batch = batch_seqs / micro / batch_par
    if micro_batch != int(micro_batch):
        notes.append(f"global batch {batch_seqs:g} sequences / {micro} micro-batches does not divide over the "
                     f"batch-parallel size {batch_par}: {micro_batch:.3g} sequences per device per micro-step")
    tensor = sizes.get("tensor", 1)
    tokens_dev = micro_batch * seq
    ep = sizes.get("expert", 1)
    act = activation_bytes_per_token(cfg, tensor, tokens_dev, ep)
    a_bytes = act["total"] * tokens_dev
    # micro-batch accumulation holds two gradient trees: the scan's running sum and this micro-step's gradients
    acc_bytes = g_bytes if micro > 1 else 0.0
    w_bytes = gathered_expert_bytes(cfg, sizes)
    total = p_bytes + o_bytes + g_bytes + acc_bytes + w_bytes + a_bytes
    mem_cap = gpu_mem_gib * GIB
    dense_moe = None
    moe_impl = cfg.moe.impl if cfg.moe is not None else None
    if cfg.moe is not None and moe_impl != "dense":
        dense_cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, impl="dense"))
        dense_moe = activation_bytes_per_token(dense_cfg, tensor, tokens_dev, ep)["total"] * tokens_dev

    # KV cache
    decode_len = decode_len or seq
    kv_tok = kv_cache_bytes_per_token(cfg)
    kv_total = kv_tok * decode_batch * decode_len
    kv_dev = kv_tok * math.ceil(decode_batch / batch_par) * decode_len

    # compute
    batch_tok = batch_seqs * seq
    if tokens is None:
        tokens = float(reference["tokens"]) if reference and reference.get("tokens") else exp.steps * batch_tok
    total_flops = fpt * tokens
    hours = gpu_hours(fpt, tokens, mfu, gpu_flops)
    out = {
        "name": exp.name,
        "params": {"total": counts["total"], "active": counts["active"], "mtp": counts["mtp"],
                   "total_with_mtp": counts["total"] + counts["mtp"]},
        "flops": {"seq_len": seq, "per_token": fpt, "six_n_active": 6.0 * counts["active"],
                  "attention_per_token": float(attn_fpt)},
        "mesh": {"sizes": sizes, "devices": n_dev, "batch_parallel": batch_par, "global_batch_seqs": batch_seqs,
                 "batch_tokens": batch_tok, "micro_batches": micro, "micro_batch_per_device": micro_batch,
                 "remat": cfg.remat, "param_dtype": cfg.param_dtype, "compute_dtype": cfg.compute_dtype},
        "memory": {"params_bytes": p_bytes, "params_replicated_bytes": p_repl,
                   "params_sharded_bytes": p_bytes - p_repl, "optimizer_bytes": o_bytes,
                   "optimizer_layout": f"AdamW 2 moments x {moment_bytes} B"
                                       + (" + fp32 master" if master_fp32 else ""),
                   "gradients_bytes": g_bytes, "grad_accumulator_bytes": acc_bytes,
                   "gathered_expert_bytes": w_bytes, "activations_bytes": a_bytes,
                   "activations_per_token_bytes": act, "activations_dense_moe_bytes": dense_moe,
                   "moe_impl": moe_impl, "total_bytes": total, "device_bytes": mem_cap,
                   "fits": total <= mem_cap},
        "kv_cache": {"bytes_per_token": kv_tok, "decode_batch": decode_batch, "decode_len": decode_len,
                     "total_bytes": kv_total, "per_device_bytes": kv_dev},
        "compute": {"tokens": tokens, "total_flops": total_flops, "mfu": mfu, "gpu_flops": gpu_flops,
                    "gpu_hours": hours, "days_on_mesh": hours / n_dev / 24,
                    "steps": tokens / batch_tok},
        "reference": None,
        "notes": notes,
    }
    if reference:
        ref = dict(reference)
        if ref.get("gpu_hours"):
            ref_tokens = float(ref.get("tokens") or tokens)
            ref["implied_mfu"] = fpt * ref_tokens / (ref["gpu_hours"] * 3600 * gpu_flops)
            # the same with causal attention counted as half the T×T score FLOPs (Megatron's convention)
            ref["implied_mfu_causal"] = (fpt - attn_fpt / 2) * ref_tokens / (ref["gpu_hours"] * 3600 * gpu_flops)
            if ref.get("fp8_gpu_flops"):
                ref["implied_mfu_fp8_peak"] = fpt * ref_tokens / (ref["gpu_hours"] * 3600 * ref["fp8_gpu_flops"])
        out["reference"] = ref
    return out


# ---- printing ------------------------------------------------------------------------------------------

def _n(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3f}{unit}"
    return f"{x:.0f}"


def _gib(x: float) -> str:
    return f"{x / GIB:9.2f} GiB" if x >= GIB else f"{x / 2 ** 20:9.2f} MiB"


def _hours(h: float) -> str:
    return f"{h / 1e6:.3f}M" if h >= 1e5 else (f"{h:,.1f}" if h >= 10 else f"{h:.3g}")


def format_plan(p: dict) -> str:
    pa, fl, me, mem, kv, co = p["params"], p["flops"], p["mesh"], p["memory"], p["kv_cache"], p["compute"]
    axes = " x ".join(f"{a}={s}" for a, s in me["sizes"].items())
    act = mem["activations_per_token_bytes"]
    lines = [
        f"plan: {p['name']}",
        "parameters (model.budget.count_params)",
        f"  total  {_n(pa['total']):>10}   ({pa['total']:,})",
        f"  active {_n(pa['active']):>10}   per token: shared + top-k routed experts",
        f"  MTP    {_n(pa['mtp']):>10}   (excl. shared embedding/head; total incl. MTP {_n(pa['total_with_mtp'])})",
        (f"training FLOPs per token at seq {fl['seq_len']}: {fl['per_token']:.4g}"
         f"  (6·N_active = {fl['six_n_active']:.4g}; attention {fl['attention_per_token']:.3g})"),
        f"mesh: {axes}  ({me['devices']} devices; batch-parallel {me['batch_parallel']})",
        (f"  global batch {me['global_batch_seqs']:g} seqs = {_n(me['batch_tokens'])} tokens; {me['micro_batches']} "
         f"micro-batch(es) -> {me['micro_batch_per_device']:g} seq/device/micro-step; remat={me['remat']}; "
         f"params {me['param_dtype']}, compute {me['compute_dtype']}"),
        "memory per device",
        (f"  parameters  {_gib(mem['params_bytes'])}   (of which replicated on every device: "
         f"{_gib(mem['params_replicated_bytes']).strip()})"),
        f"  optimizer   {_gib(mem['optimizer_bytes'])}   ({mem['optimizer_layout']}, sharded like the params)",
        f"  gradients   {_gib(mem['gradients_bytes'])}"
        + (f"   (+ {_gib(mem['grad_accumulator_bytes']).strip()} micro-batch accumulator)"
           if mem["grad_accumulator_bytes"] else ""),
        *([f"  experts     {_gib(mem['gathered_expert_bytes'])}   (gathered expert weights kept for the backward)"]
          if mem["gathered_expert_bytes"] else []),
        (f"  activations {_gib(mem['activations_bytes'])}   ({act['total'] / 1024:.1f} KiB/token: layers "
         f"{act['layers'] / 1024:.1f}, backward {act['backward'] / 1024:.1f}, head {act['head'] / 1024:.1f}, "
         f"MTP {act['mtp'] / 1024:.1f}; MoE impl {mem['moe_impl']})"),
        f"  total       {_gib(mem['total_bytes'])}   of {_gib(mem['device_bytes']).strip()}: "
        + ("fits" if mem["fits"] else "DOES NOT FIT") + " (excl. XLA temporaries / comm buffers)",
    ]
    if mem["activations_dense_moe_bytes"] is not None:
        lines.append(f"  note: with model.moe.impl=dense (every expert on every token) the activations would be "
                     f"{_gib(mem['activations_dense_moe_bytes']).strip()}")
    lines += [
        (f"KV cache (decode): {kv['bytes_per_token']:,} B/token over all layers; batch {kv['decode_batch']} x "
         f"{kv['decode_len']} tokens = {_gib(kv['total_bytes']).strip()} "
         f"({_gib(kv['per_device_bytes']).strip()} per device)"),
        (f"compute for {co['tokens']:.4g} tokens: {co['total_flops']:.4g} FLOPs; at MFU {co['mfu']:.0%} of "
         f"{co['gpu_flops'] / 1e12:.0f} TFLOP/s per GPU: {_hours(co['gpu_hours'])} GPU-hours "
         f"= {co['days_on_mesh']:.1f} days on {me['devices']} GPUs; {co['steps']:,.0f} steps"),
    ]
    ref = p.get("reference")
    if ref:
        lines.append(f"reference: {ref.get('source', '')}")
        if ref.get("total_params"):
            lines.append(f"  params: {_n(ref['total_params'])} total / {_n(ref['active_params'])} active "
                         f"(ours {_n(pa['total'])} / {_n(pa['active'])})")
        if ref.get("gpu_hours"):
            ref_tokens = float(ref.get("tokens") or co["tokens"])
            ours = gpu_hours(p["flops"]["per_token"], ref_tokens, co["mfu"], co["gpu_flops"])
            lines.append(f"  {_hours(ref['gpu_hours'])} GPU-hours for {ref_tokens:.4g} tokens "
                         f"(ours at MFU {co['mfu']:.0%}: {_hours(ours)})"
                         f" -> implied MFU {ref['implied_mfu']:.1%} of {co['gpu_flops'] / 1e12:.0f} TFLOP/s"
                         + (f" ({ref['implied_mfu_fp8_peak']:.1%} of the {ref['fp8_gpu_flops'] / 1e12:.0f} "
                            f"TFLOP/s FP8 peak)" if ref.get("implied_mfu_fp8_peak") else "")
                         + f"; {ref['implied_mfu_causal']:.1%} counting causal attention as half")
        if ref.get("total_gpu_hours"):
            lines.append(f"  all stages incl. context extension and post-training: "
                         f"{_hours(ref['total_gpu_hours'])} GPU-hours")
    lines += [f"note: {n}" for n in p["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.plan",
        description="Parameters, FLOPs, per-device memory, KV cache and GPU-hours of an experiment "
                    "(shapes only, nothing allocated). Formulas: see the module docstring.")
    ap.add_argument("experiment", help="experiment file defining config() -> Experiment")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, as for experiments.run")
    ap.add_argument("--tokens", type=float, default=None,
                    help="training tokens (default: the experiment's REFERENCE tokens, else steps x batch tokens)")
    ap.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"model FLOPs utilisation (default {DEFAULT_MFU})")
    ap.add_argument("--gpu-flops", type=float, default=DEFAULT_GPU_FLOPS,
                    help="per-GPU peak FLOP/s (default 989e12: H800 SXM5 BF16 dense tensor-core peak, same as "
                         "H100 SXM5 — NVIDIA H100 datasheet, 1,979 TFLOP/s with sparsity / 2)")
    ap.add_argument("--gpu-mem-gib", type=float, default=DEFAULT_GPU_MEM_GIB,
                    help="per-GPU memory in GiB to check against (default 80: H800/H100 80 GB)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: data.seq_len)")
    ap.add_argument("--batch-tokens", type=float, default=None,
                    help="global batch in tokens (default: batch_size x seq)")
    ap.add_argument("--devices", type=int, default=None,
                    help="devices for a -1 mesh axis (default: product of the fixed axes)")
    ap.add_argument("--decode-batch", type=int, default=1, help="KV cache: sequences (default 1)")
    ap.add_argument("--decode-len", type=int, default=None, help="KV cache: tokens per sequence (default: seq)")
    ap.add_argument("--moment-bytes", type=int, default=4, help="bytes per AdamW moment (default 4: fp32)")
    ap.add_argument("--no-master", action="store_true", help="no fp32 master copy of 16-bit parameters")
    ap.add_argument("--reference-gpu-hours", type=float, default=None,
                    help="GPU-hours to compare with (implied MFU); default: the experiment's REFERENCE")
    args = ap.parse_intermixed_args(argv)

    from experiments.overrides import OverrideError
    from experiments.run import load_experiment
    from sharding.mesh import ShardingError
    try:
        module, exp = load_experiment(args.experiment, args.overrides)
        reference = dict(getattr(module, "REFERENCE", {}) or {})
        if args.reference_gpu_hours:
            reference["gpu_hours"] = args.reference_gpu_hours
            reference.setdefault("source", "--reference-gpu-hours")
        p = plan(exp, args.tokens, mfu=args.mfu, gpu_flops=args.gpu_flops, gpu_mem_gib=args.gpu_mem_gib,
                 seq=args.seq, batch_tokens=args.batch_tokens and int(args.batch_tokens), devices=args.devices,
                 decode_batch=args.decode_batch, decode_len=args.decode_len,
                 moment_bytes=args.moment_bytes, master_fp32=False if args.no_master else None,
                 reference=reference or None)
    except (OverrideError, ShardingError, ValueError, FileNotFoundError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
