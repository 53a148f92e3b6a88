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


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A Mesh over all (or the given) devices with Auto axis types (GSPMD partitions what is not annotated)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.resolve(len(devices))
    shape = tuple(sizes[a] for a in AXES)
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # CPU / odd topologies: plain order
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))
