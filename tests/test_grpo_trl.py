"""The policy losses against TRL's GRPOTrainer._compute_loss on identical inputs: values and gradients.

TRL's own loss code runs (trl.trainer.grpo_trainer, the pinned test extra); only the model call and the
distributed helpers around it are stood in for, returning the same per-token log-probs that our loss receives.
"""

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl.grpo import GRPOConfig, policy_objective

torch = pytest.importorskip("torch")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")

B, T = 6, 7


def _inputs(seed=0, drift=0.3):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 0.95, (B, T)))
    old = logp + rng.normal(0, drift, (B, T))  # ratios spread over the clip ranges and the cap
    ref = logp + rng.normal(0, 0.2, (B, T))
    adv = rng.normal(0, 1, B)
    mask = (np.arange(T)[None, :] < rng.integers(2, T + 1, B)[:, None]).astype(np.float64)
    return logp, old, ref, adv, mask


class _Accelerator:
    num_processes = 1

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather


def trl_loss(loss_type, logp, old, ref, adv, mask, *, eps_low, eps_high, beta=0.0, unbiased_kl=False, delta=None,
             sapo=(1.0, 1.05)):
    """(loss, d loss / d logp) from TRL's _compute_loss, in float64."""
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=delta,
        get_off_policy_mask=grpo_trainer.GRPOTrainer.get_off_policy_mask, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=False),
        current_gradient_accumulation_steps=1, max_completion_length=T, _entropy_bonus_enabled=False,
        accelerator=_Accelerator(), _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=unbiased_kl, delta=None, sapo_temperature_pos=sapo[0],
                             sapo_temperature_neg=sapo[1]))
    m = torch.tensor(mask, dtype=torch.float64)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": m,
              "advantages": torch.tensor(adv, dtype=torch.float64),
              "old_per_token_logps": torch.tensor(old, dtype=torch.float64),
              "ref_per_token_logps": torch.tensor(ref, dtype=torch.float64), "num_items_in_batch": m.sum()}
    loss = grpo_trainer.GRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    return float(loss.detach()), lp.grad.numpy()


def ours(cfg, logp, old, ref, adv, mask):
    with jax.enable_x64(True):
        f = lambda lp: policy_objective(cfg, lp, jnp.asarray(old), jnp.asarray(ref) if cfg.beta else None,  # noqa
                                        jnp.asarray(adv), jnp.asarray(mask))[0]
        loss, grad = jax.value_and_grad(f)(jnp.asarray(logp))
        return float(loss), np.asarray(grad)


CASES = {  # name: (TRL loss_type and kwargs, our GRPOConfig fields)
    "grpo": (("grpo", dict(eps_low=0.2, eps_high=0.28)),
             dict(policy_loss="ppo_clip", loss_agg="seq_mean_token_mean", epsilon_low=0.2, epsilon_high=0.28)),
    "dapo": (("dapo", dict(eps_low=0.2, eps_high=0.28)),
             dict(policy_loss="ppo_clip", loss_agg="token_mean", epsilon_low=0.2, epsilon_high=0.28)),
    "cispo": (("cispo", dict(eps_low=0.2, eps_high=1.2)),  # TRL's cispo epsilon_high is the cap 1 + ours
              dict(policy_loss="cispo", loss_agg="token_mean", epsilon_high=0.2)),
    # TRL builds the temperatures with torch.where over Python floats, i.e. in float32: temperatures that float32
    # holds exactly keep the comparison at float64 precision (TRL's default 1.05 differs by 5e-8 relative)
    "sapo": (("sapo", dict(eps_low=0.2, eps_high=0.2, sapo=(1.0, 1.25))),
             dict(policy_loss="sapo", loss_agg="seq_mean_token_mean", sapo_temperature_neg=1.25)),
    "sapo_sharp": (("sapo", dict(eps_low=0.2, eps_high=0.2, sapo=(4.0, 8.0))),
                   dict(policy_loss="sapo", loss_agg="seq_mean_token_mean", sapo_temperature_pos=4.0,
                        sapo_temperature_neg=8.0)),
    "grpo_k3": (("grpo", dict(eps_low=0.2, eps_high=0.2, beta=0.04)),
                dict(policy_loss="ppo_clip", loss_agg="seq_mean_token_mean", beta=0.04)),
    "v32": (("grpo", dict(eps_low=0.2, eps_high=0.2, beta=0.04, unbiased_kl=True, delta=0.05)),
            dict(policy_loss="ppo_clip", loss_agg="seq_mean_token_mean", beta=0.04, kl_estimator="k3_unbiased",
                 off_policy_mask_delta=0.05)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_gradient_match_trl(name):
    (loss_type, kw), fields = CASES[name]
    for seed in (0, 1):
        x = _inputs(seed)
        want, want_grad = trl_loss(loss_type, *x, **kw)
        got, got_grad = ours(GRPOConfig(**fields), *x)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-9, atol=1e-12)


def test_the_cases_exercise_what_they_test():
    """Clipping, the cap, the off-policy mask and the KL weighting are active on these inputs (so equality means
    something): each switch changes the loss."""
    x = _inputs(0)
    base = ours(GRPOConfig(policy_loss="cispo", loss_agg="token_mean", epsilon_high=0.2), *x)[0]
    assert base != ours(GRPOConfig(policy_loss="cispo", loss_agg="token_mean", epsilon_high=100.0), *x)[0]
    plain = dict(policy_loss="ppo_clip", beta=0.04)
    a = ours(GRPOConfig(**plain), *x)[0]
    assert a != ours(GRPOConfig(**plain, kl_estimator="k3_unbiased"), *x)[0]
    assert a != ours(GRPOConfig(**plain, off_policy_mask_delta=0.05), *x)[0]
    _, g_cispo = ours(GRPOConfig(policy_loss="cispo", loss_agg="token_mean", epsilon_high=0.2), *x)
    _, g_ppo = ours(GRPOConfig(policy_loss="ppo_clip", loss_agg="token_mean", epsilon_high=0.2), *x)
    clipped = (np.exp(x[0] - x[1]) > 1.2) & (x[3][:, None] > 0) & (x[4] > 0)
    assert clipped.any() and np.all(g_ppo[clipped] == 0) and np.all(g_cispo[clipped] != 0)  # CISPO keeps them


def test_bad_names_fail_naming_the_field():
    with pytest.raises(ValueError, match="grpo.policy_loss"):
        GRPOConfig(policy_loss="nope")
    with pytest.raises(ValueError, match="grpo.kl_estimator"):
        GRPOConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match="grpo.off_policy_mask_delta"):
        GRPOConfig(off_policy_mask_delta=-1.0)
