"""Device mesh from a config: named axes (data, fsdp, tensor, expert), Auto axis types, `jax.set_mesh`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor", "expert")


class ShardingError(ValueError):
    """A mesh, batch or parameter that does not divide as the sharding requires."""


@dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1 for 'all remaining devices'."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def __post_init__(self):
        sizes = [getattr(self, a) for a in AXES]
        for a, s in zip(AXES, sizes):
            if not isinstance(s, int) or (s < 1 and s != -1):
                raise ShardingError(f"mesh.{a}: must be a positive int or -1, got {s!r}")
        if sizes.count(-1) > 1:
            raise ShardingError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")

    def resolve(self, n_devices: int) -> dict[str, int]:
        sizes = {a: getattr(self, a) for a in AXES}
        known = math.prod(s for s in sizes.values() if s != -1)
        for a, s in sizes.items():
            if s == -1:
                if n_devices % known:
                    raise ShardingError(f"mesh: {n_devices} devices are not divisible by the fixed axes "
                                        f"({known} = {'x'.join(str(v) for v in sizes.values() if v != -1)})")
                sizes[a] = n_devices // known
        total = math.prod(sizes.values())
        if total != n_devices:
            raise ShardingError(f"mesh: data*fsdp*tensor*expert = "
                                f"{'*'.join(str(sizes[a]) for a in AXES)} = {total}, but there are {n_devices} devices")
        return sizes


def describe_devices(devices) -> str:
    """'8 devices (backend cpu, kind cpu, 1 process)': what a mesh error must name so that a CPU-only jax on a
    GPU node (`pip install -e .` without the `cuda` extra) is recognisable from the message alone."""
    kinds = sorted({getattr(d, "device_kind", "?") for d in devices}) or ["none"]
    platforms = sorted({getattr(d, "platform", "?") for d in devices}) or [jax.default_backend()]
    return (f"{len(devices)} devices (backend {'/'.join(platforms)}, device kind {'/'.join(kinds)}, "
            f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''})")


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A Mesh over all (or the given) devices with Auto axis types (GSPMD partitions what is not annotated).

    A mesh that needs more (or other) devices than there are raises ShardingError naming the mesh sizes, the
    device count, the backend and the device kind, e.g. 'mesh: ... = 64, but there are 8 devices (backend cpu,
    device kind cpu, 8 processes)' -- the signature of a CPU-only jax install on GPU nodes.
    """
    devices = list(jax.devices() if devices is None else devices)
    try:
        sizes = cfg.resolve(len(devices))
    except ShardingError as e:
        hint = ""
        if devices and all(getattr(d, "platform", "") == "cpu" for d in devices) and jax.process_count() > 1:
            hint = "; on GPU nodes install the CUDA build: pip install -e '.[cuda]'"
        msg = str(e).replace(f"{len(devices)} devices", describe_devices(devices), 1)
        if msg == str(e):
            msg += f" [{describe_devices(devices)}]"
        raise ShardingError(msg + hint) from None
    shape = tuple(sizes[a] for a in AXES)
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # CPU / odd topologies: plain order
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))
