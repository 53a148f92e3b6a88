"""ModelConfig.attention_impl: every kernel that runs on CPU gives the same logits and gradients; a kernel the
backend cannot run is a ConfigError naming the field, raised while tracing (before anything compiles).

'cudnn' needs a GPU; its numbers are checked only where one is present (test_cudnn_matches_xla_on_gpu).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ConfigError, forward, init_params
from model.attention import resolve_impl
from model.config import MLAConfig, ModelConfig, small_qwen2, tiny_deepseek

CFGS = {
    # MLA: qk head dim 24 beside v head dim 16 (the 192/128 shape of V3, scaled down)
    "mla": tiny_deepseek(vocab_size=64, d_model=32, n_layers=2, mtp_depth=0, max_seq_len=64,
                         mla=MLAConfig(kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                       v_head_dim=16)),
    # grouped-query attention, 4 query heads per KV head, qkv bias
    "gqa": small_qwen2(vocab_size=64, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8, mlp_dim=96,
                       max_seq_len=64),
}
B, T = 2, 24


def _inputs(seed=0):
    tokens = jnp.asarray(np.random.RandomState(seed).randint(0, 64, (B, T)), jnp.int32)
    # row 0 packs two documents (9 + 15 tokens), row 1 is one document
    seg = jnp.asarray([[1] * 9 + [2] * 15, [1] * T], jnp.int32)
    pos = jnp.asarray([list(range(9)) + list(range(15)), list(range(T))], jnp.int32)
    return tokens, pos, seg


def _logits_and_grads(cfg, params, packed):
    tokens, pos, seg = _inputs()
    kw = {"segment_ids": seg} if packed else {}
    p_ = pos if packed else None

    def loss(p):
        logits = forward(cfg, p, tokens, p_, **kw)[0]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), [np.asarray(g) for g in jax.tree.leaves(grads)]


@pytest.mark.parametrize("name", sorted(CFGS))
@pytest.mark.parametrize("packed", [False, True])
def test_cpu_kernels_agree_on_logits_and_gradients(name, packed):
    cfg = CFGS[name]
    params = init_params(cfg, 0)
    assert resolve_impl(cfg) == "cpu_blocked"  # 'auto' on CPU
    ref_logits, ref_grads = _logits_and_grads(cfg.replace(attention_impl="cpu_blocked"), params, packed)
    logits, grads = _logits_and_grads(cfg.replace(attention_impl="xla"), params, packed)
    # measured: logits within 3e-7 relative, gradients within 7e-7 of each leaf's largest entry (float32)
    assert np.max(np.abs(logits - ref_logits)) < 2e-5 * np.max(np.abs(ref_logits))
    for g, r in zip(grads, ref_grads):
        assert np.max(np.abs(g - r)) <= 1e-4 * max(np.max(np.abs(r)), 1e-6)
    assert np.max(np.abs(ref_logits)) > 0.1 and max(np.max(np.abs(g)) for g in ref_grads) > 1e-3


def test_packing_changes_what_both_kernels_see():
    cfg = CFGS["gqa"]
    params = init_params(cfg, 0)
    for impl in ("xla", "cpu_blocked"):
        c = cfg.replace(attention_impl=impl)
        packed, unpacked = _logits_and_grads(c, params, True)[0], _logits_and_grads(c, params, False)[0]
        assert np.max(np.abs(packed[1] - unpacked[1])) < 1e-5  # the one-document row is unchanged
        assert np.max(np.abs(packed[0, 9:] - unpacked[0, 9:])) > 1e-3  # document 2 no longer sees document 1


def test_unrunnable_kernel_is_named_before_compiling():
    with pytest.raises(ConfigError, match="attention_impl: must be one of auto, cudnn, xla, cpu_blocked"):
        ModelConfig(attention_impl="flash")
    with pytest.raises(ConfigError, match="attention_impl: 'cudnn' flash attention runs in bfloat16/float16 only"):
        ModelConfig(attention_impl="cudnn")
    if jax.default_backend() == "gpu":
        pytest.skip("cuDNN can run here")
    cfg = CFGS["gqa"].replace(attention_impl="cudnn", compute_dtype="bfloat16")
    params = init_params(cfg, 0)
    tokens = _inputs()[0]
    with pytest.raises(ConfigError) as err:
        jax.jit(lambda p, t: forward(cfg, p, t)[0]).trace(params, tokens)  # tracing only: nothing compiles
    msg = str(err.value)
    assert msg.startswith("attention_impl: 'cudnn' cannot run here (backend cpu") and "\n" not in msg


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("name", sorted(CFGS))
def test_cudnn_matches_xla_on_gpu(name):
    cfg = CFGS[name].replace(compute_dtype="bfloat16")
    params = init_params(cfg, 0)
    ref_logits, ref_grads = _logits_and_grads(cfg.replace(attention_impl="xla"), params, True)
    logits, grads = _logits_and_grads(cfg.replace(attention_impl="cudnn"), params, True)
    assert np.max(np.abs(logits - ref_logits)) < 0.05 * np.max(np.abs(ref_logits))  # bf16 kernels
    for g, r in zip(grads, ref_grads):
        assert np.max(np.abs(g - r)) <= 0.05 * max(np.max(np.abs(r)), 1e-6)
