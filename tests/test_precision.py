"""Mixed precision for accelerators, and YaRN only beyond the original context.

Accelerator precision (model.config.ACCELERATOR_PRECISION): float32 master parameters and AdamW moments,
bf16 matmuls, float32 logits out of the head matmul and a float32 loss. These run on CPU at tiny sizes: the
dtypes and the rounding behaviour do not depend on the backend.
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from model import abstract_params, forward, init_params
from model.config import (ACCELERATOR_PRECISION, RopeConfig, deepseek_v3_671b, qwen2_5_0_5b, tiny_deepseek)
from model.rope import rope_tables
from sharding import MeshConfig, make_mesh
from train.config import LossConfig, OptimConfig
from train.step import Trainer, split_trainable

ACCEL = tiny_deepseek(vocab_size=64, d_model=32, n_layers=2, mtp_depth=1, **ACCELERATOR_PRECISION)
F32 = np.dtype("float32")


def _batch(n=8, t=16, seed=0):
    toks = np.random.RandomState(seed).randint(0, 64, (n, t + 1)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((n, t), np.float32)}


def _trainer(cfg, lr=1e-3):
    opt = OptimConfig(lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=0.0)
    return Trainer(cfg, opt, LossConfig(), make_mesh(MeshConfig(data=1), jax.devices()[:1]))


def _float_dtypes(tree):
    return {np.dtype(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


# ---- train state dtypes ----------------------------------------------------------------------------------

def test_accelerator_presets_keep_float32_masters():
    for cfg in (deepseek_v3_671b(), qwen2_5_0_5b()):
        assert (cfg.param_dtype, cfg.compute_dtype) == ("float32", "bfloat16")
        assert _float_dtypes(abstract_params(cfg)) == {F32}


def test_every_train_state_leaf_has_its_dtype():
    state = _trainer(ACCEL).init_state(0)
    params = jax.tree.leaves(state["params"])
    assert len(params) > 20 and all(np.dtype(p.dtype) == F32 for p in params)
    mu = jax.tree.leaves(optax.tree_utils.tree_get(state["opt_state"], "mu"))
    nu = jax.tree.leaves(optax.tree_utils.tree_get(state["opt_state"], "nu"))
    trainable, biases = split_trainable(state["params"])
    assert len(jax.tree.leaves(biases)) == 2  # MoE router correction biases (layer 1, MTP): moved by rule, no moments
    assert len(mu) == len(nu) == len(jax.tree.leaves(trainable)) == len(params) - 2
    assert all(np.dtype(m.dtype) == F32 for m in mu + nu)
    # the only non-float leaves: the train step and the counts of Adam and of the lr schedule
    others = [x for x in jax.tree.leaves(state) if not jnp.issubdtype(x.dtype, jnp.floating)]
    assert {np.dtype(x.dtype) for x in others} == {np.dtype("int32")} and len(others) == 3
    # the counterfactual the masters exist for: bf16 parameters bring bf16 moments (all but the two router
    # kernels, which model/moe.py keeps in float32 whatever param_dtype says)
    bf16_state = _trainer(ACCEL.replace(param_dtype="bfloat16")).init_state(0)
    bf16_mu = jax.tree.leaves(optax.tree_utils.tree_get(bf16_state["opt_state"], "mu"))
    assert sum(np.dtype(m.dtype) == np.dtype("bfloat16") for m in bf16_mu) == len(bf16_mu) - 2


# ---- float32 logits from a bf16 model ----------------------------------------------------------------------

def test_head_returns_float32_logits_from_bf16_compute():
    params = init_params(ACCEL, 0)
    tokens = jnp.asarray(_batch()["inputs"])
    logits, _, aux = jax.jit(lambda p, t: forward(ACCEL, p, t))(params, tokens)
    assert logits.dtype == jnp.float32 and aux["mtp_logits"].dtype == jnp.float32
    x = np.asarray(logits)
    # a bf16 matmul output would put every logit on the bf16 grid; float32 accumulation almost never does
    on_bf16_grid = np.mean(x.astype(ml_dtypes.bfloat16).astype(np.float32) == x)
    assert on_bf16_grid < 0.05, on_bf16_grid
    ref = np.asarray(jax.jit(lambda p, t: forward(ACCEL.replace(compute_dtype="float32"), p, t))(params, tokens)[0])
    rel = np.max(np.abs(x - ref)) / np.max(np.abs(ref))
    assert rel < 0.05, rel  # bf16 activations: a few bf16 ulps (2^-8) off the float32 model


# ---- small updates survive on float32 masters --------------------------------------------------------------

def _relative_update(param_dtype):
    """One Adam step with lr 1.35e-7 on a dense kernel -> (changed fraction, median |dp| / lr, lr / median |w|).

    Weights are normal(0, init_std 0.02), median |w| = 0.6745 x 0.02 = 0.0135: a relative step of 1e-5.
    One dense layer, no MTP: the rounding does not depend on the architecture, and it compiles in seconds.
    """
    cfg = ACCEL.replace(param_dtype=param_dtype, n_layers=1, mtp_depth=0)
    lr = 1e-5 * 0.6745 * cfg.init_std
    trainer = _trainer(cfg, lr=lr)
    state = trainer.init_state(0)
    def kernel(st):
        return np.asarray(st["params"]["layers"][0]["mlp"]["gate_proj"]["kernel"][...], np.float32)

    w0 = kernel(state)  # a copy: the step donates `state`
    state, metrics = trainer.step(state, _batch())
    assert float(metrics["skipped"]) == 0.0
    delta = np.abs(kernel(state) - w0)
    ratio = float(np.median(delta[delta > 0]) / lr) if np.any(delta > 0) else 0.0
    return float(np.mean(delta > 0)), ratio, lr / float(np.median(np.abs(w0)))


def test_relative_update_of_1e_5_changes_float32_masters():
    changed, ratio, relative = _relative_update("float32")
    assert relative == pytest.approx(1e-5, rel=0.1)
    # Adam's first step moves each weight by lr * g / (|g| + eps) = lr (to float32 rounding, 2^-24 relative)
    assert changed > 0.99 and ratio == pytest.approx(1.0, rel=0.02)
    # bf16 weights: half an ulp is 2^-9 relative (~2e-3), 200x the update: it rounds away
    changed_bf16, _, _ = _relative_update("bfloat16")
    assert changed_bf16 < 0.01, changed_bf16


# ---- YaRN only beyond the original context -----------------------------------------------------------------

def test_yarn_applies_only_beyond_the_original_context():
    v3_4k, v3_long = deepseek_v3_671b(max_seq_len=4096), deepseek_v3_671b()
    assert v3_4k.rope.active(v3_4k.max_seq_len) == RopeConfig(theta=10000.0)
    assert v3_long.rope.active(v3_long.max_seq_len) is v3_long.rope
    # softmax scale: plain 1/sqrt(192) at 4K; with YaRN's mscale^2 = (0.1 ln 40 + 1)^2 = 1.874 beyond it
    assert v3_4k.attn_scale == pytest.approx(192 ** -0.5, rel=1e-12)
    assert v3_long.attn_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    pos = jnp.arange(4096, dtype=jnp.int32)[None]
    plain = rope_tables(RopeConfig(theta=10000.0), 64, 4096, pos)
    at_4k = rope_tables(v3_4k.rope, 64, 4096, pos)
    beyond = rope_tables(v3_long.rope, 64, 4097, pos)
    assert all(np.array_equal(a, b) for a, b in zip(plain, at_4k))
    assert np.max(np.abs(np.asarray(beyond[0]) - np.asarray(plain[0]))) > 0.5


def test_yarn_gate_reaches_the_model_output():
    yarn = RopeConfig(theta=10000.0, type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.0,
                      mscale_all_dim=1.0)
    base = tiny_deepseek(vocab_size=64, d_model=32, n_layers=2, mtp_depth=0, rope=yarn, max_seq_len=16)
    params = init_params(base, 0)
    tokens = jnp.asarray(_batch(n=2, t=16)["inputs"])

    def logits(cfg):
        return np.asarray(jax.jit(lambda p, t: forward(cfg, p, t)[0])(params, tokens))

    at_original = logits(base)
    assert np.array_equal(at_original, logits(base.replace(rope=RopeConfig(theta=10000.0))))
    assert np.max(np.abs(logits(base.replace(max_seq_len=64)) - at_original)) > 1e-3
