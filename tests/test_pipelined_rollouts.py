"""Pipelined (off-policy) rollouts: grpo.off_policy_steps = N samples step k + N while step k trains, and the loss
weighs tokens by truncated importance sampling (grpo.tis_cap)."""

import dataclasses

import numpy as np
import pytest

from experiments.config import CheckpointConfig, RLExperiment
from model.config import ModelConfig
from rl.grpo import GRPOConfig
from rl.rollout import Sampling
from sharding.mesh import MeshConfig
from train.config import OptimConfig
from train.data import DataConfig
from train.metrics import read_metrics

CFG = ModelConfig(vocab_size=264, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64,
                  max_seq_len=64)
RECORDS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 1), (2, 3), (4, 4), (3, 5)]]


def first_byte_low(completions, **_):
    """A reward with spread on a random model (so updates move the parameters): the first byte's value."""
    return [1.0 - ord(c[0]) / 255 if c else 0.0 for c in completions]


@pytest.fixture(autouse=True)
def _register(monkeypatch):
    from rl import rewards
    monkeypatch.setitem(rewards.REWARDS, "first_byte_low", first_byte_low)


def _exp(run_dir, lr=1e-2, **grpo):
    return RLExperiment(
        name="pipe", model=CFG, run_dir=str(run_dir),
        prompts=DataConfig(kind="prompts", source="memory", tokenizer="byte", chat_template="{prompt}"),
        grpo=GRPOConfig(num_generations=4, prompts_per_step=4, sampling=Sampling(max_new_tokens=6), mini_batches=2,
                        **grpo),
        mesh=MeshConfig(data=-1), optim=OptimConfig(lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0),
        rewards=("first_byte_low",), checkpoint=CheckpointConfig(every=0), max_prompt_len=8, steps=3, progress=False,
        tensorboard=False)


def test_zero_steps_is_todays_loop_and_one_step_lags(tmp_path):
    from rl.loop import grpo
    # N = 0 is the default: the loop's on-policy path (tests/test_grpo_loop.py runs it; no queue, no TIS)
    assert GRPOConfig(off_policy_steps=0) == GRPOConfig()

    # N = 1 at lr "0" (1e-30: below every parameter's float32 resolution; the config refuses 0): the stale
    # parameters are the current ones, so every importance weight is 1 (to the sampler's rounding)
    grpo(_exp(tmp_path / "c", lr=1e-30, off_policy_steps=1, tis_cap=2.0), records=RECORDS)
    c = read_metrics(str(tmp_path / "c"))
    assert [r["staleness"] for r in c] == [0.0, 1.0, 1.0]  # the first step's rollout came from the initial params
    for r in c:
        assert r["tis_weight_dev_max"] < 1e-5 and r["tis_truncated_frac"] == 0.0
        assert r["tis_weight_mean"] == pytest.approx(1.0, abs=1e-6)

    # N = 1 at a real learning rate: stale samples carry weights != 1, truncated at the cap
    grpo(_exp(tmp_path / "d", lr=5e-2, off_policy_steps=1, tis_cap=1.05), records=RECORDS)
    d = read_metrics(str(tmp_path / "d"))
    assert d[-1]["staleness"] == 1.0 and d[-1]["tis_weight_dev_max"] > 1e-3
    assert all(np.isfinite(r["loss"]) for r in d)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="grpo.tis_cap"):
        GRPOConfig(off_policy_steps=1)
    with pytest.raises(ValueError, match="grpo.dynamic_sampling"):
        GRPOConfig(off_policy_steps=1, tis_cap=2.0, dynamic_sampling=True)
    with pytest.raises(ValueError, match="grpo.off_policy_steps"):
        GRPOConfig(off_policy_steps=-1)
    assert dataclasses.replace(GRPOConfig(), off_policy_steps=2, tis_cap=2.0).off_policy_steps == 2
