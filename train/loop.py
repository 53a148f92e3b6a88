"""The pretraining / SFT run: data -> jitted step -> metrics, checkpoints, exact resume, plots.

Resume is exact: the train state, the RNG and the data iterator's position are restored from the newest
intact checkpoint, so a run killed at any moment and restarted produces bit for bit the same steps as one
that was never interrupted (tests/test_runs.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from model import flops_per_token, init_params
from sharding import batch_sharding, make_mesh, use_rules
from sharding.distributed import global_batch
from train.checkpoint import Checkpointer, key_data, key_from_data
from train.data import load_tokenizer, make_iterator, validate_vocab
from train.run import Run, RunError
from train.step import Trainer, split_trainable

log = logging.getLogger(__name__)


_PEAK: dict[str, float] = {}


def matmul_peak_flops(n: int = 1024, reps: int = 5) -> float:
    """Measured float32 matmul FLOP/s on the default device (cached per process)."""
    if "peak" not in _PEAK:
        a = jnp.ones((n, n), jnp.float32)
        f = jax.jit(jnp.dot)
        f(a, a).block_until_ready()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f(a, a).block_until_ready()
            times.append(time.perf_counter() - t)
        _PEAK["peak"] = 2 * n ** 3 / float(np.median(times))
    return _PEAK["peak"]


def _sds(shapes, shardings):
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings)


def abstract_params_sharded(trainer: Trainer):
    """The params as jax.ShapeDtypeStruct leaves carrying the trainer's NamedShardings (nothing allocated)."""
    with use_rules(trainer.mesh, trainer.rules):
        shapes = jax.eval_shape(lambda: init_params(trainer.cfg, 0))
    return _sds(shapes, trainer.param_sharding)


def abstract_state(trainer: Trainer) -> dict:
    """The train state {'params', 'opt_state', 'step'} as jax.ShapeDtypeStruct leaves with the shardings
    `Trainer.init_state` gives it (moments sharded like their params, counts replicated), from shapes alone.

    Why: restoring into an abstract target allocates only the restored state; building it from a real
    `init_state` kept a whole fresh state alive beside the restored one (2x the state at the peak).
    """
    params = abstract_params_sharded(trainer)
    init = lambda p: trainer.tx.init(split_trainable(p)[0])  # noqa: E731
    opt_shapes = jax.eval_shape(init, params)
    replicated = NamedSharding(trainer.mesh, P())
    opt_sharding = optax.tree_map_params(trainer.tx, lambda _, sh: sh, opt_shapes,
                                         split_trainable(trainer.param_sharding)[0],
                                         transform_non_params=lambda _: replicated)
    # the step counter replicated like the optimizer's counts: init_state's is an uncommitted jnp.zeros, which jit
    # may place anywhere; a restored array is committed, and one on device 0 alone clashes with the mesh's
    return {"params": params, "opt_state": _sds(opt_shapes, opt_sharding),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}


def load_base_params(path: str, trainer: Trainer | None):
    """The params a run starts from (`init_from`), placed with `trainer`'s shardings, from one of:

    - an HF checkpoint directory (config.json + *.safetensors);
    - a pretraining / SFT run directory: the params of its newest intact checkpoint;
    - a GRPO run directory (config.json with 'grpo'): its policy, the 'train' params of the checkpoint
      {'train': state, 'ref': params (when β > 0)} that rl.loop.grpo saves.
    Run directories are read with a partial restore of the params alone (Checkpointer.restore_params): no optimizer
    state is built or loaded, so nothing is compiled and the saved optimizer config does not matter.
    """
    if os.path.exists(os.path.join(path, "config.json")) and any(f.endswith(".safetensors") for f in os.listdir(path)):
        from model.hf import load_hf
        if trainer is None:  # no mesh to place on: the checkpoint's own layout, default placement
            return load_hf(path)[1]
        # straight into the trainer's shardings: each device reads only its shard of the files
        return load_hf(path, param_dtype=trainer.cfg.param_dtype, mesh=trainer.mesh, rules=trainer.rules)[1]
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"init_from={path!r}: not a run directory (no config.json) nor an HF checkpoint")
    abstract = abstract_params_sharded(trainer)
    ckpt = Checkpointer(os.path.join(path, "checkpoints"))
    restored = ckpt.restore_params(abstract)
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"init_from={path!r}: no usable checkpoint under {path}/checkpoints")
    return restored[0]


def restore_or_init(exp, trainer: Trainer, ckpt: Checkpointer):
    """-> (state, rng, data_state or None, start_step). `Run` has already refused a checkpoint of another model.

    A fresh run starts from `exp.init_from` (see `load_base_params`) when set, else from a random init."""
    steps = ckpt.steps()
    rng = jax.random.key(exp.seed)
    if not steps:
        state = (trainer.state_from_params(load_base_params(exp.init_from, trainer)) if exp.init_from
                 else trainer.init_state(exp.seed))
        return state, rng, None, 0
    restored = ckpt.restore(abstract_state(trainer))
    if restored is None:
        raise RunError(f"{ckpt.directory}: no usable checkpoint among steps {steps}; move it away to start afresh")
    state, meta = restored
    log.info("resumed from step %d of %s", meta["step"], ckpt.directory)
    return state, key_from_data(meta["rng"]), meta.get("data"), int(meta["step"])


def pretrain(exp, records=None) -> dict:
    """Train `exp` to `exp.steps`, resuming from exp.directory if it holds a checkpoint.

    Returns the last metrics row.
    """
    tokenizer = load_tokenizer(exp.data.tokenizer)
    validate_vocab(tokenizer, exp.model.vocab_size)
    exp = dataclasses.replace(exp, optim=dataclasses.replace(exp.optim, total_steps=exp.optim.total_steps or exp.steps))
    mesh = make_mesh(exp.mesh)
    trainer = Trainer(exp.model, exp.optim, exp.loss, mesh)
    data = make_iterator(exp.data, exp.batch_size, tokenizer, records=records)
    run = Run(exp)
    row = {}
    try:
        state, rng, data_state, start = restore_or_init(exp, trainer, run.ckpt)
        if data_state is not None:
            data.set_state(data_state)
        run.start(start)
        seq = exp.data.seq_len
        flops_tok = flops_per_token(exp.model, seq)
        peak = matmul_peak_flops() * jax.device_count()
        sharding = batch_sharding(mesh)
        for step in range(start, exp.steps):
            batch = global_batch(next(data), sharding)
            t0 = time.perf_counter()
            state, metrics = trainer.step(state, batch)
            metrics = jax.device_get(metrics)
            dt = time.perf_counter() - t0
            tokens = exp.batch_size * seq
            row = run.record(step + 1, {**metrics, "tokens_per_s": tokens / dt,
                                        "mfu": flops_tok * tokens / dt / peak, "step_time": dt})
            if run.should_save(step + 1):
                run.ckpt.save(step + 1, state, {"config": exp.to_dict(), "rng": key_data(rng),
                                                "data": data.get_state()})
    finally:
        run.close()
    run.plot(["loss", "ce", "mtp", "balance", "grad_norm", "tokens_per_s", "mfu"])
    return row
