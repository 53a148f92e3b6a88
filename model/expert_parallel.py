"""Expert parallelism: routed experts split over the `expert` mesh axis, tokens moved by all-to-all.

Inside one `jax.shard_map` over the whole mesh, each device holds its batch shard (the `batch` rule puts the
batch on data·fsdp·expert) and E/ep experts (the `expert` rule). Per device, with n local tokens:

1. route its own tokens (router kernel and bias gathered: [d, E] + [E], small);
2. sort its n·k pairs by expert into a send buffer [ep, E/ep, C, d] (`dispatch.capacity_layout`, the expert id
   e = device·E/ep + local expert), C = ceil(capacity_factor·n·k/E) per-device capacity;
3. `all_to_all` over `expert`: device j receives [ep sources, E/ep, C, d], the tokens routed to its experts;
4. run its experts as batched matmuls on [E/ep, ep·C, d]; `all_to_all` back; combine with the gate weights.

Only the routed tokens cross devices: no all-gather of the global token set, no all-reduce of the output
(tests/test_moe.py checks the compiled HLO). Expert loads and the balance loss are psum'd over the batch axes,
so they are the global values the dense path reports (the aux-loss-free bias update sees the same loads).

'dropless' under expert parallelism uses the same buffers with C = n (a device's tokens can all pick one expert;
static shapes need the worst case): exact, but its expert FLOPs and all-to-all volume are those of 'dense'.
Exact dropless at sparse cost needs ragged all-to-all and grouped kernels (`lax.ragged_all_to_all` is
UNIMPLEMENTED on CPU in jax 0.10.2): not built. At scale use impl='capacity' (MaxText's GPU configs do).
Expert weights sharded along `embed`/`mlp` (fsdp, tensor) are gathered on entry, like FSDP gathers any weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from model import dispatch


@dataclass(frozen=True)
class EPPlan:
    mesh: Mesh
    batch_axes: tuple[str, ...]
    axis: str  # the mesh axis the routed experts are split over
    size: int


def active_plan(moe, batch: int) -> EPPlan | None:
    """The expert-parallel layout for this call, or None (one device, impl 'dense', experts not split, or a
    batch that does not divide over the batch axes, e.g. a decode batch of 1: then GSPMD runs `MoE.routed`)."""
    from sharding.rules import active_rules, mesh_axes_of

    active = active_rules()
    if active is None or moe.impl == "dense":
        return None
    mesh, rules = active
    ep_axes = mesh_axes_of("expert", rules, mesh)
    if not ep_axes:
        return None
    batch_axes = mesh_axes_of("batch", rules, mesh)
    if len(ep_axes) != 1 or ep_axes[0] not in batch_axes:
        return None  # tokens are not split over the expert axis: nothing to exchange
    axis = ep_axes[0]
    moe.check_expert_axis(mesh.shape[axis])
    if batch % math.prod(mesh.shape[a] for a in batch_axes):
        return None
    return EPPlan(mesh, batch_axes, axis, mesh.shape[axis])


def moe_forward(module, x, plan: EPPlan, routing=None):
    """Routed experts of `module` (a model.moe.MoE) over all-to-all. x [b, t, d] (routing [b, t, k] to replay)
    -> (y [b, t, d], stats)."""
    from model.moe import route_tokens

    moe = module.cfg.moe
    b, t, d = x.shape
    e, ep = moe.n_routed_experts, plan.size
    gate, up, down = module.expert_weights(x.dtype)
    axes = plan.batch_axes

    def local(xl, kernel, bias, gate, up, down, replay):
        bl = xl.shape[0]
        n = bl * t
        flat = xl.reshape(n, d)
        w, idx, stats = route_tokens(flat, kernel, bias, moe, bl, None if replay is None else replay.reshape(n, -1))
        cap = moe.capacity(n) if moe.impl == "capacity" else n
        slot_token, pair_slot, dropped = dispatch.capacity_layout(idx, e, cap)
        send = dispatch.gather_rows(flat, slot_token).reshape(ep, e // ep, cap, d)
        recv = jax.lax.all_to_all(send, plan.axis, 0, 0)  # [source device, local expert, C, d]
        xe = jnp.swapaxes(recv, 0, 1).reshape(e // ep, ep * cap, d)
        out = dispatch.expert_ffn(xe, gate, up, down).reshape(e // ep, ep, cap, d)
        back = jax.lax.all_to_all(jnp.swapaxes(out, 0, 1), plan.axis, 0, 0)  # [owner device, local expert, C, d]
        y = dispatch.combine(back.reshape(e * cap, d), pair_slot, w)
        load = jax.lax.psum(stats["load"], axes)
        bal = jax.lax.psum(stats["balance_loss"] * bl, axes) / b
        return (y.reshape(bl, t, d), load, bal, jax.lax.psum(dropped.astype(jnp.float32), axes),
                stats["own"].reshape(bl, t, -1))

    wspec = P(plan.axis)
    y, load, bal, dropped, idx = jax.shard_map(
        local, mesh=plan.mesh, in_specs=(P(axes), P(), P(), wspec, wspec, wspec, P(axes)),
        out_specs=(P(axes), P(), P(), P(), P(axes)))(x, module.gate.kernel[...], module.gate.bias[...], gate, up,
                                                     down, routing)
    return y, {"load": load, "balance_loss": bal, "dropped": dropped, "routing": idx}
