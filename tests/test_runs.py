"""Runs: exact resume (bit for bit), SIGKILL mid-training, corrupted checkpoints, overrides, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments.overrides import OverrideError, apply_overrides
from experiments.run import load_experiment
from train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "tiny_pretrain.py")
# a smaller model than the experiment's, so the run tests compile quickly
SMALL = ["model.d_model=64", "model.n_layers=2", "model.vocab_size=320", "data.seq_len=32", "batch_size=8",
         "progress=false"]


def _exp(run_dir, *extra):
    return load_experiment(TINY, SMALL + [f"run_dir={run_dir}", *extra])[1]


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from train.loop import pretrain
    d = str(tmp_path_factory.mktemp("full"))
    pretrain(_exp(d, "steps=8", "checkpoint.every=2"))
    return d


def _final_fingerprint(run_dir):
    from train.checkpoint import Checkpointer
    c = Checkpointer(os.path.join(run_dir, "checkpoints"))
    meta = c.read_meta(c.steps()[-1])
    c.close()
    return meta["step"], meta["fingerprint"]


def test_resume_is_bitwise_identical(uninterrupted, tmp_path):
    from train.loop import pretrain
    d = str(tmp_path)
    pretrain(_exp(d, "steps=5", "checkpoint.every=2"))  # stops after step 5 (checkpoints at 2, 4, 5)
    pretrain(_exp(d, "steps=8", "checkpoint.every=2"))  # resumes from 5
    assert _losses(d) == _losses(uninterrupted)
    assert _final_fingerprint(d) == _final_fingerprint(uninterrupted)


@pytest.mark.slow
def test_sigkill_then_resume(uninterrupted, tmp_path):
    d = str(tmp_path)
    cmd = [sys.executable, "-m", "experiments.run", TINY, *SMALL, f"run_dir={d}", "steps=8", "checkpoint.every=2"]
    # a persistent compilation cache (CI time; the same executables, same numbers): the suite's (tests/conftest.py),
    # which already holds the in-process run's programs, else one for the two processes here
    env = {**os.environ, "PYTHONPATH": ROOT}
    if "JAX_COMPILATION_CACHE_DIR" not in env:
        env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = os.path.join(d, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(d) == _losses(uninterrupted)
    assert _final_fingerprint(d) == _final_fingerprint(uninterrupted)


def test_corrupted_latest_checkpoint_falls_back(uninterrupted, tmp_path, caplog):
    import shutil

    from train.loop import pretrain
    d = str(tmp_path / "run")
    shutil.copytree(uninterrupted, d)
    ck = os.path.join(d, "checkpoints", "8", "state")
    victims = [os.path.join(r, f) for r, _, fs in os.walk(ck) for f in fs if os.path.getsize(os.path.join(r, f)) > 64]
    assert victims
    for v in victims:  # flip bytes in the middle of every data file
        with open(v, "r+b") as fh:
            fh.seek(os.path.getsize(v) // 2)
            chunk = fh.read(16)
            fh.seek(os.path.getsize(v) // 2)
            fh.write(bytes(b ^ 0xFF for b in chunk))
    with caplog.at_level("WARNING"):
        pretrain(_exp(d, "steps=8", "checkpoint.every=2"))
    assert any("step 8" in r.message and "unusable" in r.message for r in caplog.records)
    assert _losses(d) == _losses(uninterrupted)  # steps 7..8 were recomputed from step 6


def test_incompatible_checkpoint_is_refused_and_untouched(uninterrupted, tmp_path):
    import shutil

    from train.loop import pretrain
    from train.run import RunError
    d = str(tmp_path / "run")
    shutil.copytree(uninterrupted, d)
    before = sorted(os.listdir(os.path.join(d, "checkpoints")))
    with pytest.raises(RunError, match=r"model\.d_model: checkpoint has 64, this run has 96"):
        pretrain(_exp(d, "steps=10", "model.d_model=96"))
    assert sorted(os.listdir(os.path.join(d, "checkpoints"))) == before


def test_overrides_are_type_checked_and_suggest_names():
    _, exp = load_experiment(TINY, ["steps=7", "optim.lr=1e-3", "mesh.data=2", "checkpoint.every=3", "seed=4"])
    assert (exp.steps, exp.optim.lr, exp.mesh.data, exp.checkpoint.every, exp.seed) == (7, 1e-3, 2, 3, 4)
    with pytest.raises(OverrideError, match=r"unknown key 'optim.lrr'; did you mean optim.lr"):
        apply_overrides(exp, ["optim.lrr=1"])
    with pytest.raises(OverrideError, match=r"steps='ten': expected an int"):
        apply_overrides(exp, ["steps=ten"])
    with pytest.raises(OverrideError, match="not of the form key=value"):
        apply_overrides(exp, ["steps"])
    # several fields validated together: heads and kv heads changed in one go
    both = apply_overrides(exp, ["model.n_heads=6", "model.n_kv_heads=3"])
    assert (both.model.n_heads, both.model.n_kv_heads) == (6, 3)
    with pytest.raises(ValueError, match="mesh.tensor"):
        apply_overrides(exp, ["mesh.tensor=0"])


def test_cli_reports_bad_override_without_running(tmp_path):
    cmd = [sys.executable, "-m", "experiments.run", TINY, f"run_dir={tmp_path}", "optim.lrr=1"]
    out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "did you mean optim.lr" in out.stderr
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_run_writes_metrics_plots_and_events(uninterrupted):
    rows = read_metrics(uninterrupted)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("loss", "tokens_per_s", "mfu", "ce", "mtp", "grad_norm"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert os.path.exists(os.path.join(uninterrupted, "curves.png"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(uninterrupted, "tb")))
    cfg = json.load(open(os.path.join(uninterrupted, "config.json")))
    assert cfg["model"]["d_model"] == 64


def test_small_replicated_arrays_are_saved_without_slicing_programs(tmp_path):
    """Replica-parallel saving only for slices of 1 MiB or more (train/checkpoint.py): a tiny replicated state on 8
    devices saves without compiling anything (orbax's default sliced it, one program per shape and device) and
    restores equal; a large replicated array is still split across its replicas."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from orbax.checkpoint._src.serialization.replica_slices import get_replica_slices

    from train.checkpoint import REPLICA_PARALLEL_MIN_BYTES, Checkpointer, fingerprint, is_finite

    rep = NamedSharding(jax.make_mesh((8,), ("data",)), P())
    # shapes orbax could split 8 ways (a dimension divisible by 8), seen by no other test
    state = {"w": jax.device_put(jnp.arange(72 * 53, dtype=jnp.float32).reshape(72, 53), rep),
             "b": jax.device_put(jnp.ones((88,), jnp.float32), rep)}
    is_finite(state), fingerprint(state)  # the save's own two programs, compiled before counting
    compiles = []

    def listen(event, secs, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        ckpt = Checkpointer(str(tmp_path / "c"), async_save=False)
        assert ckpt.save(1, state, {})
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == []
    out, _ = ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state))
    ckpt.close()
    for k in state:
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(state[k]))
    # what orbax does with the threshold: under it one replica writes the whole array, at it each writes a slice
    kw = dict(replica_id=0, use_replica_parallel=True, min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
    under = get_replica_slices(jax.device_put(jnp.zeros((1024, 1024), jnp.float32), rep), **kw)  # 512 KiB a replica
    at = get_replica_slices(jax.device_put(jnp.zeros((2048, 1024), jnp.float32), rep), **kw)  # 1 MiB a replica
    assert under.replica_slices[0].slice_args is None and at.replica_slices[0].slice_args is not None
