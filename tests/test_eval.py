"""Held-out evaluation: the pass@k estimator, maj@k voting, evaluate() on a tiny model and on scripted completions,
held-out problems, and `python -m experiments.eval` on GRPO and pretraining run directories."""

import json
import math
import os

import jax
import numpy as np
import pytest

import rl.evaluate as ev
import rl.rollout
from model import init_params
from model.config import ModelConfig
from rl.evaluate import (
    evaluate,
    maj_at_k,
    majority_answer,
    normalize_answer,
    pass_at_k,
    think_used,
)
from rl.rollout import Sampling
from rl.sampler import SampleOutput
from rl.tasks.arithmetic import held_out_problems, seen_synthetic_prompts, synthetic_example
from train.tokenizer import ByteTokenizer

TINY = ModelConfig(vocab_size=264, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64,
                   max_seq_len=64)
KEYS = ("pass@1", "pass@k", "maj@k", "k", "n_problems", "response_len_mean", "think_usage", "format_rate")


# ---- pass@k -------------------------------------------------------------------------------------------------------

def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2) = 0.7
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c = 1 < k
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(8, 3, 8) == 1.0 and pass_at_k(8, 0, 8) == 0.0


def test_pass_at_k_matches_binomial_formula():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    assert pass_at_k(7, 3, 1) == pytest.approx(3 / 7)  # k = 1 is c / n


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_invalid(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# ---- maj@k --------------------------------------------------------------------------------------------------------

def test_normalize_answer():
    assert [normalize_answer(x) for x in ("+3", " 3 ", "3.0", "1,000", 3, "-0", " x ", "", "  ", None, True)] == \
        ["3", "3", "3", "1000", "3", "0", "x", None, None, None, None]


def test_maj_at_k_votes_on_normalised_answers():
    assert maj_at_k(["3", "+3", "4", "3.0"], "3", 4) == 1.0
    assert majority_answer(["3", "+3", "4", "3.0"]) == "3"
    assert maj_at_k(["4", "4", "3"], 3, 3) == 0.0
    # only the first k answers vote
    assert maj_at_k(["4", "3", "3", "3"], "4", 1) == 1.0
    assert maj_at_k(["4", "3", "3", "3"], "4", 4) == 0.0


def test_maj_at_k_tie_break_is_first_occurrence():
    # 2 votes each for '7' and '5'; '7' occurred first
    assert majority_answer(["7", "5", "5", "7"]) == "7"
    assert maj_at_k(["7", "5", "5", "7"], "7", 4) == 1.0
    assert maj_at_k(["7", "5", "5", "7"], "5", 4) == 0.0
    assert majority_answer(["5", "7", "7", "5"]) == "5"
    # a later answer with more votes still wins
    assert majority_answer(["7", "5", "5"]) == "5"


def test_maj_at_k_none_answers_do_not_vote():
    assert maj_at_k([None, None, "3"], "3", 3) == 1.0  # one vote beats two non-answers
    assert maj_at_k([None, "", "  "], "3", 3) == 0.0  # nobody votes -> wrong
    assert majority_answer([None, None]) is None
    assert maj_at_k([None, "4", None, "3", "3"], "3", 5) == 1.0
    assert maj_at_k(["3"], None, 1) == 0.0  # no gold -> wrong


def test_think_used():
    assert think_used("<think>a</think> <answer>1</answer>")
    assert not think_used("<think> </think> <answer>1</answer>")
    assert not think_used("<think>abc <answer>1</answer>")
    assert not think_used("</think>x<think>")
    assert not think_used(None)


# ---- held-out problems --------------------------------------------------------------------------------------------

def test_held_out_problems():
    a = held_out_problems(seed=0, n=50)
    assert a == held_out_problems(seed=0, n=50)  # deterministic
    assert a != held_out_problems(seed=1, n=50)
    assert len({r["prompt"] for r in a}) == 50
    for r in a:
        expr = r["prompt"][len("What is "):-1]
        assert r["difficulty"] == sum(ch in "+-*" for ch in expr) + 1 in (2, 3)
        assert int(r["answer"]) == eval(expr)  # trusted: our own generator's output
    # not training's stream: the first training records of seed 0 are not the first held-out ones
    train = [synthetic_example(0, i)["prompt"] for i in range(50)]
    assert train != [r["prompt"] for r in a]
    # content exclusion
    excl = {r["prompt"][len("What is "):-1] for r in a[:10]}
    b = held_out_problems(seed=0, n=20, exclude=excl)
    assert not excl & {r["prompt"][len("What is "):-1] for r in b}


def test_seen_synthetic_prompts_small():
    seen = seen_synthetic_prompts(3, size=20)
    rec = synthetic_example(3, 7)
    assert rec["prompt"][len("What is "):-1] in seen
    assert rec["text"].split("\n")[0][3:].split("=?")[0] in seen


# ---- evaluate() on a random tiny model ----------------------------------------------------------------------------

def test_evaluate_tiny_random_model():
    tok = ByteTokenizer()
    params = init_params(TINY, 0)
    records = held_out_problems(seed=0, n=3)
    m = evaluate(TINY, params, tok, records, k=2, sampling=Sampling(max_new_tokens=4, temperature=0.6, top_p=0.95), template="{prompt}", rng=jax.random.key(1),
                 batch_size=4, details=True)  # 6 rows in batches of 4: the last one padded
    for key in KEYS:
        assert key in m, key
    assert m["k"] == 2 and m["n_problems"] == 3 and m["n_samples"] == 6 and "pass@2" in m and "maj@2" in m
    for key in ("pass@1", "pass@k", "maj@k", "think_usage", "format_rate", "answer_rate", "truncated_frac"):
        assert 0.0 <= m[key] <= 1.0, key
    assert 1 <= m["response_len_mean"] <= 4
    assert sum(v["n"] for v in m["by_difficulty"].values()) == 3
    assert [len(p["completions"]) for p in m["problems"]] == [2, 2, 2]
    # same rng -> same result; the batch split does not matter for the keys' ranges
    m2 = evaluate(TINY, params, tok, records, k=2, sampling=Sampling(max_new_tokens=4, temperature=0.6, top_p=0.95), template="{prompt}", rng=jax.random.key(1),
                  batch_size=4, details=True)
    assert m2["problems"] == m["problems"]


# ---- evaluate() with scripted completions -------------------------------------------------------------------------

SCRIPT = {
    "What is 2+3?": ["<think>2+3=5</think> <answer>5</answer>", "<think>x</think> <answer>6</answer>",
                     "<answer>5</answer>", "<think>y</think> <answer>6</answer>"],  # c=2, votes 5/6 tie -> 5
    "What is 7*3?": ["<think>a</think> <answer>20</answer>", "<think> </think> <answer>22</answer>",
                     "<think>b</think> <answer>21</answer>", "<think>c</think> <answer>22</answer>"],  # c=1, maj 22
    "What is 9-9?": ["no answer", "<answer> 0 </answer>", "<think>z</think> <answer>+0</answer>",
                     "<think>w</think> <answer>-0</answer>"],  # c=3, maj 0
}
RECORDS = [{"prompt": "What is 2+3?", "answer": "5", "difficulty": 2},
           {"prompt": "What is 7*3?", "answer": "21", "difficulty": 2},
           {"prompt": "What is 9-9?", "answer": "0", "difficulty": 3}]


def _fake_generate(tok):
    served = {}

    def fake(cfg, params, prompts, prompt_lens, max_new_tokens, temperature=1.0, rng=None, **kw):
        rows, lens = [], []
        for p, n in zip(np.asarray(prompts), np.asarray(prompt_lens)):
            q = tok.decode([int(t) for t in p[:n] if t != tok.bos_id])
            j = served.get(q, 0)
            served[q] = j + 1
            text = SCRIPT[q][j % len(SCRIPT[q])]
            ids = (tok.encode(text) + [tok.eos_id])[:max_new_tokens]
            rows.append(ids + [tok.pad_id] * (max_new_tokens - len(ids)))
            lens.append(len(ids))
        b = len(rows)
        return SampleOutput(np.asarray(rows, np.int32), np.zeros((b, max_new_tokens), np.float32),
                            np.asarray(lens, np.int32), np.zeros(b, bool))

    return fake, served


def test_evaluate_scripted_completions(monkeypatch):
    tok = ByteTokenizer()
    fake, served = _fake_generate(tok)
    monkeypatch.setattr(rl.rollout, "generate", fake)
    m = evaluate(TINY, None, tok, RECORDS, k=4, sampling=Sampling(max_new_tokens=60), template="{prompt}",
                 batch_size=5)
    assert sum(served.values()) == 15  # 12 rows in 3 batches of 5, the last padded with a repeat
    assert m["pass@1"] == pytest.approx((2 / 4 + 1 / 4 + 3 / 4) / 3)
    assert m["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 1, 2) + pass_at_k(4, 3, 2)) / 3)
    assert m["pass@4"] == m["pass@k"] == 1.0
    assert m["maj@4"] == m["maj@k"] == pytest.approx(2 / 3)  # 5 (tie 5/6 -> first) right, 22 wrong, 0 right
    assert m["think_usage"] == pytest.approx(8 / 12)
    assert m["format_rate"] == pytest.approx(9 / 12)
    assert m["answer_rate"] == pytest.approx(11 / 12)
    lens = [len(tok.encode(t)) + 1 for q in SCRIPT for t in SCRIPT[q]]
    assert m["response_len_mean"] == pytest.approx(np.mean(lens))
    assert m["by_difficulty"][2] == {"n": 2, "pass@1": pytest.approx(3 / 8), "pass@k": 1.0, "maj@k": 0.5,
                                     "response_len_mean": pytest.approx(np.mean(lens[:8]))}
    assert m["by_difficulty"][3]["pass@1"] == pytest.approx(0.75) and m["by_difficulty"][3]["maj@k"] == 1.0


def test_evaluate_prepends_think_when_template_ends_with_it(monkeypatch):
    tok = ByteTokenizer()
    SCRIPT["Q <think>"] = ["reasoning</think> <answer>5</answer>"]
    try:
        fake, _ = _fake_generate(tok)
        monkeypatch.setattr(rl.rollout, "generate", fake)
        m = evaluate(TINY, None, tok, [{"prompt": "Q", "answer": "5"}], k=1, sampling=Sampling(max_new_tokens=60),
                     template="{prompt} <think>")
    finally:
        del SCRIPT["Q <think>"]
    assert m["format_rate"] == 1.0 and m["think_usage"] == 1.0 and m["pass@1"] == 1.0
    assert "by_difficulty" not in m


# ---- experiments.eval on run directories --------------------------------------------------------------------------

def test_model_config_from_dict_roundtrip():
    import dataclasses

    from experiments.eval import model_config_from_dict
    from model.config import tiny_deepseek
    for cfg in (tiny_deepseek(max_seq_len=128), TINY):
        assert model_config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


OPTIM = {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"}


@pytest.fixture(scope="module")
def train_state():
    """One seed-5 train state of TINY (as the loops' Trainer builds it), shared by the fake run directories."""
    from sharding import make_mesh
    from sharding.mesh import MeshConfig
    from train.config import LossConfig, OptimConfig
    from train.step import Trainer
    return Trainer(TINY, OptimConfig(**OPTIM), LossConfig(), make_mesh(MeshConfig(data=-1))).init_state(5)


def _fake_run(run_dir, state, *, rl: bool, ref: bool, beta: float = 0.05):
    """A run directory like the loops leave: config.json and one checkpoint (step 3) holding `state`."""
    import jax.numpy as jnp

    from experiments.config import Experiment, RLExperiment
    from rl.grpo import GRPOConfig
    from sharding.mesh import MeshConfig
    from train.checkpoint import Checkpointer
    from train.config import OptimConfig
    from train.data import DataConfig

    optim = OptimConfig(**OPTIM)
    if rl:
        exp = RLExperiment(name="r", model=TINY, run_dir=run_dir, grpo=GRPOConfig(beta=beta), optim=optim,
                           prompts=DataConfig(kind="prompts", source="synthetic", chat_template="{prompt}", seed=1),
                           mesh=MeshConfig(data=-1), max_prompt_len=24)
    else:
        exp = Experiment(name="p", model=TINY, run_dir=run_dir, optim=optim,
                         data=DataConfig(kind="sft", source="synthetic", chat_template="{prompt}"))
    tree = {"train": state, **({"ref": jax.tree.map(jnp.copy, state["params"])} if ref else {})} if rl else state
    os.makedirs(run_dir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    ckpt.save(3, tree, {"config": exp.to_dict()})
    ckpt.close()
    with open(os.path.join(run_dir, "config.json"), "w") as fh:
        json.dump(exp.to_dict(), fh)


@pytest.mark.parametrize("rl,ref", [(False, False), (True, True), (True, False)])
def test_load_run_params_layouts(tmp_path, train_state, rl, ref):
    from experiments.eval import (
        load_run_params,
        model_config_from_dict,
        read_run_config,
    )
    from sharding import make_mesh
    from sharding.mesh import MeshConfig

    run = str(tmp_path)
    _fake_run(run, train_state, rl=rl, ref=ref)  # (True, False): beta > 0 in the config, but no 'ref' saved
    saved = read_run_config(run)
    params, step = load_run_params(run, saved, model_config_from_dict(saved["model"]), make_mesh(MeshConfig()))
    assert step == 3
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(train_state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_cli(tmp_path, train_state, monkeypatch):
    from experiments.eval import main

    monkeypatch.chdir(tmp_path)  # a relative RUN_DIR, as typed on the command line
    _fake_run("rl", train_state, rl=True, ref=True)
    out = str(tmp_path / "e" / "eval.json")
    assert main(["rl", "--k", "2", "--n", "3", "--max-new-tokens", "4", "--batch-size", "8", "--out", out,
                 "--samples"]) == 0
    with open(out) as fh:
        res = json.load(fh)
    assert res["checkpoint_step"] == 3 and res["n_problems"] == 3 and res["k"] == 2
    for key in KEYS:
        assert key in res
    assert all(0.0 <= res[key] <= 1.0 for key in ("pass@1", "pass@k", "maj@k", "think_usage", "format_rate"))
    with open(tmp_path / "e" / "eval_samples.jsonl") as fh:
        assert len(fh.readlines()) == 3
    assert main([str(tmp_path / "missing")]) == 2
