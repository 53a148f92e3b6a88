"""experiments/ablation.ipynb runs top to bottom (tiny budget): a shared base, five GRPO variants on the R1-Zero task,
its figure and summary."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
from xla_env import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "ablation.ipynb"
KERNEL = "r1jax-test-python"


@pytest.mark.slow
def test_ablation_notebook_runs_with_the_tiny_budget(tmp_path, monkeypatch):
    # A kernelspec of our own, found first through JUPYTER_PATH: the kernel is this interpreter (the venv),
    # whatever 'python3' kernels the machine has installed.
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    kernelspec.write_kernel_spec(str(spec_dir))
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    # The kernel inherits this environment: one plain CPU device (not conftest's 8 fake ones), the tiny
    # budget, outputs under tmp_path, and a working directory outside the repository.
    run_root = tmp_path / "runs"
    monkeypatch.setenv("R1JAX_NOTEBOOK_BUDGET", "tiny")
    monkeypatch.setenv("R1JAX_NOTEBOOK_RUN_ROOT", str(run_root))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("XLA_FLAGS", xla_flags(1))  # the suite's other flags (tests/conftest.py)
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code"), \
        "store the notebook without outputs"
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=900, resources={"metadata": {"path": str(cwd)}})
    client.execute()

    assert (run_root / "ablation.png").stat().st_size > 1000
    summary = json.loads((run_root / "summary.json").read_text())
    assert set(summary) == {"base", "grpo", "dapo", "gspo", "cispo", "v32"}
    assert 0.0 <= summary["base"]["pass@1"] <= 1.0
    for name, row in summary.items():
        if name == "base":
            continue
        assert 0.0 <= row["pass@1"] <= 1.0 and math.isfinite(row["response_len_mean"]), (name, row)
        assert row["steps"] == 1 and row["seeds"] == 1 and len(row["pass@1_seeds"]) == 1
        assert (run_root / name / "seed0" / "eval_end.json").exists()
        assert (run_root / name / "seed0" / "metrics.jsonl").exists()
    v32 = json.loads((run_root / "v32" / "seed0" / "config.json").read_text())["grpo"]
    assert v32["keep_routing"] and v32["keep_sampling_mask"] and v32["kl_estimator"] == "k3_unbiased"
    # every variant started from the one shared base
    for name in ("grpo", "cispo"):
        cfg = json.loads((run_root / name / "seed0" / "config.json").read_text())
        assert cfg["init_from"] == str(run_root / "base")
    assert not os.listdir(cwd), "the notebook must write only under its run root"
