"""The GRPO family as small registered functions (algorithms.md §1).

- advantages: 'grpo' (group mean/std, DeepSeekMath), 'dr_grpo' (mean only), 'rloo' (leave-one-out);
- policy losses: 'ppo_clip' (per-token ratio, clip-higher with ε_low/ε_high), 'gspo' (one length-normalised
  ratio per sequence, GSPO-token gradient), 'cispo' (MiniMax-M1: a clipped, stop-gradient importance weight times
  the advantage times log π, so clipped tokens keep their gradient), 'sapo' (soft adaptive policy optimisation: a
  sigmoid gate of the ratio, temperatures τ+ / τ− by the advantage's sign, instead of a hard clip);
- aggregation: 'seq_mean_token_mean' (GRPO), 'token_mean' (DAPO), 'seq_mean_token_sum_norm' (Dr.GRPO's
  constant normaliser L_max);
- KL to a reference policy with weight β (added per token, inside the aggregation): 'k3', or 'k3_unbiased'
  (DeepSeek-V3.2 §3.1: k3 weighted by the importance ratio π_θ/π_old, unbiased under off-policy samples);
- off-policy sequence masking (DeepSeek-V3.2 §3.1, `off_policy_mask_delta`): a sequence with negative advantage
  whose mean log(π_old/π_θ) exceeds δ is dropped from the loss.
A configuration picks one of each by name; adding a variant is one decorated function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from rl.rollout import Sampling

ADVANTAGES, POLICY_LOSSES, AGGREGATIONS, KL_ESTIMATORS = {}, {}, {}, {}


def _register(table, name):
    def deco(fn):
        table[name] = fn
        return fn
    return deco


@dataclass(frozen=True)
class GRPOConfig:
    """Fields follow TRL's GRPOConfig where they overlap."""

    num_generations: int = 8  # G: samples per prompt
    prompts_per_step: int = 16  # prompts (groups) per rollout batch
    # temperature (sampling and scoring), top_p, top_k, max_new_tokens, stop strings, think prefix, BOS: the one
    # Sampling that rollouts and held-out evaluation share (evaluation changes only temperature and top_p)
    sampling: Sampling = field(default_factory=Sampling)
    advantage: str = "grpo"  # 'grpo' | 'dr_grpo' | 'rloo'
    policy_loss: str = "ppo_clip"  # 'ppo_clip' | 'gspo' | 'cispo' | 'sapo'
    loss_agg: str = "seq_mean_token_mean"  # | 'token_mean' (DAPO) | 'seq_mean_token_sum_norm' (Dr.GRPO)
    epsilon_low: float = 0.2  # clip range below 1 (DAPO: 0.2)
    # clip range above 1 (DAPO clip-higher: 0.28; GSPO: 4e-4 with low 3e-4); cispo caps its weight at 1 + this
    # (TRL's cispo `epsilon_high` is that cap itself: 5.0 there is 4.0 here)
    epsilon_high: float = 0.2
    sapo_temperature_pos: float = 1.0  # SAPO's gate temperature τ for positive advantages (TRL's default)
    sapo_temperature_neg: float = 1.05  # ... and for negative ones
    beta: float = 0.0  # KL weight; 0 needs no reference model
    kl_estimator: str = "k3"  # 'k3' | 'k3_unbiased' (k3 × π_θ/π_old, DeepSeek-V3.2)
    off_policy_mask_delta: float | None = None  # V3.2's off-policy sequence mask δ; None = off
    # pipelined rollouts: the rollout for step k + N samples while step k trains (one-step off-policy for N = 1);
    # the loss then weighs each token by the truncated importance weight min(π_old / π_sampler, tis_cap)
    off_policy_steps: int = 0
    tis_cap: float | None = None  # truncated importance sampling cap C (verl / TRL: 2.0); needed when N > 0
    keep_routing: bool = False  # V3.2's Keep Routing: the trainer replays the experts the sampler chose (MoE)
    # V3.2's Keep Sampling Mask: the trainer's distribution is the sampler's top-k / top-p set, renormalised, for
    # ratios, KL and entropy (otherwise a token outside the set still carries probability in π_θ)
    keep_sampling_mask: bool = False
    ref_reset_every: int = 0  # reset the reference to the policy every K steps (R1: 400); 0 = never
    log_kl: bool = False  # with beta = 0, still keep the reference and report KL to it (one more scoring pass)
    num_iterations: int = 1  # μ: passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill
    max_resample_rounds: int = 4
    mask_truncated: bool = False  # DAPO overlong filtering: no loss on truncated samples
    overlong_cache: int = 0  # DAPO soft overlong penalty L_cache (0 = off); L_max = sampling.max_new_tokens
    std_eps: float = 1e-6

    def __post_init__(self):
        def check(ok, name, msg):
            if not ok:
                raise ValueError(f"grpo.{name}: {msg}")
        check(self.num_generations >= 2, "num_generations", f"needs >= 2 samples per group, got {self.num_generations}")
        check(self.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        check(self.advantage in ADVANTAGES, "advantage", f"unknown {self.advantage!r}; one of {sorted(ADVANTAGES)}")
        check(self.policy_loss in POLICY_LOSSES, "policy_loss",
              f"unknown {self.policy_loss!r}; one of {sorted(POLICY_LOSSES)}")
        check(self.loss_agg in AGGREGATIONS, "loss_agg", f"unknown {self.loss_agg!r}; one of {sorted(AGGREGATIONS)}")
        check(self.kl_estimator in KL_ESTIMATORS, "kl_estimator",
              f"unknown {self.kl_estimator!r}; one of {sorted(KL_ESTIMATORS)}")
        check(self.sapo_temperature_pos > 0 and self.sapo_temperature_neg > 0, "sapo_temperature_pos/neg",
              f"must be > 0, got {self.sapo_temperature_pos}, {self.sapo_temperature_neg}")
        check(self.off_policy_steps >= 0, "off_policy_steps", f"must be >= 0, got {self.off_policy_steps}")
        check(not self.off_policy_steps or self.tis_cap is not None, "tis_cap",
              f"off_policy_steps={self.off_policy_steps} samples with stale parameters: choose a correction "
              "(grpo.tis_cap=2.0, truncated importance sampling)")
        check(self.tis_cap is None or self.tis_cap >= 1.0, "tis_cap", f"must be >= 1, got {self.tis_cap}")
        check(not (self.off_policy_steps and self.dynamic_sampling), "dynamic_sampling",
              "refills groups synchronously from the current policy; it cannot run with off_policy_steps > 0")
        check(not (self.keep_sampling_mask and self.sampling.greedy), "keep_sampling_mask",
              "greedy sampling keeps one token: every renormalised log-prob would be 0")
        check(self.off_policy_mask_delta is None or self.off_policy_mask_delta >= 0, "off_policy_mask_delta",
              f"must be >= 0 (or None: off), got {self.off_policy_mask_delta}")
        check(self.policy_loss != "gspo" or self.loss_agg == "seq_mean_token_mean", "loss_agg",
              f"gspo's sequence ratio needs sequence aggregation (seq_mean_token_mean), got {self.loss_agg!r}")
        check(self.epsilon_low >= 0 and self.epsilon_high >= 0, "epsilon_low/high", "must be >= 0")
        check(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        check(self.num_iterations >= 1, "num_iterations", f"must be >= 1, got {self.num_iterations}")
        batch = self.num_generations * self.prompts_per_step
        check(self.mini_batches >= 1 and batch % self.mini_batches == 0, "mini_batches",
              f"{self.mini_batches} does not divide the rollout batch {batch}")
        n = self.sampling.max_new_tokens
        check(0 <= self.overlong_cache < n, "overlong_cache",
              f"must be in [0, sampling.max_new_tokens={n}), got {self.overlong_cache}")


# ---- advantages: rewards [groups, G] -> [groups, G] -----------------------------------------------------------

@_register(ADVANTAGES, "grpo")
def grpo_advantage(r, eps):
    std = jnp.std(r, axis=1, keepdims=True, ddof=1)
    return (r - r.mean(1, keepdims=True)) / (std + eps)


@_register(ADVANTAGES, "dr_grpo")
def dr_grpo_advantage(r, eps):
    return r - r.mean(1, keepdims=True)


@_register(ADVANTAGES, "rloo")
def rloo_advantage(r, eps):
    g = r.shape[1]
    return (r - r.mean(1, keepdims=True)) * g / (g - 1)


# ---- per-token policy objective: (cfg, logp, old_logp [B, T], adv [B], mask [B, T]) -> (loss [B, T], ratio) -----

MAX_LOG_RATIO = 20.0  # log π/π_old is clamped before exp (as verl and Tunix do): no inf, no 0·inf NaN gradient


def _log_ratio(logp, old_logp):
    return jnp.clip(logp - old_logp, -MAX_LOG_RATIO, MAX_LOG_RATIO)


def _clipped(ratio, adv, lo, hi):
    return -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - lo, 1 + hi) * adv)


@_register(POLICY_LOSSES, "ppo_clip")
def ppo_clip_loss(cfg, logp, old_logp, adv, mask):
    ratio = jnp.exp(_log_ratio(logp, old_logp))
    return _clipped(ratio, adv[:, None], cfg.epsilon_low, cfg.epsilon_high), ratio


@_register(POLICY_LOSSES, "gspo")
def gspo_loss(cfg, logp, old_logp, adv, mask):
    n = jnp.maximum(mask.sum(1), 1.0)
    seq_ratio = jnp.exp(jnp.sum(_log_ratio(logp, old_logp) * mask, axis=1) / n)  # s_i
    # GSPO-token: value s_i, gradient of s_i·log π per token
    ratio = jax.lax.stop_gradient(seq_ratio)[:, None] * jnp.exp(logp - jax.lax.stop_gradient(logp))
    return _clipped(ratio, adv[:, None], cfg.epsilon_low, cfg.epsilon_high), ratio


@_register(POLICY_LOSSES, "cispo")
def cispo_loss(cfg, logp, old_logp, adv, mask):
    # the weight is clipped, not the objective: a token past the cap still moves log π, with the capped weight
    ratio = jnp.exp(_log_ratio(logp, old_logp))
    weight = jax.lax.stop_gradient(jnp.minimum(ratio, 1.0 + cfg.epsilon_high))
    return -weight * adv[:, None] * logp, ratio


@_register(POLICY_LOSSES, "sapo")
def sapo_loss(cfg, logp, old_logp, adv, mask):
    # σ(τ(r − 1))·4/τ has value 1 and slope 1 at r = 1 (as the PPO ratio) and decays smoothly away from it
    ratio = jnp.exp(_log_ratio(logp, old_logp))
    tau = jnp.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)[:, None]
    return -jax.nn.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * adv[:, None], ratio


# ---- aggregation of per-token losses [B, T] with mask [B, T] -> scalar ------------------------------------------

@_register(AGGREGATIONS, "seq_mean_token_mean")
def seq_mean_token_mean(loss, mask):
    return jnp.mean(jnp.sum(loss * mask, 1) / jnp.maximum(mask.sum(1), 1.0))


@_register(AGGREGATIONS, "token_mean")
def token_mean(loss, mask):
    return jnp.sum(loss * mask) / jnp.maximum(mask.sum(), 1.0)


@_register(AGGREGATIONS, "seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(loss, mask):
    return jnp.sum(loss * mask) / (mask.shape[0] * mask.shape[1])


def k3_kl(logp, ref_logp):
    """Schulman's k3 estimator of KL(π || π_ref), per token, >= 0."""
    d = jnp.clip(ref_logp - logp, -20.0, 20.0)
    return jnp.exp(d) - d - 1.0


@_register(KL_ESTIMATORS, "k3")
def k3_estimator(logp, old_logp, ref_logp):
    return k3_kl(logp, ref_logp)


@_register(KL_ESTIMATORS, "k3_unbiased")
def k3_unbiased_estimator(logp, old_logp, ref_logp):
    # samples come from π_old: weighting by π_θ/π_old makes k3 an unbiased estimate of KL(π_θ || π_ref); the
    # weight is part of the estimate and carries gradient (as in V3.2's formula and TRL's use_bias_correction_kl)
    return jnp.exp(_log_ratio(logp, old_logp)) * k3_kl(logp, ref_logp)


def off_policy_mask(adv, logp, old_logp, mask, delta):
    """[B, 1]: 0 for a sequence with negative advantage whose mean log(π_old/π_θ) over its tokens exceeds δ."""
    drift = jnp.sum((old_logp - jax.lax.stop_gradient(logp)) * mask, 1) / jnp.maximum(mask.sum(1), 1.0)
    return ((adv >= 0) | (drift <= delta)).astype(jnp.float32)[:, None]


def policy_objective(cfg: GRPOConfig, logp, old_logp, ref_logp, adv, mask, behavior_logp=None):
    """The loss of one mini-batch and its diagnostics.

    logp, old_logp, ref_logp (or None), mask: [B, T]; adv: [B]; behavior_logp [B, T] (or None): the log-probs the
    samples were drawn with when they are older than π_old (pipelined rollouts). Returns (loss, metrics).
    """
    tok_loss, ratio = POLICY_LOSSES[cfg.policy_loss](cfg, logp, old_logp, adv, mask)
    metrics = {}
    if behavior_logp is not None:  # truncated importance sampling: π_old / π_behavior, capped, no gradient
        w = jax.lax.stop_gradient(jnp.exp(_log_ratio(old_logp, behavior_logp)))
        tok_loss = tok_loss * jnp.minimum(w, cfg.tis_cap)
        metrics["tis_weight_mean"] = token_mean(w, mask)
        metrics["tis_weight_dev_max"] = jnp.max(jnp.where(mask > 0, jnp.abs(w - 1.0), 0.0))
        metrics["tis_truncated_frac"] = token_mean((w > cfg.tis_cap).astype(jnp.float32), mask)
    if cfg.off_policy_mask_delta is not None:
        keep = off_policy_mask(adv, logp, old_logp, mask, cfg.off_policy_mask_delta)
        tok_loss = tok_loss * keep
        metrics["off_policy_masked_frac"] = 1.0 - jnp.mean(keep)
    if ref_logp is not None:
        kl = KL_ESTIMATORS[cfg.kl_estimator](logp, old_logp, ref_logp)
        if cfg.beta > 0:
            tok_loss = tok_loss + cfg.beta * kl
        metrics["kl"] = token_mean(jax.lax.stop_gradient(kl) if cfg.beta == 0 else kl, mask)
    loss = AGGREGATIONS[cfg.loss_agg](tok_loss, mask)
    a = adv[:, None]
    low = (ratio < 1 - cfg.epsilon_low) & (a < 0)
    high = (ratio > 1 + cfg.epsilon_high) & (a > 0)
    metrics["clip_frac_low"] = token_mean(low.astype(jnp.float32), mask)
    metrics["clip_frac_high"] = token_mean(high.astype(jnp.float32), mask)
    metrics["ratio_mean"] = token_mean(jax.lax.stop_gradient(ratio), mask)
    return loss, metrics
