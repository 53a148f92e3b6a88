"""What every training run shares (pretraining / SFT in train/loop.py, GRPO in rl/loop.py): the run directory,
config.json, checkpoints with the model check on resume, metrics, the bad-step guard, the save cadence and plots.

    run = Run(exp)                      # makes run_dir; refuses a checkpoint of another model
    start = run.latest_step()           # 0 for a fresh run
    ...restore or init...
    run.start(start)                    # config.json + metrics writer (process 0 only)
    for step in range(start, exp.steps):
        row = run.record(step + 1, metrics)          # metrics.jsonl / TensorBoard / progress; bad-step guard
        if run.should_save(step + 1): run.ckpt.save(step + 1, state, meta)
    run.finish(plot_keys)

Multi-host: every process takes part in checkpointing (orbax coordinates the processes); only process 0 writes
config.json, metrics.jsonl, TensorBoard events and plots. `jax.distributed` is initialised once, by the entry point
(`experiments.run`), not here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax

from train.checkpoint import Checkpointer
from train.metrics import MetricsWriter, plot_metrics

log = logging.getLogger(__name__)

__all__ = ["Run", "RunError", "first_difference"]


class RunError(RuntimeError):
    """A run that cannot continue as configured (an incompatible checkpoint, too many bad steps)."""


def first_difference(a, b, prefix="model"):
    """The first field where two config dicts differ, as a message; None if they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return None if a == b else f"{prefix}: checkpoint has {a!r}, this run has {b!r}"


class _Discard:
    """The metrics writer of processes other than 0: rows are computed (every process sees them), not written."""

    def write(self, step: int, metrics: dict) -> dict:
        return {"step": int(step), **metrics}

    def close(self) -> None:
        pass


class Run:
    def __init__(self, exp):
        self.exp = exp
        self.directory = exp.directory
        self.is_writer = jax.process_index() == 0
        os.makedirs(self.directory, exist_ok=True)
        self.ckpt = Checkpointer(os.path.join(self.directory, "checkpoints"), keep=exp.checkpoint.keep,
                                 async_save=exp.checkpoint.async_save)
        self.writer = None
        self._bad = 0
        try:
            self._check_model()
        except BaseException:
            self.ckpt.close()
            raise

    def _check_model(self) -> None:
        steps = self.ckpt.steps()
        if not steps:
            return
        saved = self.ckpt.read_meta(steps[-1])["config"]["model"]
        # a field the checkpoint predates is the field's default (e.g. scan_layers, added later: False)
        from model.config import config_from_dict
        saved = dataclasses.asdict(config_from_dict(saved))
        diff = first_difference(json.loads(json.dumps(saved)),
                                json.loads(json.dumps(dataclasses.asdict(self.exp.model))))
        if diff:
            raise RunError(f"{self.ckpt.directory} holds a checkpoint of a different model ({diff}); "
                           "use another run_dir")

    def latest_step(self) -> int:
        steps = self.ckpt.steps()
        return steps[-1] if steps else 0

    def start(self, start_step: int) -> None:
        """Write config.json and open the metrics (process 0), continuing after `start_step`."""
        if self.is_writer:
            with open(os.path.join(self.directory, "config.json"), "w") as fh:
                json.dump(self.exp.to_dict(), fh, indent=2)
            self.writer = MetricsWriter(self.directory, self.exp.steps, start_step, tensorboard=self.exp.tensorboard,
                                        progress=self.exp.progress)
        else:
            self.writer = _Discard()

    def record(self, step: int, metrics: dict) -> dict:
        """Log one step's metrics; raise RunError after `max_bad_steps` skipped (non-finite) steps in a row."""
        row = self.writer.write(step, metrics)
        self._bad = self._bad + 1 if metrics.get("skipped") else 0
        if self._bad >= self.exp.max_bad_steps:
            raise RunError(f"{self._bad} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                           "stopping. The last checkpoint is intact.")
        return row

    def should_save(self, step: int) -> bool:
        every = self.exp.checkpoint.every
        return step == self.exp.steps or bool(every and step % every == 0)

    def close(self) -> None:
        self.ckpt.close()
        if self.writer is not None:
            self.writer.close()

    def plot(self, keys) -> None:
        if self.is_writer:
            plot_metrics(self.directory, keys)
