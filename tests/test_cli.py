"""`python -m experiments.run`: errors a user can fix print as one line (the traceback with verbose=true), plan-only
files refuse to run, and an RLExperiment without `main` runs GRPO."""

import pytest

from experiments.run import main


def _one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_user_errors_are_one_line(capsys, tmp_path):
    err = _one_line_error(capsys, ["experiments/tiny_pretrain.py", f"run_dir={tmp_path}", "mesh.data=3"])
    assert "mesh" in err and "8 devices" in err
    err = _one_line_error(capsys, ["experiments/tiny_pretrain.py", "optim.lrr=1"])
    assert "optim.lr" in err  # the nearest valid name
    err = _one_line_error(capsys, ["experiments/tiny_pretrain.py", "steps=0"])
    assert "steps" in err
    err = _one_line_error(capsys, ["experiments/tiny_pretrain.py", f"run_dir={tmp_path}", "data.source=jsonl",
                                   f"data.path={tmp_path}/missing.jsonl"])
    assert "missing.jsonl" in err
    err = _one_line_error(capsys, ["experiments/deepseek_v3.py"])
    assert "python -m experiments.plan experiments/deepseek_v3.py" in err
    with pytest.raises(Exception, match="mesh"):
        main(["experiments/tiny_pretrain.py", f"run_dir={tmp_path}", "mesh.data=3", "verbose=true"])


@pytest.mark.slow
def test_rl_experiment_runs_its_base_stage_then_grpo_on_its_task(tmp_path):
    """Dispatch on the config type: an RLExperiment with a `base` (and no init_from) pretrains it into run_dir/base,
    then runs GRPO from it, evaluating the task's held-out problems before and after; the CLI sets nested fields."""
    import json

    run = tmp_path / "rl"
    assert main(["experiments/grpo_arithmetic.py", f"run_dir={run}", "base.steps=2", "base.batch_size=8",
                 "base.data.seq_len=64", "model.n_layers=1", "model.moe.first_k_dense=0", "model.max_seq_len=128",
                 "steps=1", "grpo.prompts_per_step=2", "grpo.num_generations=4", "grpo.sampling.max_new_tokens=8",
                 "eval.problems=3", "eval.k=2", "checkpoint.every=0", "progress=false", "tensorboard=false"]) == 0
    base = json.load(open(run / "base" / "config.json"))
    assert base["steps"] == 2 and base["model"]["n_layers"] == 1  # the RL run's model, the base's own length
    saved = json.load(open(run / "config.json"))
    assert saved["init_from"] == str(run / "base") and saved["task"]["name"] == "arithmetic"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert len(rows) == 1 and 0.0 <= rows[0]["accuracy"] <= 1.0  # the task's correctness
    for name in ("eval_start.json", "eval_end.json"):
        ev = json.load(open(run / name))
        assert ev["k"] == 2 and ev["n_problems"] == 3
