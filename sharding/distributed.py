"""Multi-host start-up and per-process data.

`initialize()` wraps `jax.distributed.initialize`: explicit coordinator address / process count / id, or
(with no arguments) the environment — SLURM is detected by jax itself; `R1JAX_COORDINATOR`,
`R1JAX_NUM_PROCESSES`, `R1JAX_PROCESS_ID` work on a plain host list. On CPU the collectives go through gloo.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_count: int | None = None) -> None:
    """Join a multi-process JAX job. A single process with nothing configured is a no-op, and so is a second call
    in a process that has already joined (`jax.distributed.initialize` itself raises on a second call)."""
    if jax.distributed.is_initialized():
        return
    coordinator_address = coordinator_address or os.environ.get("R1JAX_COORDINATOR")
    if num_processes is None and "R1JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["R1JAX_NUM_PROCESSES"])
    if process_id is None and "R1JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["R1JAX_PROCESS_ID"])
    in_slurm = "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if coordinator_address is None and not in_slurm:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects the CPU client
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def process_slice(global_batch: int) -> slice:
    """The rows of a global batch that this process loads."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} is not divisible by {n} processes")
    per = global_batch // n
    return slice(i * per, (i + 1) * per)


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """Assemble process-local rows [local_batch, ...] into global arrays sharded by `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def to_host(tree):
    """The full value of every array in `tree` as numpy on every process: `device_get` on one process, an
    all-gather of the shards when an array spans processes (a rollout batch sharded over hosts)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(one, tree)


def from_host(x, sharding: NamedSharding):
    """A numpy array that every process holds whole (a rollout batch after `to_host`) as a global array placed by
    `sharding`; unchanged on one process, where jit places numpy inputs itself."""
    if jax.process_count() == 1:
        return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def all_gather_json(obj) -> list:
    """Every process's `obj` (JSON-serialisable), in process order, on every process: a collective, so every
    process must call it. Used for the data iterators' states, which differ per process, at a checkpoint."""
    if jax.process_count() == 1:
        return [obj]
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(every[i, :int(n)].tobytes()) for i, n in enumerate(sizes)]
