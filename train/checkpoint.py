"""Orbax checkpoints of a whole run: train state, RNG, data-iterator state, config; exact resume.

Each step directory holds three items: 'state' (params, optimizer state, step — sharded arrays),
'meta' (JSON: step, config, RNG key data, data-iterator state, and a fingerprint of every array), and is
written asynchronously; orbax commits a step atomically (temporary directory, then rename), so a process
killed at any moment leaves the previous steps intact. On restore the fingerprints are recomputed: a
truncated or corrupted latest step is reported with a warning and the previous one is used.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
# the default handler's store, and the registry's `add` with ignore_warnings (no public path to either)
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization.type_handler_registry import GLOBAL_TYPE_HANDLER_REGISTRY

log = logging.getLogger(__name__)

# Replica-parallel saving (the replicas of a replicated array each write 1/R of it) only where a replica's slice is
# 1 MiB or more: a smaller slice costs more than it saves (a compiled slice program per shape and device, a dispatch;
# the tiny pipeline test compiled 328 of them, ~11 s, on 8 CPU devices). Orbax's default handler, with that threshold.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20
GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, ocp.type_handlers.ArrayHandler(
    array_metadata_store=array_metadata_store.Store(), min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES),
    override=True, ignore_warnings=True)


class CheckpointError(RuntimeError):
    pass


@jax.jit
def _fingerprints(tree):
    """One uint32 per leaf: the sum (mod 2**32) of its bits viewed as uint32, position-weighted."""
    def fp(x):
        x = jnp.asarray(x)
        if x.dtype.itemsize != 4:
            x = x.astype(jnp.float32)
        words = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
        weights = jnp.arange(1, words.size + 1, dtype=jnp.uint32) * jnp.uint32(2654435761)
        return jnp.sum(words * weights + (words >> 7), dtype=jnp.uint32)

    return jnp.stack([fp(x) for x in jax.tree.leaves(tree)])


def fingerprint(tree) -> list[int]:
    # one array, one transfer: a scalar per leaf cost a device round trip each (~1 s a save at 250 leaves)
    return [int(v) for v in np.asarray(_fingerprints(tree))] if jax.tree.leaves(tree) else []


@jax.jit
def _all_finite(tree):
    # one program for the whole tree: leaf by leaf, each new shape compiled its own tiny program (~2.5 s a save)
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def is_finite(tree) -> bool:
    return bool(_all_finite(tree))


class Checkpointer:
    """Save every `every` steps, keep the last `keep`; restore the newest intact step onto any mesh."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state, meta: dict) -> bool:
        """Start saving (asynchronously). A non-finite state is refused (returns False) and never written."""
        if not is_finite(state):
            log.error("step %d: parameters are not finite; checkpoint not written", step)
            return False
        meta = dict(meta, step=int(step), fingerprint=fingerprint(state))
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))
        return True

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state):
        """-> (state, meta) of the newest step that restores and verifies, or None if there is none.

        abstract_state: a pytree of jax.ShapeDtypeStruct with the target shardings (any mesh).
        """
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                state, meta = out["state"], out["meta"]
                if fingerprint(state) != meta["fingerprint"]:
                    raise CheckpointError("array fingerprints do not match (corrupted data)")
                return state, meta
            except Exception as e:  # corrupted, truncated or from another config
                log.warning("checkpoint step %d in %s is unusable (%s: %s); trying the previous one",
                            step, self.directory, type(e).__name__, str(e).splitlines()[0][:300])
        return None

    def restore_params(self, abstract_params):
        """-> (params, meta) of the newest step whose params restore and verify, or None.

        A partial restore of the params alone: the state's 'params' (pretraining / SFT: {'params', 'opt_state',
        'step'}) or its 'train' entry's (GRPO: {'train': state, 'ref': params when β > 0}, told apart by the saved
        tree); optimizer moments and reference params are never read. Integrity: the params' fingerprints must
        appear, in order, in the step's fingerprint list; a step that fails is skipped for the previous one.
        """
        from etils import epath

        for step in reversed(self.steps()):
            try:
                saved = ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "state").tree
                target = {"train": {"params": abstract_params}} if "train" in saved else {"params": abstract_params}
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(
                        target), partial_restore=True),
                    meta=ocp.args.JsonRestore()))
                state, meta = out["state"], out["meta"]
                params = state["train"]["params"] if "train" in state else state["params"]
                if not _contains(list(meta["fingerprint"]), fingerprint(params)):
                    raise CheckpointError("array fingerprints do not match (corrupted data)")
                return params, meta
            except Exception as e:  # corrupted, truncated or from another config
                log.warning("checkpoint step %d in %s is unusable (%s: %s); trying the previous one",
                            step, self.directory, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _contains(seq: list, sub: list) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def key_data(key) -> list[int]:
    return np.asarray(jax.random.key_data(key)).tolist()


def key_from_data(data) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(data, np.uint32))
