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


# ---- the hard split ------------------------------------------------------------------------------------------------

def test_hard_split_poses_longer_chains_in_the_trained_layout():
    from rl.tasks import DigitChain

    task = DigitChain(slots=8, corpus_docs=500, train_prompts=500)
    splits = task.splits(64)
    assert list(splits) == ["in_distribution", "hard"] and list(DigitChain().splits(4)) == ["in_distribution"]
    trained = task.corpus() + task.train_records() + splits["in_distribution"]
    assert max(len(r["prompt"].split("=?")) - 1 + 1 for r in trained) <= task.max_terms
    assert {r["difficulty"] for r in splits["hard"]} == {7, 8}
    # one worksheet width for every split: slot j sits at the same offset in training and hard prompts
    assert len({len(r["prompt"]) for r in trained + splits["hard"]}) == 1
    assert not {r["prompt"] for r in splits["hard"]} & {r["prompt"] for r in trained}
    with pytest.raises(ValueError, match="task.slots"):
        DigitChain(slots=5)
    with pytest.raises(ValueError, match="hard split"):
        DigitChain().hard(4)


# ---- the random-reward control -----------------------------------------------------------------------------------

def test_random_reward_carries_no_information_about_correctness():
    """On a fixed batch (half right, half wrong answers) the control's reward is uncorrelated with the accuracy reward
    and pays at its rate; a config names it 'random:<rate>'."""
    from rl.loop import reward_function
    from rl.rewards import RandomReward, accuracy_reward, resolve_reward

    rng = np.random.default_rng(0)
    gold = [str(int(x)) for x in rng.integers(0, 10, 4000)]
    right = rng.random(4000) < 0.5
    texts = [f"<think>x</think> <answer>{g if r else (int(g) + 1) % 10}</answer>" for g, r in zip(gold, right)]
    acc = np.asarray(accuracy_reward(texts, answer=gold))
    np.testing.assert_array_equal(acc, right.astype(float))
    rand = np.asarray(RandomReward(rate=0.3, seed=1)(texts, answer=gold))
    assert set(np.unique(rand)) == {0.0, 1.0}
    assert abs(rand.mean() - 0.3) < 0.03
    assert abs(np.corrcoef(rand, acc)[0, 1]) < 0.05
    # two runs' streams differ, one run's is reproducible
    assert (RandomReward(0.3, seed=2)(texts) != rand).any() and (RandomReward(0.3, seed=1)(texts) == rand).all()
    name, fn = resolve_reward("random:0.25", seed=3)
    assert name == "random" and fn.rate == 0.25
    totals, parts = reward_function(("format", "random:0.5"), (1.0, 1.0), seed=0)(texts[:64], answer=gold[:64])
    assert set(parts) == {"format", "random"} and len(totals) == 64
    for bad in ("random:x", "random:1.5", "nope", "format:2"):
        with pytest.raises(ValueError, match="random|unknown"):
            resolve_reward(bad)


# ---- the whole recipe, tiny ---------------------------------------------------------------------------------------

TINY_PIPELINE = [  # every stage a few steps; one MLA + MoE + MTP layer (compile time), a one-layer dense student
    "zero.model.n_layers=1", "zero.model.moe.first_k_dense=0", "zero.steps=2", "zero.grpo.prompts_per_step=2",
    "zero.grpo.num_generations=4", "zero.grpo.sampling.max_new_tokens=24", "zero.base.steps=2",
    "zero.task.corpus_docs=2000", "cold_start_traces=24", "cold_start.steps=2", "cold_start.batch_size=8",
    "rejection.prompts=4", "rejection.k=2", "rejection.max_new_tokens=24", "rejection_sft.steps=2",
    "rejection_sft.batch_size=8", "distill.steps=2", "distill.batch_size=8", "student.n_layers=1",
    "student_base_steps=2", "eval.problems=4", "eval.k=2", "hard_max_new_tokens=24", "seeds=(0, 1)",
    "countdown.model.n_layers=1", "countdown.model.moe.first_k_dense=0", "countdown.steps=2",
    "countdown.grpo.prompts_per_step=2", "countdown.grpo.num_generations=4", "countdown.base.steps=2",
    # Countdown in the zero stage's shapes (its programs come from the compilation cache) and small data pools
    # (reasoning-gym's generator costs ~2 ms a problem: the default pools take ~30 s)
    "countdown.max_prompt_len=64", "countdown.grpo.sampling.max_new_tokens=24", "countdown.task.train_prompts=64",
    "countdown.task.corpus_pool=200", "countdown.task.corpus_docs=2000",
    "progress=false", "tensorboard=false", "workers=1",  # in-process: the test patches verified_traces
]
SCHEMA = ("pass@1", "pass@1_std", "pass@k", "maj@k", "response_len_mean", "think_usage")


@pytest.fixture
def xla_cache(tmp_path):
    """A persistent compilation cache (later stages compile the same GRPO and SFT steps again, and the pipeline
    hands its cache directory to the worker it spawns): the test run's own (tests/conftest.py), else one for this
    test, restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    if jax.config.jax_compilation_cache_dir:
        yield
        return
    old = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    cc.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    cc.reset_cache()


@pytest.mark.slow
def test_pipeline_end_to_end_tiny(tmp_path, monkeypatch, xla_cache):
    import rl.traces
    from experiments import pipeline
    from experiments.eval import read_run_config
    from experiments.overrides import apply_overrides
    from train.metrics import read_metrics

    def verified_and_padded(*args, **kw):  # a 2-step policy verifies nothing: add worked traces for the SFT stages
        return real(*args, **kw) + exp.zero.task.worked(exp.cold_start_seed, 16)

    real = rl.traces.verified_traces
    monkeypatch.setattr(rl.traces, "verified_traces", verified_and_padded)
    root = tmp_path / "p"
    exp = apply_overrides(pipeline.config(), TINY_PIPELINE + [f"run_dir={root}"])
    pipeline.main(exp)

    res = json.loads((root / "results.json").read_text())
    assert res["seeds"] == [0, 1] and res["splits"] == ["in_distribution", "hard"]
    assert set(res["stages"]) == set(pipeline.STAGES) | {"student_base"}
    for stage, entry in res["stages"].items():
        splits = ["in_distribution", "hard"] + (["countdown"] if stage in ("base", "r1_zero") else [])
        assert set(entry) == set(splits) | {"wall_s"}, stage
        assert entry["wall_s"] > 0
        for split in splits:
            m = entry[split]
            assert all(0 <= m[key] <= 1 for key in ("pass@1", "pass@k", "maj@k", "think_usage")), (stage, split)
            assert all(key in m for key in SCHEMA), (stage, split, sorted(m))
            assert m["n_seeds"] == (1 if stage in ("base", "student_base") else 2)
            assert m["pass@1_std"] >= 0 and (m["pass@1_std"] == 0 or m["n_seeds"] == 2)
        if "hard" in entry:  # the hard split poses only chains longer than the trained maximum
            assert {int(d) for d in entry["hard"]["pass@1_by_length"]} <= {7, 8}
            assert max(int(d) for d in entry["in_distribution"]["pass@1_by_length"]) <= 6
    # the seeds differ (the stages' data order and sampling), the stages start where the recipe says
    z0, z1 = (read_metrics(str(root / "r1_zero" / f"seed{s}")) for s in (0, 1))
    assert [r["response_len_mean"] for r in z0] != [r["response_len_mean"] for r in z1]
    assert read_run_config(str(root / "r1/seed1"))["init_from"] == str(root / "cold_start/seed1")
    assert read_run_config(str(root / "cold_start/seed0"))["init_from"] == str(root / "base")
    assert read_run_config(str(root / "rejection_sft/seed0"))["init_from"] == str(root / "base")
    student = read_run_config(str(root / "distill_student/seed0"))
    assert student["init_from"] == str(root / "student_base") and student["model"]["moe"] is None
    rs = read_run_config(str(root / "rl_student/seed0"))
    assert rs["init_from"] == str(root / "student_base") and rs["steps"] == res["rl_student_steps"]
    # the random-reward control pays at the base's pass@1 and logs the task's accuracy beside it
    rate = res["random_reward_rate"]
    assert rate == pytest.approx(res["stages"]["base"]["in_distribution"]["pass@1"], abs=1e-4)
    assert read_run_config(str(root / "random_reward/seed0"))["rewards"] == [f"random:{rate:.4f}"]
    assert all("reward_random" in r and "accuracy" in r for r in read_metrics(str(root / "random_reward/seed0")))
    assert read_run_config(str(root / "format_only/seed1"))["rewards"] == ["format"]
    text = (root / "results.md").read_text()
    for label in ("R1-Zero", "distilled student", "RL student", "random reward", "format reward only", "## hard",
                  "## countdown"):
        assert label in text, label
    assert (root / "rl_curves.png").stat().st_size > 0 and (root / "pass_by_length.png").stat().st_size > 0
    # a second call finds every stage done and only rewrites the report
    times = (root / "timings.json").read_text()
    pipeline.main(exp)
    assert (root / "timings.json").read_text() == times
    # a run redone in a spawned worker process reproduces the in-process result exactly
    import shutil
    redo = ("format_only/seed1",)

    def scores(k):  # an eval file without its timings
        m = json.loads((root / k / "eval_in_distribution.json").read_text())
        return {key: v for key, v in m.items() if not key.endswith("_s")}  # seconds, tokens per second

    before = {k: scores(k) for k in redo}
    for k in redo:
        shutil.rmtree(root / k)
    pipeline.main(dataclasses.replace(exp, workers=2))
    for k in redo:
        assert scores(k) == before[k], k
    after = json.loads((root / "timings.json").read_text())
    assert after["pipeline_wall_s"]["wall_s"] > 0 and json.loads((root / "results.json").read_text())["wall_s_total"] \
        == pytest.approx(after["pipeline_wall_s"]["wall_s"])


def test_job_graph_orders_runs_after_their_inputs():
    from experiments import pipeline
    from experiments.overrides import apply_overrides

    g = pipeline.job_graph(apply_overrides(pipeline.config(), ["seeds=(0, 1)"]))
    assert len(g) == 3 + 2 * (len(pipeline.SEEDED) + 1)  # three bases; every seeded stage and Countdown per seed
    assert g["r1/seed1"] == ("cold_start/seed1",) and g["countdown/r1_zero/seed0"] == ("countdown/base",)
    assert g["distill_student/seed0"] == ("r1/seed0", "rejection_sft/seed0", "student_base")
    keys = list(g)
    assert all(keys.index(d) < keys.index(k) for k, deps in g.items() for d in deps)
    small = pipeline.job_graph(apply_overrides(pipeline.config(), ['stages=("base","distill_student")', "seeds=(3,)"]))
    assert small == {"base": (), "student_base": (), "distill_student/seed3": ("student_base",)}
    with pytest.raises(ValueError, match="workers"):
        apply_overrides(pipeline.config(), ["workers=0"])
