"""Model configuration: one frozen dataclass for Llama/Qwen2/Qwen3 dense decoders and DeepSeek-V3.

Every field is validated at construction; an invalid value raises `ConfigError` naming the field.
Sub-configs are `None` when the feature is off: `mla=None` means grouped-query attention,
`moe=None` means every layer has a dense SwiGLU MLP.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from sharding.mesh import ShardingError


class ConfigError(ValueError):
    """A configuration field has an invalid or unsupported value."""


class ExpertAxisError(ConfigError, ShardingError):
    """Routed experts that do not split evenly over the `expert` mesh axis (a config and a sharding error)."""


def _check(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {msg}")


_DTYPES = ("float32", "bfloat16", "float16")
# 'auto': cuDNN flash attention on GPU (bf16/fp16 compute), the blocked CPU kernel on CPU, XLA elsewhere
ATTENTION_IMPLS = ("auto", "cudnn", "xla", "cpu_blocked")
MOE_IMPLS = ("dense", "capacity", "dropless")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding and its context-extension variants (HF `rope_parameters`).

    type: 'default' | 'linear' | 'llama3' | 'yarn'.
    For YaRN, `mscale`/`mscale_all_dim` follow DeepSeek: cos/sin are scaled by
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) (or `attention_factor` if given), and MLA's
    softmax scale is multiplied by mscale(factor, mscale_all_dim)**2.
    """

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3

    def active(self, max_seq_len: int) -> "RopeConfig":
        """The rope a run with context `max_seq_len` uses: YaRN only when the context exceeds
        `original_max_position_embeddings`, else plain RoPE at the same theta.

        As the reference DeepSeek-V3 model (inference/model.py: `if args.max_seq_len > args.original_seq_len`
        gates both the frequency ramp and the softmax mscale): V3 pretrained at 4K without the extension (§4.3),
        so a 4K run of the published config must not rotate with factor-40 frequencies.
        """
        if self.type == "yarn" and max_seq_len <= self.original_max_position_embeddings:
            return RopeConfig(theta=self.theta)
        return self

    def __post_init__(self):
        _check(self.theta > 0, "rope.theta", f"must be > 0, got {self.theta}")
        _check(self.type in ("default", "linear", "llama3", "yarn"), "rope.type",
               f"unsupported rope type {self.type!r}; supported: default, linear, llama3, yarn")
        _check(self.factor > 0, "rope.factor", f"must be > 0, got {self.factor}")
        _check(self.original_max_position_embeddings > 0, "rope.original_max_position_embeddings",
               f"must be > 0, got {self.original_max_position_embeddings}")
        if self.type == "llama3":
            _check(self.high_freq_factor > self.low_freq_factor, "rope.high_freq_factor",
                   f"must exceed low_freq_factor ({self.low_freq_factor}), got {self.high_freq_factor}")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3). `q_lora_rank=None` projects queries directly (V2-Lite)."""

    kv_lora_rank: int = 64
    q_lora_rank: int | None = 96
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    decode_impl: str = "absorb"  # 'absorb' | 'naive': how attention runs over the latent cache

    def __post_init__(self):
        _check(self.decode_impl in ("absorb", "naive"), "mla.decode_impl",
               f"must be 'absorb' or 'naive', got {self.decode_impl!r}")
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"mla.{name}", f"must be a positive int, got {v!r}")
        _check(self.qk_rope_head_dim % 2 == 0, "mla.qk_rope_head_dim", f"must be even, got {self.qk_rope_head_dim}")
        _check(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
               "mla.q_lora_rank", f"must be None or a positive int, got {self.q_lora_rank!r}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE: shared + fine-grained routed experts, group-limited top-k, aux-loss-free balancing.

    score_func: 'sigmoid' (V3) or 'softmax' (V2). The correction bias only affects which experts are selected;
    gate weights use the unbiased scores. `bias_update_rate` is γ of b_i += γ·sign(mean_load − load_i);
    `balance_loss_weight` is α of the sequence-wise balance loss.

    impl: how routed experts run (model/dispatch.py; all share `model.moe.route`):
      'dense'    every expert on every token, gated by zeros (the exact reference; cost grows with E);
      'capacity' tokens sorted by expert into a static [E, C, d] buffer, C = ceil(capacity_factor·n·k/E);
                 pairs past an expert's C are dropped (they add zero; the residual and shared experts still
                 carry the token). capacity_factor >= E/k can drop nothing and equals 'dense';
      'dropless' expert-sorted tokens in block-padded groups (MegaBlocks): exact for any routing, cost ~ n·k.
    With an `expert` mesh axis > 1 both sparse impls dispatch over all-to-all (model/expert_parallel.py).
    """

    n_routed_experts: int = 16
    n_shared_experts: int = 1
    experts_per_token: int = 4
    mlp_dim: int = 64
    first_k_dense: int = 1
    score_func: str = "sigmoid"
    n_groups: int = 1
    topk_groups: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 1e-3
    balance_loss_weight: float = 1e-4
    impl: str = "dropless"
    capacity_factor: float = 1.25

    def __post_init__(self):
        _check(self.impl in MOE_IMPLS, "moe.impl", f"must be one of {', '.join(MOE_IMPLS)}, got {self.impl!r}")
        _check(isinstance(self.capacity_factor, (int, float)) and not isinstance(self.capacity_factor, bool)
               and self.capacity_factor > 0, "moe.capacity_factor", f"must be > 0, got {self.capacity_factor!r}")
        for name in ("n_routed_experts", "experts_per_token", "mlp_dim", "n_groups", "topk_groups"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"moe.{name}", f"must be a positive int, got {v!r}")
        _check(self.n_shared_experts >= 0, "moe.n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        _check(self.first_k_dense >= 0, "moe.first_k_dense", f"must be >= 0, got {self.first_k_dense}")
        _check(self.score_func in ("sigmoid", "softmax"), "moe.score_func",
               f"must be 'sigmoid' or 'softmax', got {self.score_func!r}")
        _check(self.n_routed_experts % self.n_groups == 0, "moe.n_groups",
               f"n_routed_experts={self.n_routed_experts} is not divisible by n_groups={self.n_groups}")
        _check(self.topk_groups <= self.n_groups, "moe.topk_groups",
               f"topk_groups={self.topk_groups} exceeds n_groups={self.n_groups}")
        per_group = self.n_routed_experts // self.n_groups
        _check(self.experts_per_token <= self.topk_groups * per_group, "moe.experts_per_token",
               f"experts_per_token={self.experts_per_token} exceeds the {self.topk_groups * per_group} experts "
               f"in the top {self.topk_groups} groups")
        if self.n_groups > 1:
            _check(per_group >= 2, "moe.n_groups", "group scores sum the top-2 experts of a group; need >= 2 per group")
        _check(self.bias_update_rate >= 0, "moe.bias_update_rate", f"must be >= 0, got {self.bias_update_rate}")
        _check(self.balance_loss_weight >= 0, "moe.balance_loss_weight", f"must be >= 0, got {self.balance_loss_weight}")

    def capacity(self, tokens: int) -> int:
        """Slots per expert for `tokens` routed tokens: C = ceil(capacity_factor·tokens·k / E), at most `tokens`
        (an expert is chosen at most once per token, so `tokens` slots can never drop)."""
        c = min(tokens, math.ceil(self.capacity_factor * tokens * self.experts_per_token / self.n_routed_experts))
        _check(c > 0, "moe.capacity_factor",
               f"capacity_factor={self.capacity_factor} x {tokens} tokens x k={self.experts_per_token} / "
               f"E={self.n_routed_experts} rounds to {c} slots per expert; raise capacity_factor or the batch")
        return c

    def check_expert_axis(self, size: int) -> None:
        """The routed experts must split evenly over an `expert` mesh axis of `size` devices."""
        if self.n_routed_experts % size:
            raise ExpertAxisError(f"moe.n_routed_experts: n_routed_experts={self.n_routed_experts}: size "
                                  f"{self.n_routed_experts}, not divisible by mesh axes expert = {size} (each device "
                                  f"holds n_routed_experts / expert whole experts)")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer.

    Dense families (Llama, Qwen2, Qwen3) use `n_heads`, `n_kv_heads`, `head_dim`, `qkv_bias`, `qk_norm`.
    DeepSeek-V3 sets `mla` (then `n_kv_heads`/`head_dim` are unused) and `moe`, and `mtp_depth` > 0.
    """

    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 384
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    mla: MLAConfig | None = None
    moe: MoEConfig | None = None
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    max_seq_len: int = 4096
    # 'none' | 'block' (recompute each block) | 'dots' (save the projections' and experts' matmul outputs; attention
    # and the elementwise ops are recomputed: model.transformer._REMAT_POLICIES)
    remat: str = "none"
    attention_impl: str = "auto"  # training/prefill kernel, one of ATTENTION_IMPLS (model.attention.resolve_impl)
    # stack the dense prefix and the MoE body and run each as one lax.scan (model/transformer.py): the compiled
    # program stays one layer deep whatever n_layers is; off by default (README: measured on the CPU presets)
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "max_seq_len"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, f"must be a positive int, got {v!r}")
        if self.mla is None:
            _check(isinstance(self.n_kv_heads, int) and self.n_kv_heads > 0, "n_kv_heads",
                   f"must be a positive int, got {self.n_kv_heads!r}")
            _check(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
                   f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
            _check(isinstance(self.head_dim, int) and self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim",
                   f"must be a positive even int, got {self.head_dim!r}")
        _check(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        _check(isinstance(self.mtp_depth, int) and self.mtp_depth >= 0, "mtp_depth",
               f"must be an int >= 0, got {self.mtp_depth!r}")
        _check(self.mtp_loss_weight >= 0, "mtp_loss_weight", f"must be >= 0, got {self.mtp_loss_weight}")
        _check(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")
        _check(self.param_dtype in _DTYPES, "param_dtype", f"must be one of {_DTYPES}, got {self.param_dtype!r}")
        _check(self.remat in ("none", "block", "dots"), "remat",
               f"must be 'none', 'block' or 'dots', got {self.remat!r}")
        _check(isinstance(self.scan_layers, bool), "scan_layers", f"must be true or false, got {self.scan_layers!r}")
        _check(self.compute_dtype in _DTYPES, "compute_dtype", f"must be one of {_DTYPES}, got {self.compute_dtype!r}")
        _check(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
               f"must be one of {', '.join(ATTENTION_IMPLS)}, got {self.attention_impl!r}")
        _check(self.attention_impl != "cudnn" or self.compute_dtype != "float32", "attention_impl",
               "'cudnn' flash attention runs in bfloat16/float16 only, but compute_dtype is float32; "
               "use compute_dtype=bfloat16 or attention_impl='auto'/'xla'")
        if self.moe is not None:
            _check(self.moe.first_k_dense <= self.n_layers, "moe.first_k_dense",
                   f"first_k_dense={self.moe.first_k_dense} exceeds n_layers={self.n_layers}")
        if self.mla is not None and self.qk_norm:
            raise ConfigError("qk_norm: not supported together with mla (MLA normalises its latents instead)")

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def is_moe_layer(self) -> tuple[bool, ...]:
        first = self.moe.first_k_dense if self.moe else self.n_layers
        return tuple(i >= first for i in range(self.n_layers))

    @property
    def rope_dim(self) -> int:
        """Number of dimensions RoPE rotates per head."""
        return self.mla.qk_rope_head_dim if self.mla else self.head_dim

    @property
    def attn_scale(self) -> float:
        """Softmax scale: 1/sqrt(qk head dim), times DeepSeek's YaRN mscale² for MLA."""
        qk = self.mla.qk_head_dim if self.mla else self.head_dim
        scale = qk ** -0.5
        r = self.rope.active(self.max_seq_len)
        if self.mla is not None and r.type == "yarn" and r.mscale_all_dim:
            m = yarn_mscale(r.factor, r.mscale_all_dim)
            scale *= m * m
        return scale

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1·mscale·ln(scale) + 1 (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ---- presets ---------------------------------------------------------------------------------------------

# Presets meant for GPUs/TPUs: float32 master weights (AdamW's moments follow the parameter dtype, so they are
# float32 too), bf16 matmuls; norms, RoPE, router, softmax, the head's output (preferred_element_type) and the
# loss stay float32. CPU presets (tiny_deepseek, small_qwen2) compute in float32: bf16 is not faster there.
ACCELERATOR_PRECISION = {"param_dtype": "float32", "compute_dtype": "bfloat16"}

def tiny_deepseek(**overrides) -> ModelConfig:
    """The faithful tiny DeepSeek-V3 of algorithms.md §3: MLA + DeepSeekMoE + MTP, ~1.8M parameters."""
    base = ModelConfig(
        vocab_size=512, d_model=128, n_layers=4, n_heads=4, mlp_dim=384,
        mla=MLAConfig(kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
        moe=MoEConfig(n_routed_experts=16, n_shared_experts=1, experts_per_token=4, mlp_dim=64, first_k_dense=1,
                      n_groups=4, topk_groups=2, routed_scaling_factor=1.0),
        mtp_depth=1, mtp_loss_weight=0.3, max_seq_len=512,
    )
    return dataclasses.replace(base, **overrides)


def small_qwen2(**overrides) -> ModelConfig:
    """The 'small' benchmark config of cpu-performance.md: Qwen2-style, d 256, 6 layers, 4.79M parameters."""
    base = ModelConfig(vocab_size=512, d_model=256, n_layers=6, n_heads=8, n_kv_heads=2, head_dim=32, mlp_dim=768,
                       qkv_bias=True, tie_embeddings=False, norm_eps=1e-6, rope=RopeConfig(theta=1e6), max_seq_len=1024)
    return dataclasses.replace(base, **overrides)


def deepseek_v3_671b(**overrides) -> ModelConfig:
    """DeepSeek-V3 as published (config_671B / the Hub config.json), with accelerator precision.

    max_seq_len 163840 is the extended context, where YaRN (factor 40) is active; a pretraining run at 4K
    passes max_seq_len=4096, which turns YaRN off as in the reference (`RopeConfig.active`).
    Layers are scanned (`scan_layers`): the program's size stays flat in depth.
    Precision: float32 master parameters (and so float32 AdamW moments), bf16 compute, float32 logits and
    loss. With bf16 parameters an update below half a bf16 ulp (2^-9 to 2^-8 of the weight) rounds away: V3's
    final lr 2.2e-5 vanishes on every weight above 2^-7 = 0.0078 (half ulp 3.1e-5) and is rounded to a whole
    ulp (3.1e-5, +40 %) or to nothing between 0.0039 and 0.0078, where its init_std 0.006 puts many weights.
    """
    base = ModelConfig(
        vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, mlp_dim=18432,
        mla=MLAConfig(kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
        moe=MoEConfig(n_routed_experts=256, n_shared_experts=1, experts_per_token=8, mlp_dim=2048, first_k_dense=3,
                      n_groups=8, topk_groups=4, routed_scaling_factor=2.5),
        rope=RopeConfig(theta=10000.0, type="yarn", factor=40.0, original_max_position_embeddings=4096,
                        beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        mtp_depth=1, init_std=0.006, max_seq_len=163840, **ACCELERATOR_PRECISION,
        scan_layers=True,  # 61 layers: 15 s to compile scanned vs 74 s unrolled at a narrow width (docs/benchmarks.md)
    )
    return dataclasses.replace(base, **overrides)


def qwen2_5_0_5b(**overrides) -> ModelConfig:
    """Qwen2.5-0.5B as published, with accelerator precision (float32 masters, bf16 compute)."""
    base = ModelConfig(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64,
                       mlp_dim=4864, qkv_bias=True, tie_embeddings=True, rope=RopeConfig(theta=1e6), max_seq_len=32768,
                       **ACCELERATOR_PRECISION)
    return dataclasses.replace(base, **overrides)


def config_from_dict(d: dict) -> ModelConfig:
    """A ModelConfig from its `dataclasses.asdict` form (config.json, checkpoint metadata). Fields the dict lacks
    take their defaults (a config saved before a field existed); keys this version does not know are dropped."""
    def build(cls, x):
        if x is None:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in x.items() if k in names})
    d = dict(d)
    d["rope"] = build(RopeConfig, d.get("rope") or {})
    d["mla"] = build(MLAConfig, d.get("mla"))
    d["moe"] = build(MoEConfig, d.get("moe"))
    return build(ModelConfig, d)

