"""The R1 recipe's stages: loading a GRPO run's policy, verified traces, and the whole pipeline with tiny budgets."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from model.config import ModelConfig

TINY = ModelConfig(vocab_size=264, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64,
                   max_seq_len=64)
EVAL_KEYS = ("pass@1", "pass@k", "maj@k", "k", "n_problems", "response_len_mean", "think_usage", "by_difficulty")


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- loading a GRPO run directory's policy ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_trainer():
    from sharding import make_mesh
    from sharding.mesh import MeshConfig
    from train.config import LossConfig, OptimConfig
    from train.step import Trainer
    optim = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant")
    return Trainer(TINY, optim, LossConfig(), make_mesh(MeshConfig(data=-1)))


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_load_base_params_reads_a_grpo_run_policy(tmp_path, tiny_trainer, beta):
    """A GRPO checkpoint {'train': state, 'ref': params (β > 0)}: the loader returns the 'train' params, not 'ref'."""
    from experiments.config import RLExperiment
    from rl.grpo import GRPOConfig
    from train.checkpoint import Checkpointer
    from train.data import DataConfig
    from train.loop import load_base_params

    state = tiny_trainer.init_state(5)
    exp = RLExperiment(name="r", model=TINY, run_dir=str(tmp_path), grpo=GRPOConfig(beta=beta),
                       optim=tiny_trainer.ocfg, prompts=DataConfig(kind="prompts", source="memory",
                                                                   chat_template="{prompt}"))
    tree = {"train": state, **({"ref": jax.tree.map(lambda x: x + 1, state["params"])} if beta else {})}
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(3, tree, {"config": exp.to_dict()})
    ckpt.close()
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(exp.to_dict(), fh)
    _equal(load_base_params(str(tmp_path), tiny_trainer), state["params"])


# ---- verified traces ----------------------------------------------------------------------------------------------

def test_verified_traces_keep_only_correct_and_formatted(monkeypatch):
    import rl.traces

    good = " <think>2 +3=5</think> <answer>5</answer>"
    completions = {
        "2 +3=?": [good,                                   # correct, formatted: kept
                   good + " ",                             # the same after stripping: dropped
                   " <think>2 +3=6</think> <answer>6</answer>",  # wrong answer
                   " <answer>5</answer>",                  # right answer, no <think>: format 0
                   " <think>2+3</think> <answer>5</answer>"],    # a second correct one: over the cap of 1
        "4 -1=?": [" <think>4 -1=2</think> <answer>2</answer>", " <think></think> <answer>5</answer> extra"],
    }
    answers = {"2 +3=?": "5", "4 -1=?": "3"}

    def fake_evaluate(cfg, params, tok, records, *, k, details, **kw):
        assert details and k == 5
        return {"problems": [{"prompt": r["prompt"], "answer": r["answer"], "difficulty": 2,
                              "completions": completions[r["prompt"]]} for r in records]}

    monkeypatch.setattr(rl.traces, "evaluate", fake_evaluate)
    records = [{"prompt": p, "answer": a} for p, a in answers.items()]
    traces = rl.traces.verified_traces(None, None, None, records, k=5)
    assert traces == [{"prompt": "2 +3=?", "response": good.strip(), "difficulty": 2}]
    two = rl.traces.verified_traces(None, None, None, records, k=5, max_per_problem=2)
    assert [t["response"] for t in two] == [good.strip(), "<think>2+3</think> <answer>5</answer>"]


def test_cold_start_traces_are_curated_worked_solutions():
    from experiments import r1
    from rl.rewards import format_reward

    exp = r1.config()
    traces = r1.cold_start_traces(exp)
    assert 250 <= len(traces) <= 300
    assert len({t["prompt"] for t in traces}) == len(traces)
    assert all(f == 1.0 for f in format_reward([t["response"] for t in traces]))
    t = exp.rl.task
    assert exp.cold_start_seed not in (t.held_out_seed, t.corpus_seed, t.prompt_seed)
    with pytest.raises(ValueError, match="cold_start_seed"):
        dataclasses.replace(exp, cold_start_seed=t.held_out_seed)


def test_rejection_sft_names_the_override_when_the_rl_run_is_missing(tmp_path):
    from experiments import rejection_sft
    exp = dataclasses.replace(rejection_sft.config(), init_from=str(tmp_path / "no_rl"), run_dir=str(tmp_path / "r"))
    with pytest.raises(FileNotFoundError, match="init_from="):
        rejection_sft.main(exp)


# ---- the whole recipe, tiny ---------------------------------------------------------------------------------------

TINY_PIPELINE = [  # every stage a few steps; one MLA + MoE + MTP layer (compile time), a one-layer dense student
    "zero.model.n_layers=1", "zero.model.moe.first_k_dense=0",
    "zero.steps=2", "zero.grpo.prompts_per_step=2", "zero.grpo.num_generations=4", "zero.grpo.sampling.max_new_tokens=24",
    "zero.checkpoint.every=0",
    "r1.rl.steps=2", "r1.rl.grpo.prompts_per_step=2", "r1.rl.grpo.num_generations=4",
    "r1.rl.grpo.sampling.max_new_tokens=24", "r1.rl.checkpoint.every=0", "r1.traces=24", "r1.cold_start.steps=2",
    "r1.cold_start.batch_size=8",
    "rejection.sample.prompts=4", "rejection.sample.k=2", "rejection.sample.max_new_tokens=24",
    "rejection.sft.steps=2", "rejection.sft.batch_size=8",
    "distill.sft.steps=2", "distill.sft.batch_size=8", "distill.student.n_layers=1",
    "zero.eval.problems=4", "zero.eval.k=2", "zero.base.steps=2", "zero.task.corpus_docs=2000",
    "progress=false", "tensorboard=false",
]


@pytest.fixture
def xla_cache(tmp_path):
    """A persistent compilation cache for one test (later stages compile the same GRPO and SFT steps again)."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    old = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    cc.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    cc.reset_cache()


def test_pipeline_end_to_end_tiny(tmp_path, monkeypatch, xla_cache):
    import rl.traces
    from experiments import pipeline, r1
    from experiments.eval import model_config_from_dict, read_run_config
    from experiments.overrides import apply_overrides
    from sharding import make_mesh
    from sharding.mesh import MeshConfig
    from train.checkpoint import Checkpointer
    from train.config import LossConfig, OptimConfig
    from train.loop import load_base_params
    from train.step import Trainer

    sampled = []

    def verified_and_padded(*args, **kw):  # a 2-step policy verifies nothing: add worked traces for the SFT stages
        sampled.append(real(*args, **kw))
        return sampled[-1] + r1.cold_start_traces(dataclasses.replace(r1.config(), traces=16))

    real = rl.traces.verified_traces
    monkeypatch.setattr(rl.traces, "verified_traces", verified_and_padded)
    root = tmp_path / "p"
    exp = apply_overrides(pipeline.config(), TINY_PIPELINE + [f"run_dir={root}"])
    pipeline.main(exp)

    for rel in ("r1_zero/eval_start.json", "r1_zero/eval_end.json", "r1/cold_start/eval.json", "r1/eval_start.json",
                "r1/eval_end.json", "rejection_sft/eval.json", "distill/eval.json"):
        with open(root / rel) as fh:
            m = json.load(fh)
        assert all(key in m for key in EVAL_KEYS), (rel, sorted(m))
        assert m["k"] == 2 and m["n_problems"] == 4, rel
    # the SFT stages started from the shared base; the student is the dense model
    assert read_run_config(str(root / "r1/cold_start"))["init_from"] == str(root / "base")
    assert read_run_config(str(root / "rejection_sft"))["init_from"] == str(root / "base")
    student = read_run_config(str(root / "distill"))["model"]
    assert student["mla"] is None and student["moe"] is None and student["n_layers"] == 1
    assert len(sampled) == 1  # sampled once from r1's policy (rl.evaluate + the GRPO loader); distill reused it
    with open(root / "rejection_sft/traces.jsonl") as fh:
        assert len(fh.readlines()) == len(sampled[0]) + len(r1.cold_start_traces(dataclasses.replace(r1.config(),
                                                                                                      traces=16)))

    text = (root / "results.md").read_text()
    for stage, _, _ in pipeline.STAGES:
        assert sum(line.startswith(f"| {stage} |") for line in text.splitlines()) >= 1, stage
    assert (root / "rl_curves.png").exists() and (root / "r1" / "curves.png").exists()

    # the GRPO-run loader returns the policy r1 saved: against a full restore of the state as rl.loop.grpo builds it
    saved = read_run_config(str(root / "r1"))
    trainer = Trainer(model_config_from_dict(saved["model"]), OptimConfig(**saved["optim"]), LossConfig(),
                      make_mesh(MeshConfig(data=-1)))
    state = trainer.init_state(0)
    full = {"train": state, **({"ref": state["params"]} if saved["grpo"]["beta"] > 0 or saved["grpo"].get("log_kl") else {})}
    ckpt = Checkpointer(str(root / "r1" / "checkpoints"))
    restored, meta = ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                               full))
    ckpt.close()
    assert meta["step"] == 2
    _equal(load_base_params(str(root / "r1"), trainer), restored["train"]["params"])
