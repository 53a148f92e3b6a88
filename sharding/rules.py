"""One table from logical axis names (used by the model and the data) to mesh axes (MaxText style).

The default table serves every parallelism; the mesh sizes choose it. With only `data` > 1 it is pure data
parallel; `fsdp` shards parameters and optimizer state along `embed`; `tensor` shards heads, MLP and vocab;
`expert` shards routed experts (and, like data, the batch). Pass another table to change the layout: no
model code changes.
"""

from __future__ import annotations

import contextlib
import math
import threading

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.mesh import ShardingError

DEFAULT_RULES: dict[str, tuple[str, ...] | str | None] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    # parameters
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",
    "q_lora": None,
    "kv_lora": None,
    "norm": None,
    # the leading axis of scanned layer stacks (ModelConfig.scan_layers): never sharded, since lax.scan slices
    # one layer per iteration and a sharded layer axis would gather every layer onto every device
    "layers": None,
}

# Named alternatives, for comparison runs (each is a full table).
PURE_DATA_PARALLEL = {k: None for k in DEFAULT_RULES} | {"batch": ("data", "fsdp", "expert")}


def spec_for(axes: tuple[str, ...] | None, rules: dict, mesh: Mesh, shape=None, name: str = "") -> P:
    """PartitionSpec for logical `axes`; checks that each sharded dim divides its mesh axes."""
    if axes is None:
        return P()
    out, used = [], set()
    for i, logical in enumerate(axes):
        if logical not in rules:
            raise ShardingError(f"{name}: logical axis {logical!r} has no rule (known: {sorted(rules)})")
        mesh_axes = rules[logical]
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        used.update(mesh_axes)
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if shape is not None and size > 1 and shape[i] % size:
            raise ShardingError(f"{name}: dimension {i} ({logical}) has size {shape[i]}, not divisible by mesh axes "
                                f"{'x'.join(mesh_axes)} = {size}")
        out.append(mesh_axes if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return P(*out)


def param_shardings(params, mesh: Mesh, rules: dict = DEFAULT_RULES):
    """NamedShardings for a parameter (or abstract parameter) nnx.State, from each leaf's `axes` metadata.

    Returns a pytree of the same structure as `params` (Variables holding shardings).
    """
    def one(path, var):
        value = var.get_value()
        name = ".".join(map(str, path))
        axes = var.get_metadata().get("axes")
        return var.replace(NamedSharding(mesh, spec_for(axes, rules, mesh, value.shape, name)))

    flat = [(p, one(p, v)) for p, v in nnx.to_flat_state(params)]
    return nnx.from_flat_state(flat)


def batch_sharding(mesh: Mesh, rules: dict = DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] array: batch over the data-like axes, the rest replicated."""
    return NamedSharding(mesh, spec_for(("batch",) + ("seq",) * (ndim - 1), rules, mesh))


def check_batch(batch_size: int, mesh: Mesh, rules: dict = DEFAULT_RULES) -> None:
    spec = spec_for(("batch",), rules, mesh)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    n = math.prod(mesh.shape[a] for a in axes)
    if batch_size % n:
        raise ShardingError(f"batch size {batch_size} is not divisible by the data-parallel size "
                            f"{'x'.join(axes)} = {n}")


_ctx = threading.local()


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: dict = DEFAULT_RULES):
    """Activate `rules` on `mesh` for `constrain` calls inside the model (and enter jax.set_mesh)."""
    prev = getattr(_ctx, "active", None)
    _ctx.active = (mesh, rules)
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _ctx.active = prev


def active_rules():
    """(mesh, rules) set by the innermost `use_rules`, or None (the model then runs without mesh collectives)."""
    return getattr(_ctx, "active", None)


def mesh_axes_of(logical: str, rules: dict, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that a logical axis maps to under `rules`, e.g. 'batch' -> ('data', 'expert')."""
    entry = spec_for((logical,), rules, mesh)[0]
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def constrain(x, axes: tuple[str, ...]):
    """Sharding constraint by logical axes; a no-op when no rules are active (single device, no mesh)."""
    active = getattr(_ctx, "active", None)
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(axes, rules, mesh)))
