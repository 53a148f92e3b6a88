"""Two processes on localhost run experiment files through `python -m experiments.run`, joined by the R1JAX_*
environment, against one process with the same two devices: pretraining with parameters sharded across the
processes (fsdp = 2) and each process reading its own data shard, checkpointed, SIGKILLed, resumed; then GRPO from
it (data = 2). One metrics line per step, and the same losses as the one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# two layers (dense, then MoE; MLA and MTP kept): compiling is most of this test's time, three processes at a time
MODEL = ["model.n_layers=2", "model.max_seq_len=256"]
PRETRAIN = ["steps=8", "batch_size=4", "mesh.data=1", "mesh.fsdp=-1", "data.seq_len=32", *MODEL,
            "data.num_shards=2", "progress=false", "tensorboard=false"]
GRPO = [*MODEL, "steps=2", "grpo.prompts_per_step=2", "grpo.num_generations=2", "grpo.sampling.max_new_tokens=6",
        "checkpoint.every=0", "progress=false", "tensorboard=false"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("R1JAX_")}
    return {**env, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **extra}


def _start_two(args):
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=_env(XLA_FLAGS=xla_flags(1), R1JAX_COORDINATOR=f"127.0.0.1:{port}",
                                      R1JAX_NUM_PROCESSES="2", R1JAX_PROCESS_ID=str(i)))
            for i in range(2)]


def _run_two(args) -> str:
    """Run two processes to the end; -> process 0's stderr."""
    errs = []
    for p in _start_two(args):
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, (out[-1000:], err[-3000:])
        errs.append(err)
    return errs[0]


def _start_one(args):
    """One process with two CPU devices: the reference, started beside the two-process run (each is mostly
    single-threaded at this size, so running them together saves wall time)."""
    return subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=_env(XLA_FLAGS=xla_flags(2)))


def _finish(p):
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, (out[-1000:], err[-3000:])


def _lines(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.mark.slow
def test_two_processes_run_experiment_files(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    ref = _start_one(["experiments/tiny_pretrain.py", f"run_dir={one}", *PRETRAIN, "checkpoint.every=0"])

    # two processes, checkpointing every 2 steps, killed mid-run, then resumed
    args = ["experiments/tiny_pretrain.py", f"run_dir={two}", *PRETRAIN, "checkpoint.every=2"]
    procs, metrics = _start_two(args), two / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if metrics.exists() and sum(1 for _ in open(metrics)) >= 5:
            break
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    _finish(ref)
    err = _run_two(args)
    assert "resumed from step" in err, err[-2000:]
    a, b = _lines(one), _lines(two)
    assert [r["step"] for r in b] == list(range(1, 9))  # one line per step: only process 0 writes
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=0, atol=1e-5)
    assert json.load(open(two / "config.json"))["steps"] == 8

    rl_one, rl_two = tmp_path / "rl_one", tmp_path / "rl_two"
    grpo = ["experiments/grpo_arithmetic.py", f"init_from={two}", *GRPO]
    ref = _start_one([*grpo, f"run_dir={rl_one}"])
    _run_two([*grpo, f"run_dir={rl_two}"])
    _finish(ref)
    rows, ref = _lines(rl_two), _lines(rl_one)
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    for key in ("loss", "reward"):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in ref], rtol=0, atol=1e-5, err_msg=key)
