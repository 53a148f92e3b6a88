"""Hugging Face `config.json` <-> ModelConfig for Llama, Qwen2, Qwen3 and DeepSeek-V3.

Both rope styles found on the Hub are accepted: `rope_theta` + `rope_scaling` (older) and
`rope_parameters` (transformers 5). A field we do not implement raises ConfigError naming it; nothing is
silently dropped.
"""

from __future__ import annotations

import math
from typing import Any

from model.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, RopeConfig

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "deepseek_v3": "DeepseekV3ForCausalLM"}


def _require(d: dict, key: str):
    if key not in d or d[key] is None:
        raise ConfigError(f"config.json: missing required field {key!r}")
    return d[key]


def _expect(d: dict, key: str, allowed, default=None):
    v = d.get(key, default)
    if v is None:
        v = default
    if v not in allowed:
        raise ConfigError(f"config.json: unsupported {key}={v!r} (supported: {list(allowed)})")
    return v


def _rope_from_hf(d: dict) -> RopeConfig:
    params = dict(d.get("rope_parameters") or {})
    if "rope_scaling" in d and d["rope_scaling"]:
        params = {**d["rope_scaling"], **params}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rtype = params.get("rope_type", params.get("type", "default"))
    if rtype not in ("default", "linear", "llama3", "yarn"):
        raise ConfigError(f"config.json: unsupported rope_type={rtype!r} (supported: default, linear, llama3, yarn)")
    kw: dict[str, Any] = {"theta": float(theta), "type": rtype}
    if rtype != "default":
        kw["factor"] = float(_require(params, "factor"))
    if rtype in ("yarn", "llama3"):
        orig = params.get("original_max_position_embeddings")
        if orig is None:
            if rtype == "yarn":
                orig = d.get("max_position_embeddings")
            else:
                _require(params, "original_max_position_embeddings")
        kw["original_max_position_embeddings"] = int(orig)
    if rtype == "yarn":
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            if params.get(key) is not None:
                kw[key] = float(params[key])
        if params.get("attention_factor") is not None:
            kw["attention_factor"] = float(params["attention_factor"])
        if params.get("truncate") is not None:
            kw["truncate"] = bool(params["truncate"])
    if rtype == "llama3":
        kw["low_freq_factor"] = float(_require(params, "low_freq_factor"))
        kw["high_freq_factor"] = float(_require(params, "high_freq_factor"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"config.json: unsupported partial_rotary_factor={params['partial_rotary_factor']}")
    return RopeConfig(**kw)


def _max_seq_len(d: dict, rope: RopeConfig) -> int:
    """The context to run at: max_position_embeddings, raised to original x factor when YaRN is set.

    Why: transformers applies YaRN at every length for every family (`_compute_yarn_parameters` has no length
    gate), while our rope applies it only when max_seq_len exceeds the original context (`RopeConfig.active`,
    as the reference DeepSeek-V3). Qwen/Llama YaRN configs often keep max_position_embeddings equal to the
    original (Qwen2.5: 32768 and factor 4); taking it as max_seq_len would silently drop YaRN and stop
    matching transformers. original x factor is the extended context the YaRN config describes.
    """
    mpe = int(d.get("max_position_embeddings", 4096))
    if rope.type == "yarn":
        return max(mpe, int(math.ceil(rope.original_max_position_embeddings * rope.factor)))
    return mpe


def config_from_hf(d: dict, *, param_dtype: str = "float32", compute_dtype: str = "float32") -> ModelConfig:
    """A parsed config.json -> ModelConfig. Raises ConfigError naming any unsupported field."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(f"config.json: unsupported model_type={model_type!r} (supported: {sorted(SUPPORTED)})")
    _expect(d, "hidden_act", ("silu",), "silu")
    n_heads = int(_require(d, "num_attention_heads"))
    d_model = int(_require(d, "hidden_size"))
    rope = _rope_from_hf(d)
    common = dict(
        vocab_size=int(_require(d, "vocab_size")), d_model=d_model, n_layers=int(_require(d, "num_hidden_layers")),
        n_heads=n_heads, mlp_dim=int(_require(d, "intermediate_size")), norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        rope=rope, max_seq_len=_max_seq_len(d, rope),
        init_std=float(d.get("initializer_range", 0.02)), param_dtype=param_dtype, compute_dtype=compute_dtype)
    if model_type == "deepseek_v3":
        _expect(d, "attention_bias", (False,), False)
        _expect(d, "scoring_func", ("sigmoid",), "sigmoid")
        _expect(d, "topk_method", ("noaux_tc",), "noaux_tc")
        _expect(d, "moe_layer_freq", (1,), 1)
        mla = MLAConfig(kv_lora_rank=int(_require(d, "kv_lora_rank")), q_lora_rank=d.get("q_lora_rank"),
                        qk_nope_head_dim=int(_require(d, "qk_nope_head_dim")),
                        qk_rope_head_dim=int(_require(d, "qk_rope_head_dim")), v_head_dim=int(_require(d, "v_head_dim")))
        moe = MoEConfig(n_routed_experts=int(_require(d, "n_routed_experts")),
                        n_shared_experts=int(d.get("n_shared_experts") or 0),
                        experts_per_token=int(_require(d, "num_experts_per_tok")),
                        mlp_dim=int(_require(d, "moe_intermediate_size")),
                        first_k_dense=int(d.get("first_k_dense_replace") or 0), score_func="sigmoid",
                        n_groups=int(d.get("n_group") or 1), topk_groups=int(d.get("topk_group") or 1),
                        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)))
        mtp = d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0
        return ModelConfig(**common, n_kv_heads=n_heads, head_dim=mla.qk_head_dim, mla=mla, moe=moe,
                           mtp_depth=int(mtp))
    head_dim = d.get("head_dim") or d_model // n_heads
    kv = int(d.get("num_key_value_heads") or n_heads)
    if model_type == "qwen2":
        if d.get("use_sliding_window"):
            raise ConfigError("config.json: unsupported use_sliding_window=True")
        return ModelConfig(**common, n_kv_heads=kv, head_dim=int(head_dim), qkv_bias=True)
    _expect(d, "mlp_bias", (False,), False)
    if model_type == "qwen3" and d.get("use_sliding_window"):
        raise ConfigError("config.json: unsupported use_sliding_window=True")
    bias = bool(d.get("attention_bias", False))
    return ModelConfig(**common, n_kv_heads=kv, head_dim=int(head_dim), qkv_bias=bias, o_bias=bias,
                       qk_norm=model_type == "qwen3")


def model_type_of(cfg: ModelConfig) -> str:
    """The Hugging Face family a config exports to."""
    if cfg.mla is not None or cfg.moe is not None:
        if cfg.mla is None or cfg.moe is None:
            raise ConfigError("export: DeepseekV3ForCausalLM needs both mla and moe set")
        return "deepseek_v3"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.o_bias:
        return "qwen2"
    return "llama"


def _rope_to_hf(r: RopeConfig) -> dict:
    out: dict[str, Any] = {"rope_type": r.type, "rope_theta": r.theta}
    if r.type != "default":
        out["factor"] = r.factor
    if r.type in ("yarn", "llama3"):
        out["original_max_position_embeddings"] = r.original_max_position_embeddings
    if r.type == "yarn":
        out.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow, mscale=r.mscale, mscale_all_dim=r.mscale_all_dim,
                   truncate=r.truncate)
        if r.attention_factor is not None:
            out["attention_factor"] = r.attention_factor
    if r.type == "llama3":
        out.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    return out


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> a config.json dict that transformers loads."""
    mt = model_type_of(cfg)
    d: dict[str, Any] = {
        "architectures": [SUPPORTED[mt]], "model_type": mt, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std, "rope_parameters": _rope_to_hf(cfg.rope),
        "rope_theta": cfg.rope.theta, "torch_dtype": cfg.param_dtype,
    }
    if mt == "deepseek_v3":
        m, e = cfg.mla, cfg.moe
        d.update(num_key_value_heads=cfg.n_heads, kv_lora_rank=m.kv_lora_rank, q_lora_rank=m.q_lora_rank,
                 qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim,
                 v_head_dim=m.v_head_dim, n_routed_experts=e.n_routed_experts, n_shared_experts=e.n_shared_experts,
                 num_experts_per_tok=e.experts_per_token, moe_intermediate_size=e.mlp_dim,
                 first_k_dense_replace=e.first_k_dense, n_group=e.n_groups, topk_group=e.topk_groups,
                 norm_topk_prob=e.norm_topk_prob, routed_scaling_factor=e.routed_scaling_factor,
                 scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=cfg.mtp_depth,
                 rope_interleave=True, attention_bias=False)
        if e.score_func != "sigmoid":
            raise ConfigError("export: DeepseekV3ForCausalLM supports only moe.score_func='sigmoid'")
    else:
        d.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)
        if mt in ("llama", "qwen3"):
            d.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
        if cfg.qkv_bias != cfg.o_bias and mt != "qwen2":
            raise ConfigError("export: qkv_bias and o_bias must match for Llama/Qwen3 (attention_bias)")
    return d
