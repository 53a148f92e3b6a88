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
