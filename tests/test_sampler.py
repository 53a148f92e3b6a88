"""The sampler: its log-probs equal a teacher-forced pass, sharded equals unsharded, stopping rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import forward, init_params
from model.config import small_qwen2, tiny_deepseek
from rl.logprobs import completion_logprobs
from rl.sampler import filter_logits, generate
from sharding import MeshConfig, make_mesh, param_shardings

CFGS = {"deepseek": tiny_deepseek(vocab_size=128, d_model=64, n_layers=2, max_seq_len=64),
        "qwen2": small_qwen2(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                             max_seq_len=64)}
N = 10


def _prompts(vocab, seed=0):
    rng = np.random.RandomState(seed)
    prompts = rng.randint(3, vocab, (8, 9)).astype(np.int32)
    lens = np.array([9, 1, 5, 7, 2, 9, 3, 6], np.int32)
    prompts[np.arange(9)[None] >= lens[:, None]] = 0
    return prompts, lens


@pytest.fixture(scope="module", params=sorted(CFGS))
def setup(request):
    cfg = CFGS[request.param]
    params = init_params(cfg, 0)
    prompts, lens = _prompts(cfg.vocab_size)
    out = generate(cfg, params, prompts, lens, N, temperature=0.8, rng=jax.random.key(3), top_k=40, top_p=0.95,
                   eos_id=7)
    return cfg, params, prompts, lens, out


def test_sampler_logprobs_equal_teacher_forced(setup):
    cfg, params, prompts, lens, out = setup
    lp, _ = completion_logprobs(cfg, params, jnp.asarray(prompts), jnp.asarray(lens), out.tokens, 0.8)
    mask = np.arange(N)[None] < np.asarray(out.lengths)[:, None]
    assert mask.sum() > 20
    diff = np.abs((np.asarray(lp) - np.asarray(out.logprobs)) * mask).max()
    assert diff <= 1e-5, diff
    assert np.all(np.asarray(out.logprobs)[~mask] == 0)


def test_sharded_sampling_equals_unsharded(setup):
    cfg, params, prompts, lens, out = setup
    mesh = make_mesh(MeshConfig(data=4, tensor=2))
    sharded = jax.device_put(params, param_shardings(params, mesh))
    out2 = generate(cfg, sharded, prompts, lens, N, temperature=0.8, rng=jax.random.key(3), top_k=40, top_p=0.95,
                    eos_id=7, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(out2.tokens), np.asarray(out.tokens))
    np.testing.assert_array_equal(np.asarray(out2.lengths), np.asarray(out.lengths))
    np.testing.assert_allclose(np.asarray(out2.logprobs), np.asarray(out.logprobs), atol=1e-5)


def test_streams_sample_what_one_call_samples(setup):
    """Row groups decoded side by side on host threads (`streams`) sample what one call samples: row r draws from
    fold_in(rng, r) whatever call it is in, so tokens, lengths and routing are equal and log-probs equal to
    rounding (auto, 2 streams on CPU, is compared with one call in test_sharded_sampling_equals_unsharded). Auto
    (None) is 2 on CPU for an even batch of >= 8 rows; bad counts are errors naming `streams`."""
    from rl.sampler import resolve_streams
    cfg, params, prompts, lens, _ = setup
    assert resolve_streams(None, 8) == 2 and resolve_streams(None, 7) == 1 and resolve_streams(None, 6) == 1
    kw = dict(temperature=0.8, rng=jax.random.key(2), eos_id=7, with_routing=cfg.moe is not None)
    outs = [generate(cfg, params, prompts, lens, 40, streams=s, **kw) for s in (1, 4)]
    assert np.asarray(outs[0].lengths).min() < 40 == np.asarray(outs[0].lengths).max()  # rows stop at different steps
    for other in outs[1:]:
        for field in ("tokens", "lengths", "truncated") + (("routing",) if cfg.moe is not None else ()):
            np.testing.assert_array_equal(np.asarray(getattr(other, field)), np.asarray(getattr(outs[0], field)))
        np.testing.assert_allclose(np.asarray(other.logprobs), np.asarray(outs[0].logprobs), atol=1e-5)
    for bad in (3, 0, 2.0):
        with pytest.raises(ValueError, match="streams"):
            generate(cfg, params, prompts, lens, N, streams=bad, **kw)
    with pytest.raises(ValueError, match="streams=2 with a 8-device mesh"):
        generate(cfg, params, prompts, lens, N, streams=2, mesh=make_mesh(MeshConfig(data=8)), **kw)


def test_greedy_follows_the_full_forward(setup):
    cfg, params, prompts, lens, _ = setup
    out = generate(cfg, params, prompts, lens, 3, greedy=True)
    fwd = jax.jit(lambda p, t: forward(cfg, p, t, with_mtp=False)[0])
    for row in (0, 1):  # re-derive row's greedy continuation with plain full forwards
        seq = list(prompts[row, :lens[row]])
        for t in range(3):
            logits = fwd(params, jnp.asarray([seq]))
            nxt = int(jnp.argmax(logits[0, -1]))
            assert nxt == int(out.tokens[row, t]), (row, t)
            seq.append(nxt)


def test_stopping_rules_and_lengths():
    cfg = CFGS["qwen2"]
    params = init_params(cfg, 1)
    prompts, lens = _prompts(cfg.vocab_size, 1)
    free = generate(cfg, params, prompts, lens, N, greedy=True)
    row = 2
    eos = int(free.tokens[row, 3])  # make the 4th greedy token of a row the EOS
    out = generate(cfg, params, prompts, lens, N, greedy=True, eos_id=eos, pad_id=0)
    first = int(np.argmax(np.asarray(free.tokens[row]) == eos))
    assert int(out.lengths[row]) == first + 1 and not bool(out.truncated[row])
    assert np.all(np.asarray(out.tokens[row, first + 1:]) == 0)
    seq = tuple(int(t) for t in free.tokens[0, 1:3])  # a 2-token stop sequence
    out = generate(cfg, params, prompts, lens, N, greedy=True, stop_sequences=(seq,))
    assert int(out.lengths[0]) <= 3 and not bool(out.truncated[0])
    assert bool(free.truncated.all()) and int(free.lengths.max()) == N


def test_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=2, top_p=1.0)))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=0, top_p=0.7)))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    with pytest.raises(ValueError, match="temperature"):
        generate(CFGS["qwen2"], None, np.zeros((1, 2), np.int32), np.ones(1, np.int32), 2, temperature=0.0)


def test_draws_equal_jax_categorical_and_argmax():
    """sample_token's Gumbel-max with first_argmax draws exactly jax.random.categorical's token for each row (the
    row's key), and first_argmax is jnp.argmax, ties and -inf included."""
    from rl.sampler import first_argmax, sample_token
    logits = jax.random.normal(jax.random.key(0), (64, 97)) * 3
    logits = logits.at[0, 5].set(-jnp.inf).at[1, :].set(0.0).at[2, 7].set(9.0).at[2, 40].set(9.0)
    np.testing.assert_array_equal(first_argmax(logits), jnp.argmax(logits, axis=-1))
    assert first_argmax(logits).dtype == jnp.int32
    categorical = jax.vmap(lambda k, row: jax.random.categorical(k, row))
    for i in range(5):
        key = jax.random.split(jax.random.key(i), 64)
        tok, lp, _, lp_kept = sample_token(logits, key, temperature=0.7, top_k=0, top_p=1.0, greedy=False,
                                           vocab_limit=None)
        np.testing.assert_array_equal(tok, categorical(key, logits / 0.7))
        np.testing.assert_allclose(lp, jnp.take_along_axis(jax.nn.log_softmax(logits / 0.7), tok[:, None], 1)[:, 0],
                                   rtol=1e-6)
        np.testing.assert_array_equal(lp_kept, lp)
        tok_k, _, _, lp_k = sample_token(logits, key, temperature=0.7, top_k=5, top_p=1.0, greedy=False,
                                         vocab_limit=None)
        kept = filter_logits(logits / 0.7, 5, 1.0)
        np.testing.assert_array_equal(tok_k, categorical(key, kept))
        np.testing.assert_allclose(lp_k, jnp.take_along_axis(jax.nn.log_softmax(kept), tok_k[:, None], 1)[:, 0],
                                   rtol=1e-6)


def test_decode_phases_change_nothing_but_the_cache_size(setup, monkeypatch):
    """Decoding in phases over a growing cache (`decode_phases`) samples exactly what one phase over the full
    cache samples: same tokens, lengths, log-probs and (MoE) routing, rows stopping in different phases."""
    import rl.sampler as sampler
    from rl.sampler import decode_phases
    cfg, params, prompts, lens, _ = setup
    assert decode_phases(40) == (40,) and decode_phases(128) == (32, 64, 96, 128) and decode_phases(64) == (32, 64)
    assert len(decode_phases(4096)) == 8 and decode_phases(4096)[-1] == 4096
    kw = dict(temperature=0.8, rng=jax.random.key(2), eos_id=7, with_routing=cfg.moe is not None)
    outs = []
    for phases in [(40,), (8, 21, 40)]:
        monkeypatch.setattr(sampler, "decode_phases", lambda n, phases=phases: phases)
        sampler._generate.clear_cache()  # decode_phases is read while tracing
        outs.append(generate(cfg, params, prompts, lens, 40, **kw))
    sampler._generate.clear_cache()
    one, phased = outs
    lengths = np.asarray(one.lengths)
    assert lengths.min() < 21 and lengths.max() == 40, lengths  # rows stop in an earlier phase and in the last
    for field in ("tokens", "lengths", "truncated") + (("routing",) if cfg.moe is not None else ()):
        np.testing.assert_array_equal(np.asarray(getattr(phased, field)), np.asarray(getattr(one, field)), field)
    np.testing.assert_allclose(np.asarray(phased.logprobs), np.asarray(one.logprobs), atol=1e-5)
