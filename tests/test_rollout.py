"""The one rollout path: Sampling validation, prompt encoding (BOS), think prefix, row layout; the GRPO loop and
held-out evaluation sample the same completions from the same key."""

import jax
import numpy as np
import pytest

from model import init_params
from model.config import ModelConfig
from rl.evaluate import eval_sampling, evaluate
from rl.rollout import Sampling, rollout
from train.tokenizer import ByteTokenizer

TINY = ModelConfig(vocab_size=264, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64,
                   max_seq_len=64)


def test_sampling_validation_names_fields():
    for kw, field in [({"temperature": 0}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k"),
                      ({"max_new_tokens": 0}, "max_new_tokens"), ({"stop": ("",)}, "stop"), ({"streams": 0}, "streams"),
                      ({"streams": 1.5}, "streams")]:
        with pytest.raises(ValueError, match=f"sampling.{field}"):
            Sampling(**kw)
    s = eval_sampling(Sampling(temperature=1.0, top_k=5, max_new_tokens=7, add_bos=False))
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens, s.add_bos) == (0.6, 0.95, 0, 7, False)


def test_rollout_rows_bos_and_think_prefix():
    tok, params = ByteTokenizer(), init_params(TINY, jax.random.key(0))
    s = Sampling(temperature=1.0, max_new_tokens=6)
    out = rollout(TINY, params, ["ab", "cd <think>"], s, tok, rng=jax.random.key(1), repeat=3)
    assert out.tokens.shape == (6, 6) and len(out.texts) == 6 and out.prompt_lens.tolist() == [3, 3, 3, 5, 5, 5]  # BOS + text; <think> is one token
    assert all(out.prompts[r, 0] == tok.bos_id for r in range(6))
    for r in range(6):
        body = tok.decode([int(t) for t in out.tokens[r][:out.lengths[r]] if t != tok.eos_id],
                          skip_special_tokens=False)
        assert out.texts[r] == ("<think>" if r >= 3 else "") + body
    # a stream count that does not divide the 6 rows falls back to one that does (4 -> 3): the same samples
    three = rollout(TINY, params, ["ab", "cd <think>"], Sampling(temperature=1.0, max_new_tokens=6, streams=4), tok,
                    rng=jax.random.key(1), repeat=3)
    np.testing.assert_array_equal(three.tokens, out.tokens)
    no_bos = rollout(TINY, params, ["ab"], Sampling(max_new_tokens=2, add_bos=False, think_prefix=""), tok)
    assert no_bos.prompt_lens.tolist() == [2] and no_bos.prompts[0, 0] == tok.encode("a")[0]


def test_grpo_and_evaluation_share_the_rollout(tmp_path):
    """Same params, key, prompts and sampling: the GRPO loop's rollout and evaluate's see the same completions."""
    from experiments.config import RLExperiment
    from rl.grpo import GRPOConfig
    from rl.loop import GRPO
    from sharding.mesh import MeshConfig
    from train.data import DataConfig

    s = Sampling(temperature=0.6, top_p=0.95, max_new_tokens=8)
    exp = RLExperiment(name="t", model=TINY, run_dir=str(tmp_path), mesh=MeshConfig(data=-1),
                       prompts=DataConfig(kind="prompts", source="memory", tokenizer="byte", chat_template="{prompt}"),
                       grpo=GRPOConfig(num_generations=2, prompts_per_step=1, sampling=s), rewards=("format",),
                       reward_weights=(1.0,), max_prompt_len=16, progress=False, tensorboard=False)
    records = [{"prompt": "What is 2+3?", "answer": "5"}]
    algo = GRPO(exp, records)
    params = init_params(TINY, jax.random.key(0))
    roll = algo._sample(params, jax.random.key(4))
    m = evaluate(TINY, params, algo.tok, records, k=2, sampling=s, max_prompt_len=16, data_cfg=exp.prompts,
                 rng=jax.random.key(4), mesh=algo.mesh, rules=algo.trainer.rules, details=True)
    assert m["problems"][0]["completions"] == roll["texts"]
    np.testing.assert_array_equal(roll["prompts"][0], roll["prompts"][1])
