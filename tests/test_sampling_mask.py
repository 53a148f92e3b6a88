"""DeepSeek-V3.2's Keep Sampling Mask: the sampler reports its top-k / top-p set as a floor per step, the trainer
restricts its distribution to that set (renormalised) for ratios, KL and entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import init_params
from model.config import ModelConfig
from rl.logprobs import completion_logprobs
from rl.sampler import generate

CFG = ModelConfig(vocab_size=264, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64,
                  max_seq_len=64, init_std=0.2)  # spread logits: few near-ties at the filter boundary


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.7), (8, 0.9)])
def test_trainer_renormalises_over_the_sampled_set(top_k, top_p):
    params = init_params(CFG, 0)
    prompts = jnp.asarray(np.random.RandomState(0).randint(1, 250, (6, 5)), jnp.int32)
    lens = jnp.asarray([5, 3, 4, 5, 2, 5], jnp.int32)
    out = generate(CFG, params, prompts, lens, 10, 0.8, jax.random.key(3), top_k=top_k, top_p=top_p,
                   vocab_limit=256)
    mask = np.arange(10)[None, :] < np.asarray(out.lengths)[:, None]
    kept, ent_kept, _ = completion_logprobs(CFG, params, prompts, lens, out.tokens, 0.8, with_entropy=True,
                                            floors=out.floors, vocab_limit=256)
    full, ent_full, _ = completion_logprobs(CFG, params, prompts, lens, out.tokens, 0.8, with_entropy=True)
    np.testing.assert_allclose(np.asarray(kept)[mask], np.asarray(out.kept_logprobs)[mask], atol=2e-5)
    np.testing.assert_allclose(np.asarray(full)[mask], np.asarray(out.logprobs)[mask], atol=2e-5)
    # renormalising over a subset raises every sampled token's log-prob and lowers the entropy
    assert np.all(np.asarray(kept)[mask] >= np.asarray(full)[mask] - 1e-6)
    assert np.asarray(kept)[mask].mean() > np.asarray(full)[mask].mean() + 0.1
    assert np.all(np.asarray(ent_kept)[mask] <= np.asarray(ent_full)[mask] + 1e-5)
    if top_k:
        assert np.all(np.asarray(ent_kept)[mask] <= np.log(top_k) + 1e-5)
    assert np.all(np.isfinite(np.asarray(kept)))


def test_grpo_with_keep_sampling_mask(tmp_path):
    from experiments.config import CheckpointConfig, RLExperiment
    from rl.grpo import GRPOConfig
    from rl.loop import grpo
    from rl.rollout import Sampling
    from sharding.mesh import MeshConfig
    from train.config import OptimConfig
    from train.data import DataConfig
    from train.metrics import read_metrics

    exp = RLExperiment(
        name="mask", model=CFG, run_dir=str(tmp_path),
        prompts=DataConfig(kind="prompts", source="memory", tokenizer="byte", chat_template="{prompt}"),
        grpo=GRPOConfig(num_generations=4, prompts_per_step=4, sampling=Sampling(max_new_tokens=6, top_k=8),
                        mini_batches=2, beta=0.05, keep_sampling_mask=True),
        mesh=MeshConfig(data=-1), optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"),
        checkpoint=CheckpointConfig(every=0), max_prompt_len=8, steps=2, progress=False, tensorboard=False)
    grpo(exp, records=[{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+3=", "answer": "5"}])
    rows = read_metrics(str(tmp_path))
    assert len(rows) == 2
    for r in rows:
        assert r["logprob_mismatch"] < 1e-5  # the sampler's kept-set log-probs equal the trainer's
        assert r["entropy"] <= np.log(8) + 1e-5 and r["kl"] >= 0.0 and np.isfinite(r["loss"])
    with pytest.raises(ValueError, match="grpo.keep_sampling_mask"):
        GRPOConfig(keep_sampling_mask=True, sampling=Sampling(greedy=True))
