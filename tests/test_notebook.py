"""experiments/ablation.ipynb runs top to bottom (tiny budget) and writes its figure and summary."""

import json
import math
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "ablation.ipynb"
KERNEL = "r1jax-test-python"


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
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code"), \
        "store the notebook without outputs"
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(cwd)}})
    client.execute()

    assert (run_root / "ablation.png").stat().st_size > 1000
    summary = json.loads((run_root / "summary.json").read_text())
    assert set(summary) == {"grpo", "dr_grpo", "dapo"}
    for name, row in summary.items():
        assert math.isfinite(row["final_reward"]), (name, row)
        assert row["steps"] == 2 and row["seeds"] == 1
    for name in summary:
        assert (run_root / name / "seed0" / "metrics.jsonl").exists()
    assert not os.listdir(cwd), "the notebook must write only under its run root"
