"""Sharded training: equality across meshes, accumulation and remat; the loss parts; bad input."""

import jax
import numpy as np
import pytest
from flax import nnx

from model.config import small_qwen2, tiny_deepseek
from model.moe import RouterBias
from sharding import MeshConfig, ShardingError, make_mesh
from train.config import LossConfig, OptimConfig
from train.losses import lm_loss
from train.optim import decay_mask
from train.step import Trainer, split_trainable

CFG = tiny_deepseek(vocab_size=64, d_model=32, n_layers=2, mtp_depth=1)
# lr 5e-4: Adam turns float reassociation noise in near-zero gradients into updates of size ~lr
OPT = OptimConfig(lr=5e-4, warmup_steps=0, schedule="constant")


def _batch(n=16, t=16, seed=0):
    toks = np.random.RandomState(seed).randint(0, 64, (n, t + 1)).astype(np.int32)
    mask = np.ones((n, t), np.float32)
    mask[:, :3] = 0.0  # a "prompt" excluded from the loss
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": mask}


def _run(cfg, mesh_cfg, lcfg=LossConfig(), steps=3, devices=None):
    trainer = Trainer(cfg, OPT, lcfg, make_mesh(mesh_cfg, devices))
    state = trainer.init_state(0)
    losses = []
    for _ in range(steps):
        state, m = trainer.step(state, _batch())
        losses.append(float(m["loss"]))
    return losses, state, m


@pytest.fixture(scope="module")
def single():
    return _run(CFG, MeshConfig(data=1), devices=jax.devices()[:1])


def _max_param_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("mesh_cfg, sharded", [
    (MeshConfig(data=8), {}),
    (MeshConfig(data=2, fsdp=2, tensor=2), {("layers", 1, "mlp", "experts", "gate_proj"): (16, 16, 32),
                                            ("layers", 0, "self_attn", "kv_b_proj"): (64, 2, 64),
                                            ("embed_tokens", "embedding"): (32, 16)}),
    (MeshConfig(data=1, fsdp=2, expert=4), {("layers", 1, "mlp", "experts", "gate_proj"): (4, 16, 64),
                                            ("layers", 1, "mlp", "gate", "bias"): (4,)}),
])
def test_mesh_matches_single_device(single, mesh_cfg, sharded):
    ref_losses, ref_state, _ = single
    losses, state, _ = _run(CFG, mesh_cfg)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    assert _max_param_diff(state["params"], ref_state["params"]) <= 1e-5
    flat = dict(nnx.to_flat_state(state["params"]))
    for path, shard_shape in sharded.items():
        arr = flat[path].get_value()
        assert arr.sharding.shard_shape(arr.shape) == shard_shape, path


def test_gradient_accumulation_equals_big_batch(single):
    ref_losses, ref_state, _ = single
    losses, state, _ = _run(CFG, MeshConfig(data=1), LossConfig(micro_batches=4), devices=jax.devices()[:1])
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    assert _max_param_diff(state["params"], ref_state["params"]) <= 1e-5


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_changes_no_number(single, remat):
    ref_losses, ref_state, _ = single
    losses, state, _ = _run(CFG.replace(remat=remat), MeshConfig(data=1), devices=jax.devices()[:1])
    # recomputation compiles to different fusions, so equality is to float rounding (amplified by Adam in the
    # parameters), the same bound as the mesh-equality tests
    np.testing.assert_allclose(losses, ref_losses, atol=1e-6, rtol=0)
    assert _max_param_diff(state["params"], ref_state["params"]) <= 1e-5


def test_step_reports_parts_and_moves_bias_by_rule(single):
    losses, state, m = single
    for key in ("loss", "ce", "mtp", "balance", "grad_norm", "tokens", "expert_load"):
        assert key in m, key
    assert float(m["tokens"]) == 16 * 13
    assert np.isclose(float(m["loss"]), float(m["ce"] + m["mtp"] + m["balance"]), atol=1e-6)
    assert m["expert_load"].shape == (2, 16)  # one MoE layer + the MTP block
    # three updates of ±γ each: every bias entry is a multiple of γ with |b| <= 3γ
    gamma = CFG.moe.bias_update_rate
    for v in [v for _, v in nnx.to_flat_state(state["params"]) if isinstance(v, RouterBias)]:
        b = np.asarray(v.get_value()) / gamma
        assert np.allclose(b, np.round(b), atol=1e-3) and np.abs(b).max() <= 3 + 1e-3 and np.abs(b).max() >= 1
    trainable, _ = split_trainable(state["params"])
    assert not any(isinstance(v, RouterBias) for _, v in nnx.to_flat_state(trainable))


def test_loss_mask_excludes_prompt_tokens():
    from model import forward, init_params
    cfg = CFG.replace(mtp_depth=0)
    params = init_params(cfg, 0)
    batch = _batch(4, 16)
    total, parts, _ = lm_loss(cfg, LossConfig(z_loss=1e-3), params, batch, float(batch["loss_mask"].sum()))
    logits = np.asarray(forward(cfg, params, batch["inputs"])[0], np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    m = batch["loss_mask"]
    np.testing.assert_allclose(float(parts["ce"]), (nll * m).sum() / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(parts["z_loss"]), 1e-3 * (lse ** 2 * m).sum() / m.sum(), rtol=1e-5)


def test_weight_decay_spares_norms_biases_embeddings():
    from model import abstract_params
    cfg = small_qwen2(n_layers=1)
    mask = dict(nnx.to_flat_state(decay_mask(OPT, split_trainable(abstract_params(cfg))[0])))
    assert mask[("layers", 0, "self_attn", "q_proj")].get_value() is True
    assert mask[("layers", 0, "self_attn", "q_bias")].get_value() is False
    assert mask[("layers", 0, "input_layernorm", "scale")].get_value() is False
    assert mask[("embed_tokens", "embedding")].get_value() is False
    assert mask[("lm_head", "kernel")].get_value() is True


def test_bad_mesh_and_batch_are_named_before_compiling():
    with pytest.raises(ShardingError, match=r"2\*2\*2\*2 = 16, but there are 8 devices"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, expert=2))
    with pytest.raises(ShardingError, match="not divisible by the fixed axes"):
        make_mesh(MeshConfig(data=-1, tensor=3))
    # 2 KV heads cannot be split over 4 tensor shards
    with pytest.raises(ShardingError, match=r"k_(proj|bias).*size 2, not divisible by mesh axes tensor = 4"):
        Trainer(small_qwen2(n_layers=1), OPT, LossConfig(), make_mesh(MeshConfig(data=2, tensor=4)))
    # 12 experts cannot be split over 8 expert shards
    import dataclasses
    cfg12 = CFG.replace(moe=dataclasses.replace(CFG.moe, n_routed_experts=12))
    with pytest.raises(ShardingError, match=r"size 12, not divisible by mesh axes expert = 8"):
        Trainer(cfg12, OPT, LossConfig(), make_mesh(MeshConfig(data=1, expert=8)))
    trainer = Trainer(CFG, OPT, LossConfig(), make_mesh(MeshConfig(data=8)))
    state = trainer.init_state(0)
    with pytest.raises(ShardingError, match=r"batch size 12 is not divisible by the data-parallel size data = 8"):
        trainer.step(state, _batch(12))
