"""Language-model losses, each reported separately.

Batches are dicts: 'inputs' int32 [batch, seq], 'targets' int32 [batch, seq], 'loss_mask' float32 [batch, seq]
(0 on prompt and padding tokens in SFT), optional 'positions' and 'segment_ids' int32 [batch, seq] (packing).
Token losses are sums divided by a `denominator` given by the caller (the token count of the whole batch),
so gradient accumulation over micro-batches adds up to exactly the big-batch loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model import forward
from model.config import ModelConfig
from train.config import LossConfig


def token_nll(logits, targets):
    """logits [..., vocab] float32, targets [...] -> (nll [...], logsumexp [...])."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked, lse


def shifted(x, k, fill=0):
    """x[:, i + k] at position i (fill past the end). x [batch, seq]."""
    pad = jnp.full((x.shape[0], k), fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)


def mtp_targets(batch, k):
    """Depth-k MTP at position i predicts targets[i + k]; valid only inside the same document."""
    tgt = shifted(batch["targets"], k)
    mask = shifted(batch["loss_mask"], k, 0.0)
    if "segment_ids" in batch:
        seg = batch["segment_ids"]
        mask = mask * (shifted(seg, k, -1) == seg)
    return tgt, mask


def lm_loss(cfg: ModelConfig, lcfg: LossConfig, params, batch, denominator, n_micro: int = 1):
    """-> (total loss, parts dict, MoE stats or None). All parts are already weighted.

    MoE stats: {'expert_load' [n_moe, E], 'moe_dropped' [n_moe]} (pair counts; train.step turns them into
    fractions).

    Per-batch means (the balance loss) are divided by `n_micro` so micro-batch sums equal the big batch.
    """
    logits, _, aux = forward(cfg, params, batch["inputs"], batch.get("positions"),
                             segment_ids=batch.get("segment_ids"))
    mask = batch["loss_mask"].astype(jnp.float32)
    nll, lse = token_nll(logits, batch["targets"])
    parts = {"ce": jnp.sum(nll * mask) / denominator}
    if lcfg.z_loss:
        parts["z_loss"] = lcfg.z_loss * jnp.sum(jnp.square(lse) * mask) / denominator
    if "mtp_logits" in aux:
        mtp = 0.0
        for k in range(1, cfg.mtp_depth + 1):
            tgt, m = mtp_targets(batch, k)
            nll_k, _ = token_nll(aux["mtp_logits"][k - 1], tgt)
            mtp = mtp + jnp.sum(nll_k * m) / denominator
        parts["mtp"] = cfg.mtp_loss_weight * mtp / cfg.mtp_depth
    load = aux.get("expert_load")
    if load is not None and cfg.moe.balance_loss_weight:
        parts["balance"] = cfg.moe.balance_loss_weight * aux["balance_loss"] / n_micro
    total = sum(parts.values())
    if load is not None:
        load = {"expert_load": load, "moe_dropped": aux["moe_dropped"]}
    return total, parts, load
