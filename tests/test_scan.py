"""ModelConfig.scan_layers: the scanned model equals the unrolled one (logits, aux, gradients, KV-cache decoding,
routing replay, router-bias update, sharded and expert-parallel training), its lowered program is flat in depth,
and a checkpoint of one layout is refused by a run of the other."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import forward, init_cache, init_params, update_router_bias
from model.config import ConfigError, ModelConfig, tiny_deepseek

# MoE with a dense prefix of 1, two MoE layers and MTP; a dense GQA model with qkv bias
MOE = tiny_deepseek(vocab_size=64, d_model=32, n_layers=3, n_heads=2, mlp_dim=64, mtp_depth=1)
DENSE = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
                    qkv_bias=True)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)), jnp.int32)


def _stack_of(cfg, flat_unrolled, path):
    """The unrolled params' layers stacked in the scanned layout, for the scanned path `path`."""
    n_dense = cfg.n_layers - sum(cfg.is_moe_layer)
    layers = range(n_dense) if path[0] == "dense_layers" else range(n_dense, cfg.n_layers)
    return np.stack([np.asarray(flat_unrolled[("layers", i) + path[1:]]) for i in layers])


@pytest.mark.parametrize("cfg", [MOE, DENSE, MOE.replace(remat="block")], ids=["moe", "dense", "moe_remat"])
def test_scanned_equals_unrolled(cfg):
    scfg = cfg.replace(scan_layers=True)
    p, sp = init_params(cfg, 0), init_params(scfg, 0)

    def loss(cfg, params):
        logits, _, aux = forward(cfg, params, TOKENS)
        extra = aux["balance_loss"] + aux["mtp_logits"].std() if "mtp_logits" in aux else 0.0
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3]) + extra, (logits, aux)

    (l0, (lg0, aux0)), g0 = jax.jit(jax.value_and_grad(lambda q: loss(cfg, q), has_aux=True))(p)
    (l1, (lg1, aux1)), g1 = jax.jit(jax.value_and_grad(lambda q: loss(scfg, q), has_aux=True))(sp)
    np.testing.assert_allclose(lg1, lg0, atol=1e-6, rtol=0)
    assert sorted(aux1) == sorted(aux0)
    for k in aux0:
        np.testing.assert_allclose(aux1[k], aux0[k], atol=1e-6, rtol=0, err_msg=k)
    if cfg.moe is not None:
        assert aux1["routing"].shape == (2, 12, 2, cfg.moe.experts_per_token)  # [batch, seq, n_moe_layers, k]
        assert aux1["expert_load"].shape == (3, cfg.moe.n_routed_experts)  # 2 MoE layers + the MTP block
    # gradients: every stacked leaf equals the unrolled layers' gradients stacked
    flat0 = {k: v.get_value() for k, v in nnx.to_flat_state(g0)}
    flat1 = {k: v.get_value() for k, v in nnx.to_flat_state(g1)}
    assert len(flat1) < len(flat0)
    for path, g in flat1.items():
        want = _stack_of(cfg, flat0, path) if path[0] in ("dense_layers", "moe_layers") else flat0[path]
        np.testing.assert_allclose(g, want, atol=1e-6, rtol=1e-5, err_msg=str(path))
    assert max(float(np.abs(g).max()) for g in flat1.values()) > 1e-3  # the gradients are not all zero


def test_stacked_params_carry_a_layers_axis():
    sp = dict(nnx.to_flat_state(init_params(MOE.replace(scan_layers=True), 0)))
    v = sp[("moe_layers", "mlp", "experts", "gate_proj")]
    assert v.get_value().shape == (2, 16, 32, 64) and v.get_metadata()["axes"] == ("layers", "expert", "embed", "mlp")
    assert sp[("dense_layers", "input_layernorm", "scale")].get_value().shape == (1, 32)
    assert not any(p[0] == "layers" for p in sp) and ("mtp", 0, "block", "mlp", "gate", "bias") in sp  # MTP unstacked
    with pytest.raises(ConfigError, match="scan_layers"):
        MOE.replace(scan_layers="yes")


@pytest.mark.parametrize("cfg", [MOE, DENSE], ids=["mla_moe", "gqa"])
def test_scanned_cache_decoding_matches(cfg):
    """Prefill then two single-token steps: the stacked cache gives the unrolled per-layer cache's logits."""
    scfg = cfg.replace(scan_layers=True)
    p, sp = init_params(cfg, 1), init_params(scfg, 1)
    c0, c1 = init_cache(cfg, 2, 16), init_cache(scfg, 2, 16)
    assert isinstance(c0["layers"], list) and sorted(c1["layers"]) == sorted(
        ["dense_layers", "moe_layers"] if cfg.moe else ["dense_layers"])
    step0 = jax.jit(lambda p, t, c: forward(cfg, p, t, None, c, with_mtp=False)[:2])
    step1 = jax.jit(lambda p, t, c: forward(scfg, p, t, None, c, with_mtp=False)[:2])
    for toks in (TOKENS[:, :8], TOKENS[:, 8:9], TOKENS[:, 9:10]):
        l0, c0 = step0(p, toks, c0)
        l1, c1 = step1(sp, toks, c1)
        np.testing.assert_allclose(l1, l0, atol=1e-5, rtol=0)
    full = forward(cfg, p, TOKENS[:, :10], with_mtp=False)[0]
    np.testing.assert_allclose(l1[:, -1], full[:, -1], atol=1e-4, rtol=0)  # the cache is the model


def test_routing_replay_and_bias_update_scanned():
    scfg = MOE.replace(scan_layers=True)
    p, sp = init_params(MOE, 2), init_params(scfg, 2)
    _, _, aux = forward(scfg, sp, TOKENS, with_mtp=False)
    other = jnp.flip(aux["routing"], axis=2)  # replay layer 2's choice in layer 1 and vice versa
    want = forward(MOE, p, TOKENS, with_mtp=False, routing=other)[0]
    got, _, aux2 = forward(scfg, sp, TOKENS, with_mtp=False, routing=other)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    # the router's own choice is still reported (the first MoE layer sees the same input; the second does not)
    np.testing.assert_array_equal(aux2["routing"][:, :, 0], aux["routing"][:, :, 0])
    load = jnp.arange(3 * 16, dtype=jnp.float32).reshape(3, 16) % 5  # 2 MoE layers + MTP
    u0, u1 = update_router_bias(MOE, p, load), update_router_bias(scfg, sp, load)
    b1 = np.asarray(u1["moe_layers"]["mlp"]["gate"]["bias"][...])
    for row, i in enumerate((1, 2)):
        np.testing.assert_array_equal(b1[row], np.asarray(u0["layers"][i]["mlp"]["gate"]["bias"][...]))
    np.testing.assert_array_equal(u1["mtp"][0]["block"]["mlp"]["gate"]["bias"][...],
                                  u0["mtp"][0]["block"]["mlp"]["gate"]["bias"][...])
    assert float(np.abs(b1[0] - b1[1]).max()) > 0  # per-layer rows, not one broadcast update
    u2 = update_router_bias(scfg, sp, load[:2])  # without MTP: only the main stack moves
    np.testing.assert_array_equal(u2["moe_layers"]["mlp"]["gate"]["bias"][...], b1)


def _hlo_chars(cfg, n_layers):
    c = cfg.replace(n_layers=n_layers)
    from model import abstract_params
    return len(jax.jit(lambda p, t: forward(c, p, t)[0]).lower(abstract_params(c), TOKENS).as_text())


def test_lowered_program_is_flat_in_depth():
    cfg = MOE.replace(remat="block", scan_layers=True)
    s4, s24 = _hlo_chars(cfg, 4), _hlo_chars(cfg, 24)
    assert s24 <= 1.5 * s4, (s4, s24)
    u4, u24 = _hlo_chars(cfg.replace(scan_layers=False), 4), _hlo_chars(cfg.replace(scan_layers=False), 24)
    assert u24 >= 3 * u4, (u4, u24)  # what the scan removes: unrolled text grows with depth


def test_sharded_expert_parallel_training_scanned():
    """fsdp 2 x expert 4 (all-to-all dispatch inside the scanned body): scanned training equals unrolled, and the
    stacked leaves' 'layers' axis maps to no mesh axis."""
    from sharding import MeshConfig, make_mesh
    from train.config import LossConfig, OptimConfig
    from train.step import Trainer

    cfg = tiny_deepseek(vocab_size=64, d_model=32, n_layers=2, mtp_depth=1)
    toks = np.random.RandomState(0).randint(0, 64, (16, 17)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((16, 16), np.float32)}
    out = {}
    for scan in (False, True):
        trainer = Trainer(cfg.replace(scan_layers=scan), OptimConfig(lr=5e-4, warmup_steps=0, schedule="constant"),
                          LossConfig(), make_mesh(MeshConfig(data=1, fsdp=2, expert=4)))
        state = trainer.init_state(0)
        losses = []
        for _ in range(2):
            state, m = trainer.step(state, batch)
            losses.append(float(m["loss"]))
        out[scan] = losses, dict(nnx.to_flat_state(state["params"]))
    np.testing.assert_allclose(out[True][0], out[False][0], atol=1e-5, rtol=0)
    experts = out[True][1][("moe_layers", "mlp", "experts", "gate_proj")].get_value()
    assert experts.sharding.spec[0] is None and experts.sharding.spec[1] == "expert"
    assert experts.addressable_shards[0].data.shape == (1, 4, 16, 64)  # [layers, E/4, d/fsdp, f]
    np.testing.assert_allclose(experts[0], out[False][1][("layers", 1, "mlp", "experts", "gate_proj")].get_value(),
                               atol=1e-5, rtol=0)


def test_checkpoint_of_the_other_layout_is_refused(tmp_path):
    """A run directory written unscanned, resumed scanned: one line naming model.scan_layers, before compiling."""
    from experiments.run import load_experiment
    from train.checkpoint import Checkpointer
    from train.loop import pretrain
    from train.run import RunError, first_difference

    exp = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "tiny_pretrain.py")
    small = ["model.d_model=32", "model.n_layers=2", "model.vocab_size=320", "data.seq_len=16", "batch_size=8",
             "progress=false", f"run_dir={tmp_path}"]
    # the checkpoint an unscanned run writes, as far as the check reads it: its meta's config (no training: the
    # refusal comes before anything compiles, and a step would cost ~20 s of compiling)
    unscanned = load_experiment(exp, small + ["steps=1"])[1]
    ckpt = Checkpointer(os.path.join(unscanned.directory, "checkpoints"))
    ckpt.save(1, {"step": jnp.ones((), jnp.int32)}, {"config": unscanned.to_dict()})
    ckpt.close()
    with pytest.raises(RunError, match=r"model\.scan_layers: checkpoint has False, this run has True") as e:
        pretrain(load_experiment(exp, small + ["steps=2", "model.scan_layers=true"])[1])
    assert "\n" not in str(e.value)
    # the reverse direction goes through the same comparison
    a, b = dataclasses.asdict(MOE.replace(scan_layers=True)), dataclasses.asdict(MOE)
    assert first_difference(a, b) == "model.scan_layers: checkpoint has True, this run has False"
