"""DeepSeek-V3.2's Keep Routing: the sampler returns the experts each token chose, the trainer can replay them, and
`router_disagreement` measures how often the two forwards choose differently."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import init_params
from model.config import ModelConfig, MoEConfig
from rl.logprobs import completion_logprobs
from rl.loop import router_disagreement
from rl.sampler import generate

MOE = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64,
                  max_seq_len=64, moe=MoEConfig(n_routed_experts=8, experts_per_token=2, mlp_dim=32, first_k_dense=0,
                                                n_groups=1, topk_groups=1))


@pytest.fixture(scope="module")
def sampled():
    params = init_params(MOE, 0)
    prompts = jnp.asarray(np.random.RandomState(0).randint(1, 250, (4, 6)), jnp.int32)
    lens = jnp.asarray([6, 3, 5, 6], jnp.int32)
    out = generate(MOE, params, prompts, lens, 8, 1.0, jax.random.key(1), with_routing=True)
    mask = (np.arange(8)[None, :] < np.asarray(out.lengths)[:, None]).astype(np.float32)
    return params, prompts, lens, out, jnp.asarray(mask)


def test_sampler_routing_is_the_trainers_at_the_same_parameters(sampled):
    params, prompts, lens, out, mask = sampled
    assert out.routing.shape == (4, 6 + 8, 2, 2) and out.routing.dtype == jnp.int32
    own, _, aux = completion_logprobs(MOE, params, prompts, lens, out.tokens, with_entropy=True)
    assert float(router_disagreement(out.routing, aux["routing"], 6, mask)) == 0.0
    replayed, _, _ = completion_logprobs(MOE, params, prompts, lens, out.tokens, with_entropy=True,
                                         routing=out.routing)
    np.testing.assert_array_equal(np.asarray(replayed), np.asarray(own))  # replay == own routing at step 0
    np.testing.assert_allclose(np.asarray(own) * mask, np.asarray(out.logprobs) * mask, atol=2e-5)


def test_replay_keeps_the_sampled_experts_after_the_router_moves(sampled):
    """After an update that moves only the routers, the trainer's own routing changes experts for some tokens;
    replaying runs exactly the given experts: the sampler's give other log-probs than the router's own choice, and
    replaying the router's own choice reproduces the unreplayed forward bit for bit. The disagreement metric sees
    the change, with or without replay (it reports the router's own choice)."""
    params, prompts, lens, out, mask = sampled
    moved = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 * jax.random.normal(jax.random.key(7), x.shape, x.dtype)
        if "gate" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path) else x, params)
    own, _, aux = completion_logprobs(MOE, moved, prompts, lens, out.tokens, with_entropy=True)
    replayed, _, aux_r = completion_logprobs(MOE, moved, prompts, lens, out.tokens, with_entropy=True,
                                             routing=out.routing)
    dis = float(router_disagreement(out.routing, aux["routing"], 6, mask))
    assert 0.05 < dis < 1.0
    assert float(router_disagreement(out.routing, aux_r["routing"], 6, mask)) > 0.05
    m = np.asarray(mask) > 0
    assert np.abs(np.asarray(replayed) - np.asarray(own))[m].max() > 1e-3  # other experts, other log-probs
    full_own = jnp.concatenate([aux["routing"], aux["routing"][:, -1:]], axis=1)  # [B, P+N, L, k] as replay takes
    again, _, _ = completion_logprobs(MOE, moved, prompts, lens, out.tokens, with_entropy=True, routing=full_own)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(own))
    # gradients still reach the routers through the gate weights under replay
    g = jax.grad(lambda p: completion_logprobs(MOE, p, prompts, lens, out.tokens, routing=out.routing)[0].sum())(moved)
    kernels = [x for path, x in jax.tree_util.tree_leaves_with_path(g) if "gate" in jax.tree_util.keystr(path)
               and "kernel" in jax.tree_util.keystr(path)]
    assert kernels and all(float(jnp.abs(k).max()) > 0 for k in kernels)


def test_grpo_with_keep_routing_trains_and_logs(tmp_path):
    from experiments.config import CheckpointConfig, RLExperiment
    from rl.grpo import GRPOConfig
    from rl.loop import grpo
    from rl.rollout import Sampling
    from sharding.mesh import MeshConfig
    from train.config import OptimConfig
    from train.data import DataConfig
    from train.metrics import read_metrics

    exp = RLExperiment(
        name="replay", model=MOE, run_dir=str(tmp_path),
        prompts=DataConfig(kind="prompts", source="memory", tokenizer="byte", chat_template="{prompt}"),
        grpo=GRPOConfig(num_generations=4, prompts_per_step=4, sampling=Sampling(max_new_tokens=6), mini_batches=2,
                        keep_routing=True),
        mesh=MeshConfig(data=-1), optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"),
        checkpoint=CheckpointConfig(every=0), max_prompt_len=8, steps=2, progress=False, tensorboard=False)
    grpo(exp, records=[{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+3=", "answer": "5"}])
    rows = read_metrics(str(tmp_path))
    assert len(rows) == 2
    for r in rows:  # first mini-batch: the sampler's and the trainer's forward on the same parameters
        assert r["router_disagreement"] == 0.0 and r["logprob_mismatch"] < 1e-5
    with pytest.raises(ValueError, match="grpo.keep_routing"):
        dataclasses.replace(exp, model=dataclasses.replace(MOE, moe=None))
