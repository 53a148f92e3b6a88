"""The GRPO family: advantages, objectives and aggregation against hand-computed numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl.rollout import Sampling
from rl.grpo import (ADVANTAGES, AGGREGATIONS, GRPOConfig, k3_kl, policy_objective, seq_mean_token_mean,
                     seq_mean_token_sum_norm, token_mean)


def test_advantages_by_hand():
    r = jnp.array([[1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    grpo = np.asarray(ADVANTAGES["grpo"](r, 1e-6))
    # mean 0.75, Bessel std 0.5 -> [0.5, 0.5, 0.5, -1.5]; an all-equal group -> 0
    np.testing.assert_allclose(grpo[0], [0.5, 0.5, 0.5, -1.5], atol=1e-5)
    np.testing.assert_allclose(grpo[1], 0.0, atol=0)
    np.testing.assert_allclose(np.asarray(ADVANTAGES["dr_grpo"](r, 0))[0], [0.25, 0.25, 0.25, -0.75], atol=1e-7)
    # RLOO: r_i - mean of the others: 1 - 2/3, 0 - 1
    np.testing.assert_allclose(np.asarray(ADVANTAGES["rloo"](r, 0))[0], [1 / 3, 1 / 3, 1 / 3, -1.0], atol=1e-6)


LOSS = jnp.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
MASK = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def test_aggregations_by_hand():
    assert float(seq_mean_token_mean(LOSS, MASK)) == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1) / 2)  # 3.0
    assert float(token_mean(LOSS, MASK)) == pytest.approx((1 + 2 + 3 + 4) / 4)  # 2.5
    assert float(seq_mean_token_sum_norm(LOSS, MASK)) == pytest.approx(10 / (2 * 4))  # Dr.GRPO: B * L_max
    assert set(AGGREGATIONS) == {"seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"}


def test_clipped_surrogate_by_hand():
    cfg = GRPOConfig(epsilon_low=0.2, epsilon_high=0.28)
    logp = jnp.log(jnp.array([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0 against old = 0
    old = jnp.zeros((1, 3))
    mask = jnp.ones((1, 3))
    loss, m = policy_objective(cfg, logp, old, None, jnp.array([1.0]), mask)
    # A > 0: min(r, clip(r, 0.8, 1.28)) = [1.28, 0.5, 1.0]
    assert float(loss) == pytest.approx(-(1.28 + 0.5 + 1.0) / 3, abs=1e-6)
    assert float(m["clip_frac_high"]) == pytest.approx(1 / 3) and float(m["clip_frac_low"]) == 0.0
    loss, m = policy_objective(cfg, logp, old, None, jnp.array([-1.0]), mask)
    # A < 0: -min(-r, -clip(r)) = max(r, clip(r)) = [1.5, 0.8, 1.0]
    assert float(loss) == pytest.approx((1.5 + 0.8 + 1.0) / 3, abs=1e-6)
    assert float(m["clip_frac_low"]) == pytest.approx(1 / 3) and float(m["clip_frac_high"]) == 0.0


def test_gspo_uses_one_length_normalised_ratio():
    cfg = GRPOConfig(policy_loss="gspo", epsilon_low=3e-4, epsilon_high=4e-4)
    logp = jnp.array([[-1.0, -2.0, -3.0]])
    old = jnp.array([[-1.1, -2.2, -3.0]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    loss, m = policy_objective(cfg, logp, old, None, jnp.array([1.0]), mask)
    s = np.exp(((0.1 + 0.2) / 2))  # exp(mean log-ratio over the 2 real tokens)
    assert float(m["ratio_mean"]) == pytest.approx(s, rel=1e-6)
    assert float(loss) == pytest.approx(-(1 + 4e-4), rel=1e-6)  # clipped above at 1 + ε_high


def test_k3_kl():
    assert float(k3_kl(jnp.array(-1.0), jnp.array(-1.0))) == 0.0
    d = 0.3
    assert float(k3_kl(jnp.array(-1.0), jnp.array(-1.0 + d))) == pytest.approx(np.exp(d) - d - 1, rel=1e-6)


def test_equal_rewards_give_zero_gradient():
    cfg = GRPOConfig()
    adv = ADVANTAGES["grpo"](jnp.array([[3.0, 3.0, 3.0, 3.0]]), 1e-6).reshape(-1)
    mask = jnp.ones((4, 5))
    old = jax.random.normal(jax.random.key(0), (4, 5)) - 2.0

    def f(logp):
        return policy_objective(cfg, logp, old, None, adv, mask)[0]

    g = jax.grad(f)(old + 0.1 * jax.random.normal(jax.random.key(1), (4, 5)))
    assert float(jnp.max(jnp.abs(g))) == 0.0


def test_config_validation_names_fields():
    with pytest.raises(ValueError, match="grpo.advantage"):
        GRPOConfig(advantage="ppo")
    with pytest.raises(ValueError, match="grpo.mini_batches"):
        GRPOConfig(num_generations=4, prompts_per_step=3, mini_batches=5)
    with pytest.raises(ValueError, match="grpo.num_generations"):
        GRPOConfig(num_generations=1)


def test_log_kl_reports_kl_without_changing_the_loss():
    rng = np.random.default_rng(0)
    logp, ref = (jnp.asarray(rng.normal(-1.0, 0.3, (4, 6)), jnp.float32) for _ in range(2))
    adv, mask = jnp.asarray([1.0, -1.0, 0.5, 0.0]), jnp.ones((4, 6))
    plain, logged = GRPOConfig(), GRPOConfig(log_kl=True)
    grad = lambda cfg, r: jax.grad(lambda lp: policy_objective(cfg, lp, lp, r, adv, mask)[0])(logp)
    np.testing.assert_array_equal(grad(plain, None), grad(logged, ref))
    _, m = policy_objective(logged, logp, logp, ref, adv, mask)
    np.testing.assert_allclose(m["kl"], jnp.mean(k3_kl(logp, ref)), rtol=1e-6)
    penalised = GRPOConfig(beta=0.1)
    assert not np.allclose(grad(penalised, ref), grad(plain, None))


def test_gspo_needs_sequence_aggregation_and_ratios_are_bounded():
    with pytest.raises(ValueError, match="grpo.loss_agg"):
        GRPOConfig(policy_loss="gspo", loss_agg="token_mean")
    with pytest.raises(ValueError, match="sampling.temperature"):
        GRPOConfig(sampling=Sampling(temperature=0.0))
    # a log-ratio far past exp's range: a finite loss and gradient (clamped at ±20), not inf / NaN
    logp = jnp.asarray([[0.0, -200.0], [-1.0, -1.0]])
    old = jnp.asarray([[-200.0, 0.0], [-1.0, -1.0]])
    adv, mask = jnp.asarray([-1.0, 1.0]), jnp.ones((2, 2))
    for cfg in (GRPOConfig(), GRPOConfig(policy_loss="gspo")):
        loss, grad = jax.value_and_grad(lambda lp: policy_objective(cfg, lp, old, None, adv, mask)[0])(logp)
        assert np.isfinite(loss) and np.all(np.isfinite(grad)), cfg.policy_loss
