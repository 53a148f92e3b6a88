"""Optimizer and training-step configuration (frozen, validated)."""

from __future__ import annotations

from dataclasses import dataclass


class TrainConfigError(ValueError):
    pass


def _check(ok, name, msg):
    if not ok:
        raise TrainConfigError(f"{name}: {msg}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup then cosine (or constant) decay, global-norm clipping, selective weight decay."""

    lr: float = 3e-3
    warmup_steps: int = 20
    schedule: str = "cosine"  # 'cosine' | 'constant'
    total_steps: int = 0  # cosine horizon; 0 = the run's length (set by the run loop)
    final_lr_frac: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping
    decay_norms: bool = False
    decay_biases: bool = False
    decay_embeddings: bool = False

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.schedule in ("cosine", "constant"), "optim.schedule",
               f"must be 'cosine' or 'constant', got {self.schedule!r}")
        _check(self.total_steps >= 0, "optim.total_steps", f"must be >= 0, got {self.total_steps}")
        _check(0 <= self.final_lr_frac <= 1, "optim.final_lr_frac", f"must be in [0, 1], got {self.final_lr_frac}")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1/b2", f"must be in [0, 1), got {self.b1}, {self.b2}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.clip_norm >= 0, "optim.clip_norm", f"must be >= 0, got {self.clip_norm}")


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss parts. MoE balance (α) and MTP (λ) weights live in the ModelConfig."""

    z_loss: float = 0.0
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many sequential parts

    def __post_init__(self):
        _check(self.z_loss >= 0, "loss.z_loss", f"must be >= 0, got {self.z_loss}")
        _check(isinstance(self.micro_batches, int) and self.micro_batches >= 1, "loss.micro_batches",
               f"must be an int >= 1, got {self.micro_batches!r}")
