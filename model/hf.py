"""Hugging Face checkpoints: `load_hf(directory)` and `save_hf(cfg, params, directory)`.

Reads `config.json` and single or sharded `*.safetensors` (with `model.safetensors.index.json`) for
Llama, Qwen2, Qwen3 and DeepSeek-V3 with the tensor names the Hub checkpoints use (one tensor per routed
expert, MTP modules as extra layers `model.layers.{n_layers + k}`). Every tensor is checked: a missing,
unexpected or mis-shaped tensor raises CheckpointError naming it (and both shapes) before any is used.

DeepSeek stores its rotary dims interleaved (`rope_interleave`); we permute those rows at load time into
the rotate-half layout our one RoPE uses, and back on save, so the attention scores are unchanged.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from model import hf_slices
from model.config import ModelConfig
from model.hf_config import config_from_hf, config_to_hf
from model.transformer import abstract_params
from sharding.rules import DEFAULT_RULES, param_shardings

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint does not match its config: missing, unexpected or mis-shaped tensor."""


@dataclass(frozen=True)
class Rule:
    """One of our parameters: its HF tensor(s) and the layout change between them.

    to_ours(hf arrays) -> our array; to_hf(our array) -> hf arrays (same order as `hf_names`).
    read(get, index) -> our array's `index` (a tuple of slices) from only the HF slices behind it
    (`model.hf_slices`: the sharded load of `load_hf(mesh=...)`).
    A stacked parameter of a scanned config (`stack_rules`) keeps its per-layer rules in `parts` (layer order;
    `hf_names` is their concatenation), so a loader can build one layer's slice from that layer's tensors.
    """

    path: tuple
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    to_ours: Callable
    to_hf: Callable
    parts: tuple["Rule", ...] = ()
    read: Callable | None = None


def _deinterleave(r: int) -> np.ndarray:
    return np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])


def _linear(path, name, d_in, out_shape, row_perm=None):
    """HF nn.Linear weight [prod(out_shape), d_in] <-> our kernel [d_in, *out_shape]."""
    n_out = int(np.prod(out_shape))
    inv = None if row_perm is None else np.argsort(row_perm)

    def to_ours(w):
        w = w if row_perm is None else w[row_perm]
        return w.T.reshape((d_in,) + tuple(out_shape))

    def to_hf(k):
        w = k.reshape(d_in, n_out).T
        return (w if inv is None else w[inv],)

    return Rule(path, (name,), ((n_out, d_in),), lambda w: to_ours(w), to_hf,
                read=hf_slices.linear(name, d_in, tuple(out_shape), row_perm))


def _out_linear(path, name, in_shape, d_out):
    """HF weight [d_out, prod(in_shape)] <-> our kernel [*in_shape, d_out]."""
    n_in = int(np.prod(in_shape))
    return Rule(path, (name,), ((d_out, n_in),), lambda w: w.T.reshape(tuple(in_shape) + (d_out,)),
                lambda k: (k.reshape(n_in, d_out).T,), read=hf_slices.out_linear(name, tuple(in_shape), d_out))


def _same(path, name, shape):
    return Rule(path, (name,), (tuple(shape),), lambda w: w, lambda k: (k,), read=hf_slices.same(name))


def _experts(path, names, e, shape_hf):
    """Per-expert HF weights [out, in] <-> our stacked kernel [E, in, out]."""
    return Rule(path, tuple(names), (tuple(shape_hf),) * e, lambda *ws: np.stack([w.T for w in ws]),
                lambda k: tuple(k[i].T for i in range(e)), read=hf_slices.experts(tuple(names)))


def _qk_perm(cfg: ModelConfig, n_heads: int, interleaved: bool):
    """Row permutation of a [heads * (nope + rope)] projection: de-interleave each head's rope dims."""
    m = cfg.mla
    if not interleaved:
        return None
    per_head = np.concatenate([np.arange(m.qk_nope_head_dim), m.qk_nope_head_dim + _deinterleave(m.qk_rope_head_dim)])
    return np.concatenate([h * m.qk_head_dim + per_head for h in range(n_heads)])


def _mlp_rules(path, prefix, d, f):
    return [_linear(path + ("gate_proj", "kernel"), f"{prefix}.gate_proj.weight", d, (f,)),
            _linear(path + ("up_proj", "kernel"), f"{prefix}.up_proj.weight", d, (f,)),
            _linear(path + ("down_proj", "kernel"), f"{prefix}.down_proj.weight", f, (d,))]


def _block_rules(cfg: ModelConfig, path: tuple, prefix: str, moe: bool, interleaved: bool) -> list[Rule]:
    d, h = cfg.d_model, cfg.n_heads
    rules = [_same(path + ("input_layernorm", "scale"), f"{prefix}.input_layernorm.weight", (d,)),
             _same(path + ("post_attention_layernorm", "scale"), f"{prefix}.post_attention_layernorm.weight", (d,))]
    a, ap = path + ("self_attn",), f"{prefix}.self_attn"
    if cfg.mla is not None:
        m = cfg.mla
        qperm = _qk_perm(cfg, h, interleaved)
        if m.q_lora_rank is None:
            rules.append(_linear(a + ("q_proj",), f"{ap}.q_proj.weight", d, (h, m.qk_head_dim), qperm))
        else:
            rules += [_linear(a + ("q_a_proj",), f"{ap}.q_a_proj.weight", d, (m.q_lora_rank,)),
                      _same(a + ("q_a_layernorm", "scale"), f"{ap}.q_a_layernorm.weight", (m.q_lora_rank,)),
                      _linear(a + ("q_b_proj",), f"{ap}.q_b_proj.weight", m.q_lora_rank, (h, m.qk_head_dim), qperm)]
        kv_perm = None
        if interleaved:
            kv_perm = np.concatenate([np.arange(m.kv_lora_rank), m.kv_lora_rank + _deinterleave(m.qk_rope_head_dim)])
        rules += [_linear(a + ("kv_a_proj",), f"{ap}.kv_a_proj_with_mqa.weight", d,
                          (m.kv_lora_rank + m.qk_rope_head_dim,), kv_perm),
                  _same(a + ("kv_a_layernorm", "scale"), f"{ap}.kv_a_layernorm.weight", (m.kv_lora_rank,)),
                  _linear(a + ("kv_b_proj",), f"{ap}.kv_b_proj.weight", m.kv_lora_rank,
                          (h, m.qk_nope_head_dim + m.v_head_dim)),
                  _out_linear(a + ("o_proj",), f"{ap}.o_proj.weight", (h, m.v_head_dim), d)]
    else:
        kv, hd = cfg.n_kv_heads, cfg.head_dim
        for name, heads in (("q", h), ("k", kv), ("v", kv)):
            rules.append(_linear(a + (f"{name}_proj",), f"{ap}.{name}_proj.weight", d, (heads, hd)))
            if cfg.qkv_bias:
                rules.append(Rule(a + (f"{name}_bias",), (f"{ap}.{name}_proj.bias",), ((heads * hd,),),
                                  lambda b, heads=heads: b.reshape(heads, hd), lambda b: (b.reshape(-1),),
                                  read=hf_slices.reshaped(f"{ap}.{name}_proj.bias", (heads, hd))))
        rules.append(_out_linear(a + ("o_proj",), f"{ap}.o_proj.weight", (h, hd), d))
        if cfg.o_bias:
            rules.append(_same(a + ("o_bias",), f"{ap}.o_proj.bias", (d,)))
        if cfg.qk_norm:
            rules += [_same(a + ("q_norm", "scale"), f"{ap}.q_norm.weight", (hd,)),
                      _same(a + ("k_norm", "scale"), f"{ap}.k_norm.weight", (hd,))]
    mp, mpre = path + ("mlp",), f"{prefix}.mlp"
    if moe:
        e, f = cfg.moe.n_routed_experts, cfg.moe.mlp_dim
        rules += [_linear(mp + ("gate", "kernel"), f"{mpre}.gate.weight", d, (e,)),
                  _same(mp + ("gate", "bias"), f"{mpre}.gate.e_score_correction_bias", (e,))]
        for proj, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            names = [f"{mpre}.experts.{i}.{proj}.weight" for i in range(e)]
            rules.append(_experts(mp + ("experts", proj), names, e, shape))
        if cfg.moe.n_shared_experts:
            rules += _mlp_rules(mp + ("shared_experts",), f"{mpre}.shared_experts", d,
                                cfg.moe.mlp_dim * cfg.moe.n_shared_experts)
    else:
        rules += _mlp_rules(mp, mpre, d, cfg.mlp_dim)
    return rules


def weight_rules(cfg: ModelConfig, interleaved: bool = True) -> list[Rule]:
    """Every parameter of `cfg` with the HF tensors it comes from."""
    d, v = cfg.d_model, cfg.vocab_size
    rules = [_same(("embed_tokens", "embedding"), "model.embed_tokens.weight", (v, d)),
             _same(("norm", "scale"), "model.norm.weight", (d,))]
    if not cfg.tie_embeddings:
        rules.append(_linear(("lm_head", "kernel"), "lm_head.weight", d, (v,)))
    for i, moe in enumerate(cfg.is_moe_layer):
        rules += _block_rules(cfg, ("layers", i), f"model.layers.{i}", moe, interleaved)
    for k in range(cfg.mtp_depth):
        n, p, pre = cfg.n_layers + k, ("mtp", k), f"model.layers.{cfg.n_layers + k}"
        moe = cfg.moe is not None and n >= cfg.moe.first_k_dense
        rules += [_same(p + ("enorm", "scale"), f"{pre}.enorm.weight", (d,)),
                  _same(p + ("hnorm", "scale"), f"{pre}.hnorm.weight", (d,)),
                  _linear(p + ("eh_proj", "kernel"), f"{pre}.eh_proj.weight", 2 * d, (d,)),
                  _same(p + ("norm", "scale"), f"{pre}.shared_head.norm.weight", (d,))]
        rules += _block_rules(cfg, p + ("block",), pre, moe, interleaved)
    return stack_rules(cfg, rules) if cfg.scan_layers else rules


def stack_rules(cfg: ModelConfig, rules: list[Rule]) -> list[Rule]:
    """Per-layer rules ('layers', i, *rest) -> one rule per stacked parameter (stack, *rest) of the scanned
    layout (`model.transformer.layer_stacks`): to_ours stacks the layers' arrays on a new axis 0 and to_hf
    splits it, so load_hf/save_hf move between HF's per-layer tensors and our [n_layers_in_stack, ...] leaves."""
    from model.transformer import layer_stacks

    owner = [name for name, n in layer_stacks(cfg).items() for _ in range(n)]  # layer index -> its stack
    out, groups = [], {}
    for r in rules:
        if r.path[0] != "layers":
            out.append(r)
            continue
        key = (owner[r.path[1]],) + r.path[2:]
        if key not in groups:
            groups[key] = []
            out.append(key)  # placeholder keeps the first layer's position in the order
        groups[key].append(r)
    return [_stacked(k, groups[k]) if isinstance(k, tuple) else k for k in out]


def _stacked(path: tuple, parts: list[Rule]) -> Rule:
    counts = [len(p.hf_names) for p in parts]
    starts = np.cumsum([0] + counts)

    def to_ours(*ws):
        return np.stack([p.to_ours(*ws[a:b]) for p, a, b in zip(parts, starts[:-1], starts[1:])])

    def to_hf(k):
        return tuple(w for i, p in enumerate(parts) for w in p.to_hf(k[i]))

    return Rule(path, tuple(n for p in parts for n in p.hf_names), tuple(s for p in parts for s in p.hf_shapes),
                to_ours, to_hf, tuple(parts))


def _mtp_shared_copies(cfg: ModelConfig) -> dict[str, str]:
    """Hub MTP layers repeat the embedding and head; they are shared here. copy name -> main name."""
    out = {}
    for k in range(cfg.mtp_depth):
        pre = f"model.layers.{cfg.n_layers + k}"
        out[f"{pre}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"{pre}.shared_head.head.weight"] = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    return out


class _Reader:
    """Lazy access to the tensors of a checkpoint directory (single file or sharded with an index)."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as fh:
                weight_map = json.load(fh)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{directory}: no *.safetensors files")
            weight_map = {}
            for f in files:
                with safe_open(os.path.join(directory, f), "numpy") as fh:
                    weight_map.update({k: f for k in fh.keys()})
        self.directory, self.weight_map, self._open = directory, weight_map, {}
        # tensors are read through memory maps: safetensors' numpy framework has no bfloat16
        self.files = hf_slices.TensorFiles(directory, weight_map)

    def names(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self.files.get(name))

    def _file(self, name):
        f = self.weight_map[name]
        if f not in self._open:
            path = os.path.join(self.directory, f)
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: listed in the index for {name!r} but missing")
            self._open[f] = safe_open(path, "numpy")
        return self._open[f]


def load_hf(directory: str, *, param_dtype: str = "float32", mtp: str = "auto", mesh=None,
            rules: dict = DEFAULT_RULES,
            scan_layers: bool | None = None) -> tuple[ModelConfig, nnx.State]:
    """Read a Hugging Face checkpoint directory -> (ModelConfig, params).

    mesh: when given, every parameter is built directly into its NamedSharding under the sharding `rules`
    (logical axis -> mesh axes): each device reads only its shard's slices of the files, cast on the host to
    the parameter dtype (`model.hf_slices`), so no device ever holds more than its shard. Without a mesh the
    params are whole arrays on the default device.

    scan_layers: the returned config's `scan_layers` (None keeps ModelConfig's default); True stacks the layers'
    tensors into the scanned layout (`stack_rules`).

    mtp: 'auto' loads the MTP modules if the checkpoint has them and otherwise sets mtp_depth=0 with a
    warning (transformers' save_pretrained does not write them); 'require' raises if absent; 'drop' ignores them.
    """
    sharding_rules = rules  # `rules` below is the checkpoint rules
    with open(os.path.join(directory, "config.json")) as fh:
        hf_cfg = json.load(fh)
    cfg = config_from_hf(hf_cfg, param_dtype=param_dtype)
    if scan_layers is not None:
        cfg = cfg.replace(scan_layers=scan_layers)
    reader = _Reader(directory)
    present = reader.names()
    if cfg.mtp_depth:
        has_mtp = any(n.startswith(f"model.layers.{cfg.n_layers}.") for n in present)
        if mtp == "drop" or (mtp == "auto" and not has_mtp):
            if not has_mtp:
                log.warning("%s: config has num_nextn_predict_layers=%d but the checkpoint has no MTP tensors; "
                            "loading with mtp_depth=0", directory, cfg.mtp_depth)
            present = {n for n in present if not _is_mtp(n, cfg)}
            cfg = cfg.replace(mtp_depth=0)
        elif mtp == "require" and not has_mtp:
            raise CheckpointError(f"{directory}: MTP tensors required but absent "
                                  f"(e.g. 'model.layers.{cfg.n_layers}.eh_proj.weight')")
    interleaved = bool(hf_cfg.get("rope_interleave", True)) if cfg.mla is not None else False
    rules = weight_rules(cfg, interleaved)
    expected = {n for r in rules for n in r.hf_names}
    copies = _mtp_shared_copies(cfg)
    ignorable = set(copies) | {n for n in present if n.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        ignorable.add("lm_head.weight")  # some tied checkpoints also store the head; it must equal the embedding
    missing = sorted(expected - present)
    if missing:
        raise CheckpointError(f"{directory}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)"
                                                                              if len(missing) > 1 else ""))
    unexpected = sorted(present - expected - ignorable)
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensor {unexpected[0]!r}" +
                              (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for r in rules:
        for name, shape in zip(r.hf_names, r.hf_shapes):
            got = reader.shape(name)
            if got != shape:
                raise CheckpointError(f"{directory}: tensor {name!r} has shape {got}, config expects {shape}")
    if cfg.tie_embeddings and "lm_head.weight" in present:
        if not np.array_equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
            raise CheckpointError(f"{directory}: tie_word_embeddings=True but lm_head.weight differs from the embedding")

    if mesh is not None:
        abstract = abstract_params(cfg)
        shardings = param_shardings(abstract, mesh, sharding_rules)
        return cfg, hf_slices.load_sharded(rules, reader.files, abstract, shardings)

    flat = dict(nnx.to_flat_state(abstract_params(cfg)))
    by_path = {r.path: r for r in rules}
    out = {}
    for path, var in flat.items():
        rule = by_path.get(path)
        if rule is None:
            raise CheckpointError(f"no checkpoint rule for parameter {'.'.join(map(str, path))}")
        value = rule.to_ours(*[reader.get(n).astype(np.float32) for n in rule.hf_names])
        want = var.get_value()
        if value.shape != want.shape:
            raise CheckpointError(f"parameter {'.'.join(map(str, path))}: built shape {value.shape}, "
                                  f"model expects {want.shape}")
        out[path] = var.replace(jnp.asarray(value, dtype=want.dtype))
    return cfg, nnx.from_flat_state(out)


def _is_mtp(name: str, cfg: ModelConfig) -> bool:
    if not name.startswith("model.layers."):
        return False
    return int(name.split(".")[2]) >= cfg.n_layers


def save_hf(cfg: ModelConfig, params: nnx.State, directory: str, *, dtype: str | None = None,
            max_shard_bytes: int = 4 << 30) -> None:
    """Write `config.json` and safetensors (sharded with an index above `max_shard_bytes`) that
    transformers' `from_pretrained` loads to the same logits."""
    os.makedirs(directory, exist_ok=True)
    rules = weight_rules(cfg, interleaved=True)
    flat = dict(nnx.to_flat_state(params))
    tensors: dict[str, np.ndarray] = {}
    np_dtype = jnp.dtype(dtype or cfg.param_dtype)
    for r in rules:
        if r.path not in flat:
            raise CheckpointError(f"params lack {'.'.join(map(str, r.path))} required by the config")
        value = np.asarray(flat[r.path].get_value(), dtype=np.float32)
        for name, arr in zip(r.hf_names, r.to_hf(value)):
            keep_f32 = name.endswith("e_score_correction_bias") or name.endswith("mlp.gate.weight")
            tensors[name] = np.ascontiguousarray(arr.astype(np.float32 if keep_f32 else np_dtype))
    for copy, main in _mtp_shared_copies(cfg).items():
        tensors[copy] = tensors[main]
    extra = set(flat) - {r.path for r in rules}
    if extra:
        raise CheckpointError(f"params have {'.'.join(map(str, sorted(extra)[0]))} that the config does not describe")
    hf_cfg = config_to_hf(cfg)
    hf_cfg["torch_dtype"] = str(np_dtype)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(hf_cfg, fh, indent=2)
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensors[name], size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
