"""AdamW with warmup + cosine/constant schedule, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import optax
from flax import nnx

from train.config import OptimConfig


def schedule(cfg: OptimConfig):
    warm = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        rest = optax.constant_schedule(cfg.lr)
    elif cfg.total_steps == 0:
        raise ValueError("optim.total_steps: the cosine schedule needs a horizon (the run loop sets it to `steps`)")
    else:
        rest = optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps - cfg.warmup_steps, 1), alpha=cfg.final_lr_frac)
    return optax.join_schedules([warm, rest], [cfg.warmup_steps])


def decay_mask(cfg: OptimConfig, params: nnx.State) -> nnx.State:
    """True where weight decay applies: matrices, and norms/biases/embeddings only if configured."""
    def decays(path, var):
        name = str(path[-1])
        if name == "scale":
            ok = cfg.decay_norms
        elif "bias" in name:
            ok = cfg.decay_biases
        elif path[0] == "embed_tokens":
            ok = cfg.decay_embeddings
        else:
            ok = True
        return var.replace(ok)

    return nnx.from_flat_state([(p, decays(p, v)) for p, v in nnx.to_flat_state(params)])


def make_optimizer(cfg: OptimConfig, trainable: nnx.State) -> optax.GradientTransformation:
    mask = decay_mask(cfg, trainable)
    adamw = optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    if cfg.clip_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
