"""The planner (experiments.plan): parameter counts, per-device sharded memory, KV cache, GPU-hours."""

import dataclasses
import os

import pytest

from experiments.config import Experiment
from experiments.plan import kv_cache_bytes_per_token, main, plan
from experiments.run import load_experiment
from model.budget import count_params, flops_per_token
from model.config import ModelConfig, tiny_deepseek
from sharding.mesh import MeshConfig
from train.data import DataConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V3 = os.path.join(ROOT, "experiments", "deepseek_v3.py")
TINY = os.path.join(ROOT, "experiments", "tiny_pretrain.py")


@pytest.fixture(scope="module")
def v3_plan():
    module, exp = load_experiment(V3, [])
    return plan(exp, 14.8e12, reference=module.REFERENCE)


def test_deepseek_v3_parameters(v3_plan):
    p = v3_plan["params"]
    assert round(p["total"] / 1e9) == 671
    assert 36.5e9 < p["active"] < 38e9  # the report's "37B activated"
    assert p["mtp"] > 0
    assert v3_plan["mesh"]["devices"] == 2048
    assert v3_plan["mesh"]["sizes"] == {"data": 1, "fsdp": 16, "tensor": 2, "expert": 64}


def test_deepseek_v3_plans_4k_pretraining_without_yarn():
    """V3 pretrained at 4K without the YaRN extension (§4.3): the plan's model runs plain RoPE."""
    _, exp = load_experiment(V3, [])
    assert exp.model.max_seq_len == 4096 and exp.model.rope.type == "yarn"
    assert exp.model.rope.active(exp.model.max_seq_len).type == "default"


def test_deepseek_v3_gpu_hours_and_implied_mfu(v3_plan):
    c, ref = v3_plan["compute"], v3_plan["reference"]
    assert c["tokens"] == 14.8e12
    # implied MFU reproduces the report's 2.664M GPU-hours exactly
    hours = v3_plan["flops"]["per_token"] * 14.8e12 / (ref["implied_mfu"] * c["gpu_flops"]) / 3600
    assert hours == pytest.approx(2.664e6)
    assert 0.2 < ref["implied_mfu"] < 0.7
    assert v3_plan["memory"]["fits"]  # the chosen mesh and remat fit an 80 GiB device (as estimated)


def _dense_exp(fsdp: int) -> Experiment:
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=384)
    return Experiment(name="dense", model=cfg, data=DataConfig(seq_len=64), mesh=MeshConfig(data=-1, fsdp=fsdp),
                      batch_size=16)


def test_param_memory_halves_when_fsdp_doubles():
    a = plan(_dense_exp(2), 1e9)["memory"]
    b = plan(_dense_exp(4), 1e9)["memory"]
    assert b["params_sharded_bytes"] * 2 == pytest.approx(a["params_sharded_bytes"])
    assert b["params_replicated_bytes"] == a["params_replicated_bytes"]  # norms only: tiny
    assert a["params_replicated_bytes"] < 0.01 * a["params_bytes"]
    assert b["params_bytes"] == pytest.approx(a["params_bytes"] / 2, rel=0.01)
    assert b["optimizer_bytes"] == pytest.approx(a["optimizer_bytes"] / 2, rel=0.01)
    assert b["gradients_bytes"] == pytest.approx(a["gradients_bytes"] / 2, rel=0.01)
    # fsdp=1: every parameter replicated, the per-device size is the whole model (fp32, 4 bytes)
    whole = plan(_dense_exp(1), 1e9)["memory"]
    assert whole["params_bytes"] == 4 * count_params(_dense_exp(1).model)["total"]


def test_mla_kv_cache_per_token():
    cfg = tiny_deepseek()
    expected = (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) * cfg.n_layers * 4  # float32 compute
    assert kv_cache_bytes_per_token(cfg) == expected
    exp = Experiment(name="t", model=cfg, data=DataConfig(seq_len=128))
    kv = plan(exp, 1e6, decode_batch=3, decode_len=100)["kv_cache"]
    assert kv["bytes_per_token"] == expected and kv["total_bytes"] == 3 * 100 * expected
    gqa = ModelConfig(n_heads=4, n_kv_heads=2, head_dim=32, n_layers=3, compute_dtype="bfloat16")
    assert kv_cache_bytes_per_token(gqa) == 2 * 2 * 32 * 3 * 2


def test_gpu_hours_formula():
    exp = Experiment(name="t", model=tiny_deepseek(), data=DataConfig(seq_len=128))
    p = plan(exp, 3e9, mfu=0.5, gpu_flops=1e15)
    fpt = flops_per_token(exp.model, 128)
    assert p["compute"]["gpu_hours"] == pytest.approx(fpt * 3e9 / (0.5 * 1e15) / 3600)
    active = count_params(exp.model)["active"]
    assert 6 * active * 0.5 < fpt < 6 * active * 2  # 6·N·D-ish


def test_remat_block_keeps_less_than_none():
    exp = Experiment(name="t", model=tiny_deepseek(), data=DataConfig(seq_len=128), batch_size=4)
    none = plan(exp, 1e6)["memory"]["activations_bytes"]
    block = plan(dataclasses.replace(exp, model=exp.model.replace(remat="block")), 1e6)
    dots = plan(dataclasses.replace(exp, model=exp.model.replace(remat="dots")), 1e6)
    assert 0 < block["memory"]["activations_bytes"] < dots["memory"]["activations_bytes"] < none


def test_cli_prints_plan(capsys):
    assert main([TINY, "mesh.fsdp=2", "--devices", "8", "--tokens", "1e9"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "GPU-hours" in out and "data=4 x fsdp=2" in out
    assert main([TINY, "mesh.fsdp=3", "--devices", "3"]) == 2  # d_model 128 does not divide over 3


# ---- the plan against XLA's buffer assignment ----------------------------------------------------------

XLA_MESH = MeshConfig(data=2, fsdp=2, expert=2)  # 8 fake devices (tests/conftest.py)


def _xla_exp(impl: str) -> Experiment:
    # a tiny DeepSeek-V3 (MLA, 1 dense + 1 MoE layer, MTP depth 1)
    cfg = tiny_deepseek(n_layers=2)
    cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, impl=impl, capacity_factor=1.25))
    return Experiment(name=impl, model=cfg, data=DataConfig(seq_len=128), mesh=XLA_MESH, batch_size=16)


@pytest.fixture(scope="module")
def xla_state():
    """One initialised train state for all impls (the impl changes no parameter): (mesh, state)."""
    from sharding.mesh import make_mesh
    from train.config import OptimConfig
    from train.step import Trainer

    mesh = make_mesh(XLA_MESH)
    exp = _xla_exp("dense")
    return mesh, Trainer(exp.model, OptimConfig(lr=1e-3, schedule="constant"), exp.loss, mesh).init_state(0)


def _compiled_step_bytes(exp: Experiment, mesh, state) -> float:
    """Per-device bytes of the compiled Trainer step (train/step.py), from XLA's `memory_analysis()`:
    argument + output + temp − alias, i.e. the state (donated, so its outputs alias its inputs), the batch shard,
    the metrics and the peak of the heap-simulated temporaries (activations, gradients, collective buffers)."""
    import jax
    import jax.numpy as jnp

    from sharding import batch_sharding, use_rules
    from train.config import OptimConfig
    from train.step import Trainer

    trainer = Trainer(exp.model, OptimConfig(lr=1e-3, schedule="constant"), exp.loss, mesh)
    shape = (exp.batch_size, exp.data.seq_len)
    batch = {"inputs": jnp.zeros(shape, jnp.int32), "targets": jnp.zeros(shape, jnp.int32),
             "loss_mask": jnp.ones(shape, jnp.float32)}
    b_sh = jax.tree.map(lambda x: batch_sharding(mesh, trainer.rules, x.ndim), batch)
    st_sh = trainer.state_shardings(state)
    step = jax.jit(trainer._step_fn, in_shardings=(st_sh, b_sh), out_shardings=(st_sh, None), donate_argnums=0)
    with use_rules(mesh, trainer.rules):
        # buffer assignment runs at every level; skipping LLVM's expensive passes only saves compile time
        m = step.lower(state, batch).compile({"xla_llvm_disable_expensive_passes": True,
                                              "xla_backend_optimization_level": 0}).memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


@pytest.mark.parametrize("impl", ["dense", "capacity", "dropless"])
def test_plan_within_25_percent_of_xla(impl, xla_state):
    exp = _xla_exp(impl)
    # train/optim.py: optax.adamw, moments in the parameter dtype (fp32 here), no master copy
    planned = plan(exp, 1e6, moment_bytes=4, master_fp32=False)["memory"]["total_bytes"]
    xla = _compiled_step_bytes(exp, *xla_state)
    assert 0.75 * xla <= planned <= 1.25 * xla, f"{impl}: plan {planned / 2**20:.2f} MiB, XLA {xla / 2**20:.2f} MiB"
