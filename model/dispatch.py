"""Sparse dispatch of routed experts on one device: sort the n·k (token, expert) pairs by expert, run each expert
as a batched matmul over only its tokens, scatter the results back weighted by the gates.

Both layouts are static-shaped (jit needs that) and are built from one stable argsort of the expert ids:

- `capacity_layout`: an [E, C] slot table, C = ceil(capacity_factor·n·k/E). A pair whose rank among its expert's
  pairs (in token order, so earlier tokens win) is >= C is dropped: it contributes zero. The experts then run
  as `einsum('ecd,edf->ecf')` on the [E, C, d] buffer: 6·E·C·d·f FLOPs = capacity_factor × the 6·n·k·d·f needed.
- `block_layout` (dropless, MegaBlocks' block-sparse idea on dense hardware): each expert's pairs are padded to a
  multiple of `block` rows; R = n·k + E·(block−1) rows (rounded to a block) bound every routing, so nothing drops
  and the cost is ~n·k rows. Each block belongs to one expert; the blocks run as one batched matmul over
  [R/block, block, d] with per-block weights gathered from [E, d, f].

What runs where (jax 0.10.2): this block-padded path runs on every backend. `jax.lax.ragged_dot` would be the
natural grouped matmul, but on CPU it lowers to a dense masked expansion over all experts (measured: ~5 GFLOP/s
vs ~130 for batched matmuls; docs/benchmarks.md), and on GPU it reaches cuDNN only for some shapes; it is used
(`grouped_ffn`) only on TPU, where it is a native grouped kernel. Not measured on GPU/TPU here (no device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def sorted_pairs(idx, n_experts: int):
    """Stable sort of the (token, choice) pairs by expert.

    idx int [n, k] -> (order [n·k]: pair ids (token·k + choice) in expert order, ties in token order;
    sorted_e [n·k]: their experts; counts int32 [E]: pairs per expert (the expert load);
    starts [E]: first sorted position of each expert; rank [n·k]: position of sorted pair i within its expert).
    """
    flat = idx.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    sorted_e = flat[order]
    counts = jnp.zeros((n_experts,), jnp.int32).at[flat].add(1)
    starts = jnp.cumsum(counts) - counts
    rank = jnp.arange(flat.shape[0], dtype=jnp.int32) - starts[sorted_e]
    return order, sorted_e, counts, starts, rank


def capacity_layout(idx, n_experts: int, capacity: int):
    """Slots of an [E, C] expert buffer.

    idx int [n, k] -> (slot_token int32 [E, C]: the token in each slot, n for an empty slot;
    pair_slot int32 [n, k]: each pair's flat slot e·C + c, or E·C when the pair is dropped;
    dropped int32 []: pairs past their expert's capacity).
    """
    n, k = idx.shape
    order, sorted_e, counts, starts, rank = sorted_pairs(idx, n_experts)
    keep = rank < capacity
    slot = jnp.where(keep, sorted_e * capacity + rank, n_experts * capacity)
    # the inverse permutation as a scatter of int32s: cheap next to the [.., d] data movement
    pair_slot = jnp.zeros((n * k,), jnp.int32).at[order].set(slot).reshape(n, k)
    c = jnp.arange(capacity, dtype=jnp.int32)
    pos = jnp.minimum(starts[:, None] + c[None, :], n * k - 1)
    slot_token = jnp.where(c[None, :] < counts[:, None], order[pos] // k, n)  # gather: no scatter of rows
    dropped = jnp.sum(jnp.maximum(counts - capacity, 0))
    return slot_token.astype(jnp.int32), pair_slot, dropped


def block_rows(n_pairs: int, n_experts: int, block: int) -> int:
    """Static row count that holds any routing of `n_pairs` pairs with each expert padded to `block` rows."""
    bound = n_pairs + n_experts * (block - 1)
    return -(-bound // block) * block


def block_size(n_pairs: int, n_experts: int) -> int:
    """Rows per block: a power of two near a quarter of the mean pairs per expert, in [8, 128].

    Padding costs up to E·(block−1) rows (<= ~25 % of n·k at this choice); small blocks make many small matmuls
    and gather more weight copies (R/block of them). Measured on CPU: bench/moe.py.
    """
    target = max(1, n_pairs // (4 * n_experts))
    b = 8
    while b * 2 <= min(target, 128):
        b *= 2
    return b


def block_layout(idx, n_experts: int, block: int):
    """Expert-sorted, block-padded rows.

    idx int [n, k] -> (row_token int32 [R]: the token of each row, n for padding; pair_row int32 [n, k]: each
    pair's row; block_expert int32 [R/block]: the expert of each block), R = block_rows(n·k, E, block).
    """
    n, k = idx.shape
    rows = block_rows(n * k, n_experts, block)
    order, sorted_e, counts, _, rank = sorted_pairs(idx, n_experts)
    padded = (counts + block - 1) // block * block
    ends = jnp.cumsum(padded)
    row = (ends - padded)[sorted_e] + rank
    pair_row = jnp.zeros((n * k,), jnp.int32).at[order].set(row).reshape(n, k)
    row_token = jnp.full((rows,), n, jnp.int32).at[row].set((order // k).astype(jnp.int32))
    starts = jnp.arange(rows // block, dtype=jnp.int32) * block
    block_expert = jnp.minimum(jnp.searchsorted(ends, starts, side="right"), n_experts - 1)
    return row_token, pair_row, block_expert.astype(jnp.int32)


def gather_rows(x, row_token):
    """x [n, d], row_token int [...] (n = empty) -> [..., d], zero rows where empty."""
    pad = jnp.concatenate([x, jnp.zeros((1, x.shape[-1]), x.dtype)])
    return pad[row_token]


def combine(out_rows, pair_row, weights):
    """out_rows [R, d], pair_row int [n, k] (R = dropped), weights [n, k] -> [n, d] = Σ_k w·out[row]."""
    pad = jnp.concatenate([out_rows, jnp.zeros((1, out_rows.shape[-1]), out_rows.dtype)])
    return jnp.einsum("nk,nkd->nd", weights.astype(out_rows.dtype), pad[pair_row])


# names of the expert FFN's gate and up outputs [G, B, f]: what the backward keeps of it (`dropless_moe`, and
# model.transformer's remat='dots' policy); the product and silu are recomputed from them
EXPERT_SAVED = ("expert_gate", "expert_up")


def expert_ffn(xb, gate, up, down):
    """SwiGLU per group: xb [G, B, d], gate/up [G, d, f], down [G, f, d] -> [G, B, d] (batched matmuls)."""
    g = checkpoint_name(jnp.einsum("gbd,gdf->gbf", xb, gate), EXPERT_SAVED[0])
    u = checkpoint_name(jnp.einsum("gbd,gdf->gbf", xb, up), EXPERT_SAVED[1])
    return jnp.einsum("gbf,gfd->gbd", jax.nn.silu(g) * u, down)


def _block_ffn(xb, block_expert, gate, up, down):
    return expert_ffn(xb, gate[block_expert], up[block_expert], down[block_expert])


# the per-block weight copies [R/block, d, f] are gathered again in the backward instead of being kept from the
# forward: kept, they were the largest residual of a training step (3 x 4 GiB per layer for 16k tokens of
# bench/gpu.py's MoE, ~15x the block's activations)
_block_ffn_remat = jax.checkpoint(_block_ffn, policy=jax.checkpoint_policies.save_only_these_names(*EXPERT_SAVED))


def capacity_moe(x, weights, idx, gate, up, down, capacity: int):
    """x [n, d], weights/idx [n, k], expert weights [E, ...] -> (y [n, d], dropped pairs int32 [])."""
    e = gate.shape[0]
    slot_token, pair_slot, dropped = capacity_layout(idx, e, capacity)
    out = expert_ffn(gather_rows(x, slot_token), gate, up, down)
    return combine(out.reshape(e * capacity, -1), pair_slot, weights), dropped


def dropless_moe(x, weights, idx, gate, up, down, block: int | None = None):
    """Exact for any routing: x [n, d], weights/idx [n, k], expert weights [E, ...] -> y [n, d]."""
    n, k = idx.shape
    e, d, _ = gate.shape
    if jax.default_backend() == "tpu":
        return _ragged_moe(x, weights, idx, gate, up, down)
    block = block or block_size(n * k, e)
    row_token, pair_row, block_expert = block_layout(idx, e, block)
    xb = gather_rows(x, row_token).reshape(-1, block, d)
    out = _block_ffn_remat(xb, block_expert, gate, up, down)
    return combine(out.reshape(-1, d), pair_row, weights)


def _ragged_moe(x, weights, idx, gate, up, down):
    """TPU: `lax.ragged_dot` over the expert-sorted n·k rows (a native grouped matmul there)."""
    n, k = idx.shape
    order, _, counts, _, _ = sorted_pairs(idx, gate.shape[0])
    xs = x[order // k]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, counts)) * jax.lax.ragged_dot(xs, up, counts)
    out = jax.lax.ragged_dot(h, down, counts)
    pair_row = jnp.zeros((n * k,), jnp.int32).at[order].set(jnp.arange(n * k, dtype=jnp.int32)).reshape(n, k)
    return combine(out, pair_row, weights)
