"""MoE implementations: dense == capacity(E/k) == dropless, exact drops, expert parallelism over all-to-all, FLOPs."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from residuals import kept_for_backward

from model import ConfigError, forward, init_params
from model.config import MoEConfig, tiny_deepseek
from model.dispatch import block_layout, capacity_layout
from model.moe import MoE, RouterBias
from model.layers import KeyGen
from sharding import MeshConfig, make_mesh, use_rules
from sharding.rules import batch_sharding, param_shardings
from train.config import LossConfig, OptimConfig
from train.step import Trainer

# many experts and group-limited routing: 32 experts in 4 groups, top-4 within the best 2 groups
MOE = MoEConfig(n_routed_experts=32, n_shared_experts=1, experts_per_token=4, mlp_dim=16, first_k_dense=0,
                n_groups=4, topk_groups=2, impl="dense")
CFG = tiny_deepseek(vocab_size=64, d_model=32, n_layers=2, n_heads=2, mlp_dim=64, mtp_depth=1, moe=MOE)


def _impl(cfg, impl, cf=1.25):
    return cfg.replace(moe=dataclasses.replace(cfg.moe, impl=impl, capacity_factor=cf))


def _skewed_params(cfg, seed=0):
    """Random init plus random router biases (std 0.3): uneven expert loads, so padding and sorting matter."""
    flat = dict(nnx.to_flat_state(init_params(cfg, seed)))
    rng = np.random.RandomState(seed)
    for path, v in flat.items():
        if isinstance(v, RouterBias):
            flat[path] = v.replace(jnp.asarray(rng.normal(0, 0.3, v.get_value().shape), jnp.float32))
    return nnx.from_flat_state(flat)


def _tokens(b=4, t=16, seed=1):
    return jnp.asarray(np.random.RandomState(seed).randint(0, 64, (b, t)), jnp.int32)


def _fwd_and_grad(cfg, params, tokens):
    def loss(p):
        logits, _, aux = forward(cfg, p, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux["balance_loss"], aux

    trainable, rest = nnx.split_state(params, nnx.Param, ...)
    f = jax.jit(jax.value_and_grad(lambda tr: loss(nnx.merge_state(tr, rest)), has_aux=True))
    (val, aux), grads = f(trainable)
    logits = jax.jit(lambda p: forward(cfg, p, tokens)[0])(params)
    return val, aux, grads, logits


def test_dense_capacity_dropless_agree_float32():
    params, tokens = _skewed_params(CFG), _tokens()
    e_over_k = MOE.n_routed_experts / MOE.experts_per_token
    ref = _fwd_and_grad(_impl(CFG, "dense"), params, tokens)
    load = np.asarray(ref[1]["expert_load"])
    assert load.max() >= 3 * load.mean()  # the biases do skew the routing
    for cfg in (_impl(CFG, "capacity", e_over_k), _impl(CFG, "dropless")):
        val, aux, grads, logits = _fwd_and_grad(cfg, params, tokens)
        np.testing.assert_allclose(logits, ref[3], atol=2e-5, rtol=0)
        np.testing.assert_allclose(val, ref[0], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(aux["expert_load"], ref[1]["expert_load"])
        np.testing.assert_allclose(aux["balance_loss"], ref[1]["balance_loss"], rtol=1e-6)
        assert float(aux["moe_dropped"].sum()) == 0.0
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref[2])):
            np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-4)


def test_capacity_layout_drops_the_later_tokens():
    idx = jnp.asarray([[0, 1], [0, 2], [0, 1], [3, 0]])  # expert 0 is chosen 4 times, capacity 2
    slot_token, pair_slot, dropped = capacity_layout(idx, 4, 2)
    assert int(dropped) == 2
    dropped_pairs = {(t, j) for t in range(4) for j in range(2) if int(pair_slot[t, j]) == 4 * 2}
    assert dropped_pairs == {(2, 0), (3, 1)}  # the 3rd and 4th tokens' expert-0 pairs, in token order
    np.testing.assert_array_equal(slot_token, [[0, 1], [0, 2], [1, 4], [3, 4]])  # 4 = empty slot
    row_token, pair_row, block_expert = block_layout(idx, 4, 2)  # dropless: every pair has a row
    assert sorted(np.asarray(pair_row).ravel().tolist()) == [0, 1, 2, 3, 4, 5, 6, 8]
    np.testing.assert_array_equal(np.asarray(row_token)[np.asarray(pair_row)], [[0, 0], [1, 1], [2, 2], [3, 3]])
    np.testing.assert_array_equal(block_expert[:6], [0, 0, 1, 2, 3, 3])


def test_capacity_factor_one_with_forced_routing():
    """All 8 tokens pick experts 0-3; C = ceil(1·8·4/16) = 2: tokens 0-1 keep their 4 experts, tokens 2-7 lose
    all 4 (24 pairs) and keep only the shared expert's output."""
    moe = MoEConfig(n_routed_experts=16, experts_per_token=4, mlp_dim=16, n_groups=1, topk_groups=1,
                    impl="capacity", capacity_factor=1.0)
    cfg = tiny_deepseek(d_model=32, moe=moe)
    layer = MoE(cfg, KeyGen(jax.random.key(0)))
    layer.gate.kernel.set_value(jnp.zeros_like(layer.gate.kernel.get_value()))
    layer.gate.bias.set_value(jnp.where(jnp.arange(16) < 4, 1.0, 0.0))
    x = jax.random.normal(jax.random.key(1), (1, 8, 32))
    y, stats = layer(x)
    assert float(stats["dropped"]) == 24.0
    np.testing.assert_array_equal(stats["load"], [8.0] * 4 + [0.0] * 12)  # loads count routed pairs, kept or not
    shared = layer.shared_experts(x)
    np.testing.assert_allclose(y[0, 2:], shared[0, 2:], atol=1e-6)
    layer.cfg = cfg.replace(moe=dataclasses.replace(moe, impl="dense"))
    y_dense, _ = layer(x)
    np.testing.assert_allclose(y[0, :2], y_dense[0, :2], atol=1e-6)
    assert float(jnp.abs(y_dense[0, 2:] - shared[0, 2:]).max()) > 1e-3


def _batch(n=8, t=16, seed=0):
    toks = np.random.RandomState(seed).randint(0, 64, (n, t + 1)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((n, t), np.float32)}


def _train(cfg, mesh_cfg, devices=None, steps=2):
    opt = OptimConfig(lr=5e-4, warmup_steps=0, schedule="constant")
    trainer = Trainer(cfg, opt, LossConfig(), make_mesh(mesh_cfg, devices))
    state = trainer.init_state(0)
    out = []
    for s in range(steps):
        state, m = trainer.step(state, _batch(seed=s))
        out.append(jax.tree.map(np.asarray, m))
    return out, state


def test_expert_parallel_trainer_step_equals_one_device_dense():
    ref, ref_state = _train(_impl(CFG, "dense"), MeshConfig(data=1), jax.devices()[:1])
    ep, ep_state = _train(_impl(CFG, "capacity", 8.0), MeshConfig(data=2, expert=4))
    for r, m in zip(ref, ep):
        np.testing.assert_allclose(m["loss"], r["loss"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(m["balance"], r["balance"], rtol=1e-5)
        np.testing.assert_array_equal(m["expert_load"], r["expert_load"])
        np.testing.assert_array_equal(m["moe_dropped"], np.zeros(3))  # 2 layers + the MTP block
    for a, b in zip(jax.tree.leaves(ep_state["params"]), jax.tree.leaves(ref_state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def _collectives(hlo: str, op: str) -> list[int]:
    """Element counts of the outputs of every `op` in compiled HLO text."""
    sizes = []
    for line in hlo.splitlines():
        m = re.search(rf"= \(?([^=]*?)\)? {op}(-start)?\(", line)
        if m:
            sizes += [int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
                      for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))]
    return sizes


def test_expert_parallel_hlo_is_all_to_all_not_all_gather():
    cfg = _impl(CFG, "capacity")
    b, t = 8, 16
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    params, tokens = init_params(cfg, 0), _tokens(b, t)
    with use_rules(mesh):
        params = jax.device_put(params, param_shardings(params, mesh))
        tokens = jax.device_put(tokens, batch_sharding(mesh))
        hlo = jax.jit(lambda p, x: forward(cfg, p, x)[0]).lower(params, tokens).compile().as_text()
    global_tokens = b * t * cfg.d_model
    assert len(_collectives(hlo, "all-to-all")) >= 2 * 3  # dispatch + combine per MoE layer
    gathers = _collectives(hlo, "all-gather")
    assert max(gathers) <= cfg.d_model * MOE.n_routed_experts < global_tokens  # only router kernels / biases
    assert max(_collectives(hlo, "all-reduce") or [0]) < global_tokens  # loads and losses, never the output


def _moe_flops(n_experts, impl, k=6, tokens=(4, 128)):
    moe = MoEConfig(n_routed_experts=n_experts, n_shared_experts=0, experts_per_token=k, mlp_dim=32,
                    first_k_dense=0, impl=impl, capacity_factor=1.25)
    cfg = tiny_deepseek(vocab_size=64, d_model=64, n_layers=1, n_heads=1, mtp_depth=0, moe=moe)
    params = jax.eval_shape(lambda: init_params(cfg, 0))
    x = jax.ShapeDtypeStruct(tokens, jnp.int32)
    return jax.jit(lambda p, t: forward(cfg, p, t)[0]).lower(params, x).cost_analysis()["flops"]


def test_sparse_flops_follow_k_not_e():
    ratios = {}
    for e in (64, 256):
        dense = _moe_flops(e, "dense")
        ratios[e] = {impl: _moe_flops(e, impl) / dense for impl in ("capacity", "dropless")}
    assert ratios[64]["capacity"] <= 0.5 and ratios[64]["dropless"] <= 0.5
    for impl in ("capacity", "dropless"):
        assert ratios[256][impl] < ratios[64][impl] / 2


def test_bad_moe_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"moe.impl: .*'sparse'"):
        MoEConfig(impl="sparse")
    with pytest.raises(ConfigError, match=r"moe.capacity_factor: must be > 0, got 0"):
        MoEConfig(capacity_factor=0)
    with pytest.raises(ConfigError, match=r"moe.capacity_factor: .*0 tokens .* rounds to 0 slots"):
        MoEConfig().capacity(0)
    cfg = tiny_deepseek(moe=MoEConfig(n_routed_experts=12, n_groups=1, topk_groups=1))
    with pytest.raises(ConfigError, match=r"moe.n_routed_experts: n_routed_experts=12: .*expert = 8"):
        Trainer(cfg, OptimConfig(), LossConfig(), make_mesh(MeshConfig(data=1, expert=8)))


def _residual_shapes(f, *args):
    return [tuple(x.shape) for x in kept_for_backward(f, *args)]


def test_dropless_backward_keeps_rows_not_per_block_weight_copies():
    # 64 tokens x top-2 of 4 experts, d 64, f 128: block 8 -> 20 blocks, each with its expert's weights gathered
    # ([20, 64, 128] per weight, 8x the [160, 128] rows). The backward gathers them again instead of keeping them.
    from model.dispatch import block_rows, block_size, dropless_moe
    n, k, e, d, f = 64, 2, 4, 64, 128
    rs = np.random.RandomState(0)
    x, w = jnp.asarray(rs.normal(size=(n, d)), jnp.float32), jnp.asarray(rs.uniform(size=(n, k)), jnp.float32)
    idx = jnp.asarray(np.stack([rs.permutation(e)[:k] for _ in range(n)]), jnp.int32)
    gate, up, down = (jnp.asarray(rs.normal(size=s) / 8, jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d)))
    block = block_size(n * k, e)
    blocks = block_rows(n * k, e, block) // block
    assert (block, blocks) == (8, 20)
    shapes = _residual_shapes(lambda x, g, u, dn: dropless_moe(x, w, idx, g, u, dn), x, gate, up, down)
    assert not [s for s in shapes if s[0] == blocks and s[1:] in ((d, f), (f, d))], shapes
    assert (blocks, block, f) in shapes  # the gate/up outputs are kept (their product is recomputed)


def test_remat_dots_keeps_projections_not_attention_scores():
    """remat='dots' saves matmul outputs without batch dimensions: the [T, T] score products of the XLA attention
    kernel are recomputed (jax's dots_saveable kept them, more than no remat at all)."""
    t = 64
    cfg = tiny_deepseek(vocab_size=64, d_model=32, n_layers=2, n_heads=2, mlp_dim=64, mtp_depth=0, max_seq_len=t,
                        moe=dataclasses.replace(MOE, impl="dropless"), attention_impl="xla")
    params = init_params(cfg, 0)
    tokens = _tokens(2, t)

    def sizes(remat):
        c = cfg.replace(remat=remat)
        shapes = _residual_shapes(lambda p: jnp.sum(forward(c, p, tokens)[0]), params)
        return shapes, sum(int(np.prod(s)) for s in shapes)

    (none_shapes, none), (dots_shapes, dots), (_, block) = sizes("none"), sizes("dots"), sizes("block")
    assert any(s[-2:] == (t, t) for s in none_shapes)
    assert not any(s[-2:] == (t, t) for s in dots_shapes), dots_shapes
    assert block < dots < 0.6 * none, (block, dots, none)  # measured 176,800 < 350,880 < 0.6 x 700,764
