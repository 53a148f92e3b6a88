"""Model core: KV-cache decoding, MLA absorption, DeepSeekMoE routing and balancing, budgets, RoPE, configs,
packing. CPU, float32; compiled functions are shared through one jitted `forward` keyed on the (hashable) config.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from residuals import kept_for_backward

import model
from model.config import (MLAConfig, ModelConfig, MoEConfig, RopeConfig, deepseek_v3_671b, qwen2_5_0_5b,
                          small_qwen2, tiny_deepseek, yarn_mscale)
from model.moe import RouterBias, balance_loss, route
from model.rope import inv_frequencies

TOL = 1e-5

route = jax.jit(route, static_argnums=2)
balance_loss = jax.jit(balance_loss, static_argnums=(2, 3, 4))

# One jitted forward for every test: cfg and with_mtp are static, so each (cfg, shapes) compiles once. These tests
# check semantics, not speed: XLA's backend optimisation level 0 roughly halves CPU compile time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}
fwd = jax.jit(model.forward, static_argnums=0, static_argnames=("with_mtp",), compiler_options=_FAST_COMPILE)


def _tokens(cfg, batch, t, seed):
    return jax.random.randint(jax.random.key(seed), (batch, t), 0, cfg.vocab_size, dtype=jnp.int32)


def _arange_pos(batch, t):
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))


def _mla(q_lora_rank=96, decode_impl="absorb"):
    return MLAConfig(kv_lora_rank=64, q_lora_rank=q_lora_rank, qk_nope_head_dim=32, qk_rope_head_dim=16,
                     v_head_dim=32, decode_impl=decode_impl)


CONFIGS = {
    # the real tiny DeepSeek-V3 (MLA with q_lora, MoE with group-limited routing, MTP), real init
    "deepseek_mla_qlora": tiny_deepseek(),
    # V2-Lite-style queries; 2 layers (one dense, one MoE) to keep compile time down
    "deepseek_mla_no_qlora": tiny_deepseek(n_layers=2, mla=_mla(q_lora_rank=None)),
    "deepseek_mla_no_qlora_naive": tiny_deepseek(n_layers=2, mla=_mla(q_lora_rank=None, decode_impl="naive")),
    # a small MLA-free MoE model for the gradient test (cheap to differentiate)
    "small_moe": ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16, mlp_dim=64,
                             moe=MoEConfig(n_routed_experts=8, experts_per_token=2, mlp_dim=16, first_k_dense=1,
                                           n_groups=2, topk_groups=1), max_seq_len=64),
    "gqa_qkv_bias": ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16,
                                mlp_dim=128, qkv_bias=True, rope=RopeConfig(theta=1e6), max_seq_len=64),
    # Qwen3-like: per-head q/k RMSNorm, head_dim 32 != d_model / n_heads = 16, tied embeddings
    "qwen3_qknorm_tied": ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                                     mlp_dim=128, qk_norm=True, tie_embeddings=True, rope=RopeConfig(theta=1e6),
                                     max_seq_len=64),
}


def _random_params(cfg, seed):
    """Parameters of the right structure filled with random values (non-zero biases, non-unit norm scales), so
    that every parameter matters; much cheaper on CPU than an eager `init_params` of a new shape set."""
    rng = np.random.default_rng(seed)
    flat = []
    for path, v in nnx.to_flat_state(model.abstract_params(cfg)):
        s = v.get_value()
        x = rng.normal(size=s.shape)
        x = 1.0 + 0.1 * x if path[-1] == "scale" else 0.05 * x
        flat.append((path, v.replace(jnp.asarray(x, s.dtype))))
    return nnx.from_flat_state(flat)


@pytest.fixture(scope="module")
def params_of():
    cache = {}

    def get(name):
        key = "deepseek_mla_no_qlora" if name.startswith("deepseek_mla_no_qlora") else name
        if key not in cache:
            cfg = CONFIGS[key]
            # rbg keys: same init, but XLA compiles rng_bit_generator far faster than threefry on CPU
            cache[key] = (model.init_params(cfg, jax.random.key(0, impl="rbg")) if key == "deepseek_mla_qlora"
                          else _random_params(cfg, 0))
        return cache[key]

    return get


def _full(cfg, params, tokens, positions=None, **kw):
    """Full forward without cache (positions always explicit, so every call of a shape shares one compile)."""
    if positions is None:
        positions = _arange_pos(*tokens.shape)
    logits, cache, _ = fwd(cfg, params, tokens, positions, with_mtp=False, **kw)
    assert cache is None
    return np.asarray(logits)


def _decode(cfg, params, tokens, prefill, max_len=16, positions=None, grow=False):
    """Prefill tokens[:, :prefill] then feed one token at a time; returns logits [b, t, vocab] (numpy).
    grow: prefill into a cache of `prefill` slots, then `model.grow_cache` it to max_len (as rl.sampler does)."""
    b, t = tokens.shape
    if positions is None:
        positions = _arange_pos(b, t)
    cache = model.init_cache(cfg, b, prefill if grow else max_len)
    logits, cache, _ = fwd(cfg, params, tokens[:, :prefill], positions[:, :prefill], cache=cache)
    if grow:
        cache = model.grow_cache(cfg, cache, max_len)
        assert jax.tree.map(jnp.shape, cache) == jax.tree.map(jnp.shape, model.init_cache(cfg, b, max_len))
    out = [np.asarray(logits)]
    for i in range(prefill, t):
        logits, cache, _ = fwd(cfg, params, tokens[:, i:i + 1], positions[:, i:i + 1], cache=cache)
        out.append(np.asarray(logits))
    assert int(cache["index"]) == t
    np.testing.assert_array_equal(np.asarray(cache["pos"][:, :t]), np.asarray(positions))
    assert (np.asarray(cache["pos"][:, t:]) == -1).all()
    return np.concatenate(out, axis=1)


B, T, PREFILL = 2, 10, 4


# ---- 1. KV-cache decode == full forward --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["deepseek_mla_qlora", "deepseek_mla_no_qlora", "gqa_qkv_bias", "qwen3_qknorm_tied"])
def test_kv_cache_decode_matches_full_forward(name, params_of):
    cfg, params = CONFIGS[name], params_of(name)
    tokens = _tokens(cfg, B, T, 1)
    full = _full(cfg, params, tokens)
    assert full.shape == (B, T, cfg.vocab_size) and np.isfinite(full).all()
    dec = _decode(cfg, params, tokens, PREFILL)
    assert np.max(np.abs(dec - full)) <= TOL
    assert np.max(np.abs(_decode(cfg, params, tokens, PREFILL, grow=True) - full)) <= TOL

    # The tolerance is meaningful: changing the first token moves the last position's logits by far more.
    other = tokens.at[:, 0].set((tokens[:, 0] + 1) % cfg.vocab_size)
    assert np.max(np.abs(_full(cfg, params, other)[:, -1] - full[:, -1])) > 100 * TOL

    # RoPE on both queries and keys makes attention depend on relative positions only: shifting every position
    # by a constant leaves the logits unchanged (fails if either side is not rotated, or rotated differently).
    shifted = _full(cfg, params, tokens, _arange_pos(B, T) + 37)
    assert np.max(np.abs(shifted - full)) <= TOL


def _numpy_dense_forward(cfg, params, tokens):
    """Independent float64 reference of a dense Llama/Qwen2/Qwen3 decoder (causal, no cache)."""
    p = {path: np.asarray(v[...], np.float64) for path, v in nnx.to_flat_state(params)}
    tokens = np.asarray(tokens)
    h, kvh, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale

    def rope(x):  # x [b, t, heads, hd]; rotate-half layout (HF Llama/Qwen)
        t = x.shape[1]
        inv = 1.0 / cfg.rope.theta ** (np.arange(0, hd, 2) / hd)
        ang = np.arange(t)[:, None] * inv[None]
        cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x = p[("embed_tokens", "embedding")][tokens]
    t = tokens.shape[1]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(cfg.n_layers):
        def L(*k, i=i):
            return p[("layers", i) + k]

        a = rms(x, L("input_layernorm", "scale"))
        q = np.einsum("btd,dhk->bthk", a, L("self_attn", "q_proj"))
        k = np.einsum("btd,dhk->bthk", a, L("self_attn", "k_proj"))
        v = np.einsum("btd,dhk->bthk", a, L("self_attn", "v_proj"))
        if cfg.qkv_bias:
            q, k, v = q + L("self_attn", "q_bias"), k + L("self_attn", "k_bias"), v + L("self_attn", "v_bias")
        if cfg.qk_norm:
            q, k = rms(q, L("self_attn", "q_norm", "scale")), rms(k, L("self_attn", "k_norm", "scale"))
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, h // kvh, axis=2), np.repeat(v, h // kvh, axis=2)  # head j uses kv head j // group
        s = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(hd)
        s = np.where(causal, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("bhqs,bshk->bqhk", w, v)
        x = x + np.einsum("bqhk,hkd->bqd", o, L("self_attn", "o_proj"))
        m = rms(x, L("post_attention_layernorm", "scale"))
        g, u = m @ L("mlp", "gate_proj", "kernel"), m @ L("mlp", "up_proj", "kernel")
        x = x + (g / (1 + np.exp(-g)) * u) @ L("mlp", "down_proj", "kernel")
    x = rms(x, p[("norm", "scale")])
    head = p[("embed_tokens", "embedding")].T if cfg.tie_embeddings else p[("lm_head", "kernel")]
    return x @ head


@pytest.mark.parametrize("name", ["gqa_qkv_bias", "qwen3_qknorm_tied"])
def test_dense_forward_matches_numpy_reference(name, params_of):
    cfg, params = CONFIGS[name], params_of(name)
    tokens = _tokens(cfg, B, T, 6)
    ref = _numpy_dense_forward(cfg, params, tokens)
    got = _full(cfg, params, tokens)
    assert np.max(np.abs(got - ref)) <= TOL
    assert np.abs(ref).max() > 0.1  # non-trivial logits


def test_qkv_as_three_products_off_cpu(params_of, monkeypatch):
    """On CPU `Attention` runs q/k/v as one product over concatenated weights; on other backends as three (sharded
    weights stay put). The three-product path, forced here by reporting another backend while tracing (which also
    picks XLA's `attend` over the CPU kernel), gives the numpy reference's logits and the fused path's gradients."""
    cfg, params = CONFIGS["gqa_qkv_bias"], params_of("gqa_qkv_bias")
    tokens = _tokens(cfg, B, T, 6)
    pos = _arange_pos(B, T)

    def loss(p):
        logits = model.forward(cfg, p, tokens, pos, with_mtp=False)[0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits

    grad_fn = lambda: jax.jit(jax.value_and_grad(loss, has_aux=True))(params)  # noqa: E731  a fresh trace each
    (_, fused_logits), fused_grads = grad_fn()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    (_, split_logits), split_grads = grad_fn()
    ref = _numpy_dense_forward(cfg, params, tokens)
    assert np.max(np.abs(np.asarray(split_logits) - ref)) <= TOL
    assert np.max(np.abs(np.asarray(fused_logits) - ref)) <= TOL
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), fused_grads, split_grads)
    assert max(jax.tree.leaves(diffs)) <= TOL
    assert float(jnp.max(jnp.abs(split_grads["layers"][0]["self_attn"]["k_proj"]))) > 0


@pytest.mark.parametrize("name", ["deepseek_mla_qlora", "gqa_qkv_bias"])
def test_left_padded_row_matches_unpadded(name, params_of):
    cfg, params = CONFIGS[name], params_of(name)
    pad = 3
    tokens = _tokens(cfg, B, T, 2)  # the pad slots of row 1 hold arbitrary tokens: they must not leak
    positions = jnp.stack([jnp.arange(T, dtype=jnp.int32),
                           jnp.concatenate([jnp.full((pad,), -1, jnp.int32), jnp.arange(T - pad, dtype=jnp.int32)])])
    # Unpadded reference for both rows in one [B, T] call: row 1's real tokens moved to the front (what follows
    # them cannot affect their logits under the causal mask).
    ref_tokens = jnp.stack([tokens[0], jnp.concatenate([tokens[1, pad:], tokens[1, :pad]])])
    ref = _full(cfg, params, ref_tokens)

    full = _full(cfg, params, tokens, positions)
    assert np.isfinite(full).all()  # fully masked pad queries give finite (uniform) attention
    assert np.max(np.abs(full[1, pad:] - ref[1, :T - pad])) <= TOL
    assert np.max(np.abs(full[0] - ref[0])) <= TOL

    dec = _decode(cfg, params, tokens, PREFILL, positions=positions)
    assert np.isfinite(dec).all()
    assert np.max(np.abs(dec[1, pad:] - ref[1, :T - pad])) <= TOL
    assert np.max(np.abs(dec[0] - ref[0])) <= TOL
    # and the padded row is not trivially equal to an unpadded run of the raw row
    assert np.max(np.abs(full[1, pad:] - _full(cfg, params, tokens)[1, pad:])) > 100 * TOL


def test_default_positions_continue_the_cache(params_of):
    """forward(cfg, params, tokens, cache=cache) without positions: 0..t-1, then index + 0.. with a cache."""
    cfg, params = CONFIGS["gqa_qkv_bias"], params_of("gqa_qkv_bias")
    tokens = _tokens(cfg, B, T, 1)
    full, _, _ = fwd(cfg, params, tokens, with_mtp=False)
    np.testing.assert_array_equal(np.asarray(full), _full(cfg, params, tokens))
    cache = model.init_cache(cfg, B, 16)
    logits, cache, _ = fwd(cfg, params, tokens[:, :PREFILL], cache=cache)
    out = [np.asarray(logits)]
    for i in range(PREFILL, T):
        logits, cache, _ = fwd(cfg, params, tokens[:, i:i + 1], cache=cache)
        out.append(np.asarray(logits))
    np.testing.assert_array_equal(np.asarray(cache["pos"][:, :T]), np.asarray(_arange_pos(B, T)))
    assert np.max(np.abs(np.concatenate(out, axis=1) - np.asarray(full))) <= TOL


# ---- 2. MLA absorbed decode == naive decode ----------------------------------------------------------------

def test_mla_absorbed_equals_naive(params_of):
    cfg, naive_cfg = CONFIGS["deepseek_mla_no_qlora"], CONFIGS["deepseek_mla_no_qlora_naive"]
    params = params_of("deepseek_mla_no_qlora")
    assert cfg.mla.decode_impl == "absorb" and naive_cfg.mla.decode_impl == "naive"
    tokens = _tokens(cfg, B, T, 3)
    a = _decode(cfg, params, tokens, PREFILL)
    n = _decode(naive_cfg, params, tokens, PREFILL)
    assert np.max(np.abs(a - n)) <= TOL
    assert np.max(np.abs(n - _full(cfg, params, tokens))) <= TOL


# ---- 3. router ---------------------------------------------------------------------------------------------

def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_router_bias_selects_but_does_not_weight():
    moe = MoEConfig(n_routed_experts=16, experts_per_token=4, n_groups=1, topk_groups=1, routed_scaling_factor=2.5)
    logits = np.asarray(jax.random.normal(jax.random.key(0), (64, 16)), np.float32)
    scores = _sigmoid(logits)
    _, idx0, s0 = map(np.asarray, route(jnp.asarray(logits), jnp.zeros(16), moe))
    np.testing.assert_allclose(s0, scores, rtol=1e-6)
    # without bias: the top-4 scores, weights = normalised scores * 2.5
    np.testing.assert_array_equal(np.sort(idx0, -1), np.sort(np.argsort(-scores, -1)[:, :4], -1))

    bias = np.zeros(16, np.float32)
    bias[5] = 10.0
    w, idx, s = map(np.asarray, route(jnp.asarray(logits), jnp.asarray(bias), moe))
    assert (idx == 5).any(-1).all()  # the biased expert is chosen for every token
    assert not (idx0 == 5).any(-1).all()  # ... which it was not without the bias
    np.testing.assert_allclose(s, scores, rtol=1e-6)  # returned scores are unbiased
    chosen = np.take_along_axis(scores, idx, -1)
    expected = chosen / chosen.sum(-1, keepdims=True) * 2.5
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w.sum(-1), 2.5, rtol=1e-5)
    # biased weights would look very different: expert 5 would dominate
    biased = np.take_along_axis(scores + bias, idx, -1)
    assert np.max(np.abs(w - biased / biased.sum(-1, keepdims=True) * 2.5)) > 0.1
    # the remaining 3 experts are the top-3 unbiased among the others
    rest = scores.copy()
    rest[:, 5] = -np.inf
    np.testing.assert_array_equal(np.sort(idx[idx != 5].reshape(64, 3), -1), np.sort(np.argsort(-rest, -1)[:, :3], -1))


def test_router_no_norm_and_softmax():
    logits = np.asarray(jax.random.normal(jax.random.key(1), (32, 8)), np.float32)
    moe = MoEConfig(n_routed_experts=8, experts_per_token=2, norm_topk_prob=False, routed_scaling_factor=1.5)
    w, idx, _ = map(np.asarray, route(jnp.asarray(logits), jnp.zeros(8), moe))
    np.testing.assert_allclose(w, np.take_along_axis(_sigmoid(logits), idx, -1) * 1.5, rtol=1e-5)
    moe = MoEConfig(n_routed_experts=8, experts_per_token=2, score_func="softmax", norm_topk_prob=False)
    w, idx, s = map(np.asarray, route(jnp.asarray(logits), jnp.zeros(8), moe))
    sm = np.exp(logits - logits.max(-1, keepdims=True))
    sm /= sm.sum(-1, keepdims=True)
    np.testing.assert_allclose(s, sm, rtol=1e-5)
    np.testing.assert_allclose(w, np.sort(sm, -1)[:, ::-1][:, :2], rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_router_group_limited(seed):
    moe = MoEConfig(n_routed_experts=16, experts_per_token=4, n_groups=4, topk_groups=2)
    n, e, g = 2048, 16, 4
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, e)).astype(np.float32) * 2
    bias = (rng.normal(size=e) * 0.3).astype(np.float32)
    w, idx, _ = map(np.asarray, route(jnp.asarray(logits), jnp.asarray(bias), moe))
    biased = _sigmoid(logits) + bias
    group_score = np.sort(biased.reshape(n, g, e // g), -1)[..., -2:].sum(-1)
    top_groups = np.sort(np.argsort(-group_score, -1)[:, :2], -1)
    chosen_groups = idx // (e // g)
    assert np.all((chosen_groups[..., None] == top_groups[:, None, :]).any(-1))
    # and within the allowed groups, the chosen experts are the top-4 biased scores
    allowed = np.zeros((n, e), bool)
    for j in range(2):
        for k in range(e // g):
            allowed[np.arange(n), top_groups[:, j] * (e // g) + k] = True
    masked = np.where(allowed, biased, -np.inf)
    np.testing.assert_array_equal(np.sort(idx, -1), np.sort(np.argsort(-masked, -1)[:, :4], -1))
    # gate weights: the unbiased scores of the chosen experts, normalised
    chosen = np.take_along_axis(_sigmoid(logits), idx, -1)
    np.testing.assert_allclose(w, chosen / chosen.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    # group limiting is binding in this sample (otherwise the test would be vacuous)
    unlimited = np.sort(np.argsort(-biased, -1)[:, :4], -1)
    assert (unlimited != np.sort(idx, -1)).any(-1).mean() > 0.05


def test_router_group_score_is_top2_sum_not_max():
    # group 0 holds the single best expert but a weak second; group 1 and 2 have two good experts each
    moe = MoEConfig(n_routed_experts=8, experts_per_token=2, n_groups=4, topk_groups=2)
    scores = np.array([[0.99, 0.01, 0.8, 0.8, 0.7, 0.7, 0.1, 0.1]], np.float32)
    logits = np.log(scores / (1 - scores))
    _, idx, _ = route(jnp.asarray(logits), jnp.zeros(8), moe)
    assert sorted(np.asarray(idx)[0].tolist()) == [2, 3]
    # the bias (not the raw score) decides the groups: lift group 3
    bias = np.array([0, 0, 0, 0, 0, 0, 1.0, 1.0], np.float32)
    w, idx, _ = route(jnp.asarray(logits), jnp.asarray(bias), moe)
    assert sorted(np.asarray(idx)[0].tolist()) == [6, 7]
    np.testing.assert_allclose(np.asarray(w)[0], [0.5, 0.5], rtol=1e-5)  # unbiased 0.1, 0.1 normalised


# ---- 4. aux-loss-free bias update --------------------------------------------------------------------------

def test_update_router_bias(params_of):
    cfg, params = CONFIGS["deepseek_mla_qlora"], params_of("deepseek_mla_qlora")
    gamma = cfg.moe.bias_update_rate
    n_moe = sum(cfg.is_moe_layer) + cfg.mtp_depth
    e = cfg.moe.n_routed_experts
    rng = np.random.default_rng(0)
    load = rng.integers(0, 20, size=(n_moe, e)).astype(np.float32)
    load[0, :] = 7.0  # balanced layer: no change
    load[1, :4] = load[1, :].mean()  # exactly mean: no change for those

    biases = model.router_biases(params)
    assert len(biases) == n_moe and all(isinstance(b, RouterBias) for b in biases)
    assert not issubclass(RouterBias, nnx.Param)

    new = model.update_router_bias(cfg, params, jnp.asarray(load))
    assert jax.tree.structure(new) == jax.tree.structure(params)
    old_flat, new_flat = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(new))
    assert old_flat.keys() == new_flat.keys()
    bias_paths = sorted([p for p, v in old_flat.items() if isinstance(v, RouterBias)],
                        key=lambda p: (p[0] != "layers", p[1]))
    assert bias_paths == [("layers", 1, "mlp", "gate", "bias"), ("layers", 2, "mlp", "gate", "bias"),
                          ("layers", 3, "mlp", "gate", "bias"), ("mtp", 0, "block", "mlp", "gate", "bias")]
    for path, v in old_flat.items():
        if isinstance(v, RouterBias):
            continue
        assert isinstance(v, nnx.Param) and isinstance(new_flat[path], nnx.Param)
        np.testing.assert_array_equal(np.asarray(new_flat[path][...]), np.asarray(v[...]))
    for layer, path in enumerate(bias_paths):
        assert isinstance(new_flat[path], RouterBias)
        delta = np.asarray(new_flat[path][...]) - np.asarray(old_flat[path][...])
        expected = gamma * np.sign(load[layer].mean() - load[layer])
        np.testing.assert_allclose(delta, expected, atol=1e-9)
    assert np.all(np.asarray(new_flat[bias_paths[0]][...]) == 0)
    assert np.abs(np.asarray(new_flat[bias_paths[2]][...])).max() == pytest.approx(gamma)

    # a second update accumulates
    newer = model.update_router_bias(cfg, new, jnp.asarray(load))
    b3 = np.asarray(dict(nnx.to_flat_state(newer))[bias_paths[3]][...])
    np.testing.assert_allclose(b3, 2 * gamma * np.sign(load[3].mean() - load[3]), atol=1e-9)
    # the updated params still run (same structure => no retrace needed)
    assert np.isfinite(_full(cfg, newer, _tokens(cfg, B, T, 1))).all()


def test_router_bias_excluded_from_gradients(params_of):
    cfg, params = CONFIGS["small_moe"], params_of("small_moe")
    trainable, rest = nnx.split_state(params, nnx.Param, ...)
    assert all(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(trainable))
    rest_flat = list(nnx.to_flat_state(rest))
    assert len(rest_flat) == len(model.router_biases(params)) and all(isinstance(v, RouterBias) for _, v in rest_flat)
    # the same split by filtering (State.filter is deprecated in flax 0.12 in favour of nnx.filter_state)
    filtered = nnx.filter_state(params, nnx.Param)
    assert dict(nnx.to_flat_state(filtered)).keys() == dict(nnx.to_flat_state(trainable)).keys()
    tokens = _tokens(cfg, B, T, 4)

    def loss(p):
        logits, _, aux = model.forward(cfg, nnx.merge_state(p, rest), tokens, with_mtp=False)
        return jnp.mean(logits ** 2) + aux["balance_loss"]

    grads = jax.jit(jax.grad(loss), compiler_options=_FAST_COMPILE)(trainable)
    g_flat = dict(nnx.to_flat_state(grads))
    assert g_flat.keys() == dict(nnx.to_flat_state(trainable)).keys()
    assert not any(p[-1] == "bias" and p[-2] == "gate" for p in g_flat)
    # the router kernel does get a gradient (through the gate weights and the balance loss)
    gk = np.asarray(g_flat[("layers", 1, "mlp", "gate", "kernel")][...])
    assert np.abs(gk).max() > 0


# ---- 5. balance loss ---------------------------------------------------------------------------------------

def test_balance_loss_hand_computed():
    batch, t, e, k = 2, 3, 4, 2
    rng = np.random.default_rng(3)
    scores = rng.uniform(0.05, 1.0, size=(batch * t, e)).astype(np.float32)
    idx = np.array([[0, 1], [0, 2], [1, 0], [3, 2], [3, 1], [3, 0]], np.int32)
    total = 0.0
    for b in range(batch):
        f = np.zeros(e)
        p = np.zeros(e)
        for s in range(t):
            row = b * t + s
            for i in range(e):
                f[i] += (i in idx[row]) * e / (k * t)
                p[i] += scores[row, i] / scores[row].sum() / t
        total += (f * p).sum()
    expected = total / batch
    got = float(balance_loss(jnp.asarray(scores), jnp.asarray(idx), e, k, batch))
    assert got == pytest.approx(expected, rel=1e-6)
    # perfectly balanced selection with uniform scores gives exactly 1
    uni = np.full((4, 4), 0.5, np.float32)
    idx_b = np.array([[0, 1], [2, 3], [0, 2], [1, 3]], np.int32)
    assert float(balance_loss(jnp.asarray(uni), jnp.asarray(idx_b), 4, 2, 1)) == pytest.approx(1.0, rel=1e-6)


# ---- 6. parameter counts -----------------------------------------------------------------------------------

def _deepseek_v3_by_hand():
    d, v, L, h = 7168, 129280, 61, 128
    qr, kvr, nope, rope, vd = 1536, 512, 128, 64, 128
    attn = d * qr + qr + qr * h * (nope + rope) + d * (kvr + rope) + kvr + kvr * h * (nope + vd) + h * vd * d
    dense_mlp = 3 * d * 18432
    e, f = 256, 2048
    moe_mlp = d * e + e * 3 * d * f + 3 * d * f  # router + routed + 1 shared
    norms = 2 * d
    total = 2 * v * d + d + L * (attn + norms) + 3 * dense_mlp + (L - 3) * moe_mlp
    active = total - (L - 3) * (e - 8) * 3 * d * f
    return total, active


def test_count_params_deepseek_v3():
    c = model.count_params(deepseek_v3_671b())
    total, active = _deepseek_v3_by_hand()
    assert c["total"] == total == 671_026_404_352
    assert c["active"] == active == 37_552_282_624
    assert abs(c["total"] - 671e9) <= 1e9
    assert abs(c["active"] - 37e9) <= 1e9
    assert c["mtp"] > 0


def test_count_params_qwen2_5():
    assert model.count_params(qwen2_5_0_5b())["total"] == 494_032_768


def test_count_params_matches_real_init(params_of):
    cfg, params = CONFIGS["deepseek_mla_qlora"], params_of("deepseek_mla_qlora")
    c = model.count_params(cfg)
    flat = list(nnx.to_flat_state(params))
    sizes = {p: int(np.prod(v[...].shape)) for p, v in flat if isinstance(v, nnx.Param)}
    total = sum(n for p, n in sizes.items() if p[0] != "mtp")
    mtp = sum(n for p, n in sizes.items() if p[0] == "mtp")
    routed = sum(n for p, n in sizes.items() if p[0] != "mtp" and "experts" in p)  # not "shared_experts"
    moe = cfg.moe
    active = total - routed * (moe.n_routed_experts - moe.experts_per_token) // moe.n_routed_experts
    assert c == {"total": total, "active": active, "mtp": mtp}
    # RouterBias leaves exist but are not counted
    assert sum(isinstance(v, RouterBias) for _, v in flat) == 4
    assert 1.5e6 < total < 2.5e6  # "~1.8M parameters"


# ---- 7. training FLOPs -------------------------------------------------------------------------------------

def test_flops_per_token_small_qwen2():
    cfg = small_qwen2()
    d, v, L, H, kv, hd, f = 256, 512, 6, 8, 2, 32, 768
    per_layer = 2 * d + d * H * hd + 2 * d * kv * hd + H * hd + 2 * kv * hd + H * hd * d + 3 * d * f
    n = 2 * v * d + d + L * per_layer
    assert model.count_params(cfg)["total"] == n
    assert round(n / 1e4) == 479  # "4.79M parameters"
    T = 256
    expected = 6 * (n - v * d) + 6 * L * H * T * (2 * hd)
    assert model.flops_per_token(cfg, T) == expected


# ---- 8. RoPE vs Hugging Face -------------------------------------------------------------------------------

def _hf_rope(rope_type, dim, rope_parameters):
    """(inv_freq, attention_factor) from transformers' own RoPE init functions."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # A bare PretrainedConfig carries everything the init functions read (and imports much faster than a model).
    cfg = transformers.PretrainedConfig()
    cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim = 4 * dim, 4, dim
    cfg.max_position_embeddings = 163840
    cfg.rope_parameters = dict(rope_parameters)
    if rope_type == "default":
        # transformers keeps the default in each model's RotaryEmbedding.compute_default_rope_parameters:
        # base ** -(arange(0, dim, 2) / dim), attention factor 1 -- which is exactly 'linear' with factor 1.
        cfg.rope_parameters.update(rope_type="linear", factor=1.0)
        rope_type = "linear"
    inv, factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    return inv.numpy().astype(np.float64), float(factor)


ROPE_CASES = {
    "default": (RopeConfig(theta=1e6), 64, {"rope_type": "default", "rope_theta": 1e6}),
    "linear": (RopeConfig(theta=10000.0, type="linear", factor=4.0), 64,
               {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "llama3": (RopeConfig(theta=500000.0, type="llama3", factor=8.0, original_max_position_embeddings=8192,
                          low_freq_factor=1.0, high_freq_factor=4.0), 128,
               {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "original_max_position_embeddings": 8192,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    "yarn_deepseek": (deepseek_v3_671b().rope, 64,
                      {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                       "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                       "mscale_all_dim": 1.0}),
    "yarn_mscale_ratio": (RopeConfig(theta=10000.0, type="yarn", factor=40.0, original_max_position_embeddings=4096,
                                     mscale=0.707, mscale_all_dim=1.0), 64,
                          {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                           "original_max_position_embeddings": 4096, "mscale": 0.707, "mscale_all_dim": 1.0}),
    "yarn_plain": (RopeConfig(theta=1e6, type="yarn", factor=4.0, original_max_position_embeddings=32768), 128,
                   {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}),
    "yarn_no_truncate": (RopeConfig(theta=150000.0, type="yarn", factor=32.0, original_max_position_embeddings=4096,
                                    beta_fast=32.0, beta_slow=1.0, truncate=False), 64,
                         {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                          "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                          "truncate": False}),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_matches_transformers(case):
    rope, dim, hf_params = ROPE_CASES[case]
    inv, factor = inv_frequencies(rope, dim, 163840)
    hf_inv, hf_factor = _hf_rope(hf_params["rope_type"], dim, hf_params)
    assert inv.shape == hf_inv.shape == (dim // 2,)
    np.testing.assert_allclose(inv.astype(np.float64), hf_inv, rtol=1e-6)
    assert factor == pytest.approx(hf_factor, rel=1e-6)
    if case != "default":  # scaling must actually change something
        assert np.max(np.abs(inv / inv_frequencies(RopeConfig(theta=rope.theta), dim, 1)[0] - 1)) > 0.1


def test_rope_attention_factors():
    assert inv_frequencies(ROPE_CASES["yarn_deepseek"][0], 64, 1)[1] == pytest.approx(1.0)
    assert inv_frequencies(ROPE_CASES["yarn_plain"][0], 128, 1)[1] == pytest.approx(0.1 * math.log(4) + 1)
    # DeepSeek MLA: the softmax scale carries mscale(factor, mscale_all_dim)^2
    cfg = deepseek_v3_671b()
    assert cfg.attn_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    assert yarn_mscale(40, 1.0) == pytest.approx(0.1 * math.log(40) + 1)
    assert tiny_deepseek().attn_scale == pytest.approx(48 ** -0.5)


# ---- 9. config validation ----------------------------------------------------------------------------------

def test_config_validation():
    with pytest.raises(model.ConfigError, match="n_kv_heads"):
        ModelConfig(n_heads=6, n_kv_heads=4)
    with pytest.raises(model.ConfigError, match="n_groups"):
        MoEConfig(n_routed_experts=10, n_groups=4)
    with pytest.raises(model.ConfigError, match=r"rope\.type"):
        RopeConfig(type="dynamic")
    assert issubclass(model.ConfigError, ValueError)
    # valid neighbours construct fine
    ModelConfig(n_heads=6, n_kv_heads=3)
    MoEConfig(n_routed_experts=12, n_groups=4, topk_groups=2)
    RopeConfig(type="yarn", factor=4.0)


# ---- 10. packing -------------------------------------------------------------------------------------------

def test_packed_documents_are_independent(params_of):
    cfg, params = CONFIGS["deepseek_mla_qlora"], params_of("deepseek_mla_qlora")
    la, lb = 4, 6
    tokens = _tokens(cfg, B, T, 5)
    # row 0: two documents [A | B]; row 1: one document
    seg = jnp.asarray([[1] * la + [2] * lb, [1] * T], jnp.int32)
    pos = jnp.asarray([list(range(la)) + list(range(lb)), list(range(T))], jnp.int32)
    packed = _full(cfg, params, tokens, pos, segment_ids=seg)
    # each document alone (at the front of its row; what follows cannot affect it under the causal mask)
    alone = _full(cfg, params, jnp.stack([tokens[0], jnp.concatenate([tokens[0, la:], tokens[0, :la]])]))
    assert np.max(np.abs(packed[0, :la] - alone[0, :la])) <= TOL
    assert np.max(np.abs(packed[0, la:] - alone[1, :lb])) <= TOL
    assert np.max(np.abs(packed[1] - _full(cfg, params, tokens)[1])) <= TOL
    # without segment ids document B would see document A
    unpacked = _full(cfg, params, tokens, pos)
    assert np.max(np.abs(unpacked[0, la:] - alone[1, :lb])) > 100 * TOL


def test_config_from_dict_roundtrip_and_fields_added_later():
    """A config saved before a field existed (no 'scan_layers', no 'moe.impl') reads back with their defaults, so
    resuming such a run is not refused as a different model; unknown keys are dropped."""
    import dataclasses

    from model.config import config_from_dict, deepseek_v3_671b, tiny_deepseek
    for cfg in (tiny_deepseek(), deepseek_v3_671b()):
        assert config_from_dict(dataclasses.asdict(cfg)) == cfg
    old = dataclasses.asdict(tiny_deepseek())
    del old["scan_layers"], old["moe"]["impl"]
    old["some_future_field"] = 1
    assert config_from_dict(old) == tiny_deepseek()


@pytest.mark.parametrize("case", ["default", "yarn_deepseek"])
def test_rope_table_equals_the_in_program_tables(case, monkeypatch):
    """The precomputed tables `rope_tables` gathers by position (short contexts) give the cos/sin the program
    computes itself (long contexts), to float32 rounding; padding (-1) reads position 0."""
    import model.rope as rope_mod
    rope, dim, _ = ROPE_CASES[case]
    pos = jnp.asarray([[-1, 0, 1, 2, 100, 255], [5, 4, 3, 2, 1, 0]], jnp.int32)
    table = rope_mod.rope_tables(rope, dim, 256, pos)
    monkeypatch.setattr(rope_mod, "_TABLE_ROWS_X_DIM", 0)
    program = rope_mod.rope_tables(rope, dim, 256, jnp.maximum(pos, 0))
    for a, b in zip(table, program):
        assert a.shape == b.shape == (2, 6, dim) and a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6)
    monkeypatch.undo()
    # a position beyond every context (model 256, sequence 2, cache 300 slots) is NaN, not a wrong rotation
    far = jnp.asarray([[299, 300]], jnp.int32)
    cos = np.asarray(rope_mod.rope_tables(rope, dim, 256, far, min_rows=300)[0])
    assert np.isfinite(cos[0, 0]).all() and np.isnan(cos[0, 1]).all()


def _kept_by_small_qwen2(**overrides):
    """(cfg, residuals of a 2-layer small_qwen2's forward at batch 2 x seq 24): mlp_dim 96, d_model 32."""
    cfg = small_qwen2(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=96,
                      max_seq_len=24, **overrides)
    tokens = jnp.zeros((2, 24), jnp.int32)
    return cfg, kept_for_backward(lambda p: jnp.sum(model.forward(cfg, p, tokens)[0]), model.init_params(cfg, 0))


def test_swiglu_backward_keeps_gate_up_and_product_only():
    """Per layer the MLP's backward keeps three [tokens, f] tensors: gate and up outputs (silu and the product are
    recomputed from them) and the down projection's input; without `model.layers.swiglu`'s checkpoint it kept six."""
    cfg, kept = _kept_by_small_qwen2()
    f = cfg.mlp_dim
    per_token_f = [x.shape for x in kept if x.shape[-1] == f and math.prod(x.shape) == 2 * 24 * f]
    assert len(per_token_f) == 3 * cfg.n_layers, per_token_f


def test_rms_norm_backward_keeps_no_float32_activations_in_bf16_compute():
    """model.layers.rms_norm computes in float32 but its backward keeps only its bf16 input: no [batch, seq, d]
    float32 tensor survives to the backward of a bf16-compute model (two per norm before the checkpoint)."""
    from model.config import ACCELERATOR_PRECISION
    cfg, kept = _kept_by_small_qwen2(**ACCELERATOR_PRECISION)
    acts = [(x.shape, x.dtype) for x in kept if x.shape[-1] == cfg.d_model and 24 in x.shape]
    assert acts and all(d == jnp.bfloat16 for _, d in acts), acts
