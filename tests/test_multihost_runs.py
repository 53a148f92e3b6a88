"""Two processes on localhost run experiment files through `python -m experiments.run`, joined by the R1JAX_*
environment: pretraining with parameters sharded across the processes (fsdp = 2), then GRPO from it (data = 2),
one metrics line per step, pretraining losses equal to one process with the same two devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = ["steps=3", "batch_size=4", "mesh.data=1", "mesh.fsdp=-1", "data.seq_len=32", "model.max_seq_len=256", "checkpoint.every=0",
            "progress=false", "tensorboard=false"]
GRPO = ["steps=2", "grpo.prompts_per_step=2", "grpo.num_generations=2", "grpo.sampling.max_new_tokens=6",
        "checkpoint.every=0", "progress=false", "tensorboard=false"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("R1JAX_")}
    return {**env, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **extra}


def _run_two(args):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(XLA_FLAGS="", R1JAX_COORDINATOR=f"127.0.0.1:{port}",
                                       R1JAX_NUM_PROCESSES="2", R1JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, (out[-1000:], err[-3000:])


def _lines(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_two_processes_run_experiment_files(tmp_path):
    one, two, rl = tmp_path / "one", tmp_path / "two", tmp_path / "rl"
    ref = subprocess.run([sys.executable, "-m", "experiments.run", "experiments/tiny_pretrain.py", f"run_dir={one}",
                          *PRETRAIN], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    _run_two(["experiments/tiny_pretrain.py", f"run_dir={two}", *PRETRAIN])
    a, b = _lines(one), _lines(two)
    assert [r["step"] for r in b] == [1, 2, 3]  # one line per step: only process 0 writes
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=0, atol=1e-5)
    assert json.load(open(two / "config.json"))["steps"] == 3

    _run_two(["experiments/grpo_arithmetic.py", f"run_dir={rl}", f"init_from={two}", "model.max_seq_len=256",
              *GRPO])
    rows = _lines(rl)
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
