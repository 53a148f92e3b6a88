"""The decoder: blocks, multi-token prediction, and the one pure `forward` everything else calls.

Parameter tree (an `nnx.State`; every leaf carries logical `axes`):
    embed_tokens.embedding [vocab, d]
    layers.{i}.input_layernorm.scale, .post_attention_layernorm.scale [d]
    layers.{i}.self_attn   Attention (q_proj [d,H,hd], k_proj/v_proj [d,KV,hd], o_proj [H,hd,d], biases, q/k norms)
                           or MLA (q_a_proj, q_a_layernorm, q_b_proj | q_proj, kv_a_proj, kv_a_layernorm, kv_b_proj, o_proj)
    layers.{i}.mlp         MLP (gate_proj/up_proj [d,f], down_proj [f,d] as .kernel)
                           or MoE (gate.kernel [d,E], gate.bias RouterBias [E], experts.{gate,up,down}_proj [E,..],
                           shared_experts MLP)
    norm.scale [d];  lm_head.kernel [d, vocab] unless tied
    mtp.{k}: enorm, hnorm, eh_proj.kernel [2d, d] (input = [norm(emb) ; norm(h)]), block (as a layer), norm
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import Attention, attention_mask
from model.config import ModelConfig
from model.layers import MLP, Dense, Embed, KeyGen, RMSNorm, dtype_of
from model.mla import MLA
from model.moe import MoE, RouterBias, bias_update
from model.rope import rope_tables
from sharding.rules import constrain

_REMAT_POLICIES = {"block": None, "dots": jax.checkpoint_policies.dots_saveable}
_ACT = ("batch", "seq", "act_embed")


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, moe: bool, rngs: KeyGen):
        dt = dtype_of(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, dt)
        self.self_attn = MLA(cfg, rngs) if cfg.mla else Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, dt)
        self.mlp = MoE(cfg, rngs) if moe else MLP(cfg, cfg.mlp_dim, rngs)
        self.is_moe = moe

    def __call__(self, x, rope, mask_info, cache=None, routing=None):
        a, cache = self.self_attn(self.input_layernorm(x), rope, mask_info, cache)
        x = x + a
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            m, stats = self.mlp(h, routing)
        else:
            m, stats = self.mlp(h), None
        return x + m, cache, stats


class MTPModule(nnx.Module):
    """One multi-token-prediction depth (V3 §2.2): h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i)])."""

    def __init__(self, cfg: ModelConfig, layer_index: int, rngs: KeyGen):
        dt = dtype_of(cfg.param_dtype)
        self.enorm = RMSNorm(cfg.d_model, cfg.norm_eps, dt)
        self.hnorm = RMSNorm(cfg.d_model, cfg.norm_eps, dt)
        self.eh_proj = Dense(2 * cfg.d_model, cfg.d_model, ("mlp", "embed"), cfg, rngs)
        self.block = Block(cfg, cfg.moe is not None and layer_index >= cfg.moe.first_k_dense, rngs)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, dt)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: KeyGen):
        self.cfg = cfg
        self.embed_tokens = Embed(cfg, rngs)
        self.layers = nnx.List([Block(cfg, moe, rngs) for moe in cfg.is_moe_layer])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype_of(cfg.param_dtype))
        self.lm_head = None if cfg.tie_embeddings else Dense(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), cfg, rngs)
        self.mtp = nnx.List([MTPModule(cfg, cfg.n_layers + k, rngs) for k in range(cfg.mtp_depth)])

    def head(self, h):
        """h [batch, seq, d] (already normed) -> float32 logits [batch, seq, vocab].

        The matmul runs in the compute dtype but accumulates and returns float32 (preferred_element_type):
        bf16 logits would round every logit to 8 bits of mantissa (±0.06 at |logit| 16) before the softmax.
        """
        w = self.embed_tokens.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return jnp.matmul(h, w.astype(h.dtype), preferred_element_type=jnp.float32)

    def __call__(self, tokens, positions, segment_ids, cache, with_mtp, routing=None):
        cfg = self.cfg
        b, t = tokens.shape
        dt = dtype_of(cfg.compute_dtype)
        if cache is None:
            # causal by index within segments; padding (position -1) forms its own segment
            index, mask = 0, None
            if segment_ids is None and positions is not None:
                segment_ids = (positions >= 0).astype(jnp.int32)
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        else:
            index = cache["index"]
            if positions is None:
                positions = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
            kv_pos = jax.lax.dynamic_update_slice(cache["pos"], positions.astype(jnp.int32), (0, index))
            mask = attention_mask(positions, kv_pos)
        mask_info = {"mask": mask, "index": index, "segment_ids": segment_ids}
        rope = rope_tables(cfg.rope, cfg.rope_dim, cfg.max_seq_len, positions)

        def run(layer, x, layer_cache, replay=None):
            return layer(x, rope, mask_info, layer_cache, replay)

        if cfg.remat != "none" and cache is None:
            def run(layer, x, layer_cache, replay=None):  # functional split/merge: jax.checkpoint sees only arrays
                gdef, state = nnx.split(layer)
                block = jax.checkpoint(lambda st, h, r: nnx.merge(gdef, st)(h, rope, mask_info, None, r),
                                       policy=_REMAT_POLICIES[cfg.remat])
                return block(state, x, replay)
        x = constrain(self.embed_tokens(tokens, dt), _ACT)
        stats, new_layers = [], []
        moe_layers = [i for i, layer in enumerate(self.layers) if layer.is_moe]
        for i, layer in enumerate(self.layers):
            replay = None if routing is None or not layer.is_moe else routing[:, :, moe_layers.index(i)]
            x, c, s = run(layer, x, None if cache is None else cache["layers"][i], replay)
            x = constrain(x, _ACT)
            new_layers.append(c)
            if s is not None:
                stats.append(s)
        logits = self.head(self.norm(x))
        chosen = [s["routing"] for s in stats]  # the main layers' (MTP modules are not replayed)

        mtp_logits = []
        if with_mtp and cache is None:
            h = x
            for k, mod in enumerate(self.mtp, start=1):
                nxt = jnp.concatenate([tokens[:, k:], jnp.zeros((b, k), tokens.dtype)], axis=1)
                e = mod.enorm(self.embed_tokens(nxt, dt))
                h = mod.eh_proj(jnp.concatenate([e, mod.hnorm(h)], axis=-1))
                h, _, s = run(mod.block, h, None)
                if s is not None:
                    stats.append(s)
                mtp_logits.append(self.head(mod.norm(h)))

        aux = {}
        if stats:
            aux["expert_load"] = jnp.stack([s["load"] for s in stats])
            aux["balance_loss"] = sum(s["balance_loss"] for s in stats) / len(stats)
            aux["moe_dropped"] = jnp.stack([s["dropped"] for s in stats])
        if chosen:
            aux["routing"] = jnp.stack(chosen, axis=2)
        if mtp_logits:
            aux["mtp_logits"] = jnp.stack(mtp_logits)
        new_cache = None
        if cache is not None:
            new_cache = {"index": index + t, "pos": kv_pos, "layers": new_layers}
        return logits, new_cache, aux


@functools.lru_cache(maxsize=64)
def graphdef(cfg: ModelConfig):
    """The static structure of the model for `cfg` (no arrays allocated)."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, KeyGen(jax.random.key(0)))))[0]


def init_params(cfg: ModelConfig, rng=0) -> nnx.State:
    """Randomly initialised parameters (an nnx.State of Param and RouterBias variables)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return nnx.split(Transformer(cfg, KeyGen(rng)))[1]


def abstract_params(cfg: ModelConfig) -> nnx.State:
    """Shapes and dtypes of the parameters (jax.ShapeDtypeStruct leaves), allocating nothing."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, KeyGen(jax.random.key(0)))))[1]


def forward(cfg: ModelConfig, params: nnx.State, tokens, positions=None, cache=None, *, segment_ids=None,
            with_mtp: bool = True, routing=None):
    """The model as a pure function.

    tokens int32 [batch, seq]; positions int32 [batch, seq] (default 0..seq-1, or continuing the cache;
    -1 marks padding); segment_ids int32 [batch, seq] for packed documents (no cache).
    Returns (logits float32 [batch, seq, vocab], cache or None, aux) where aux may hold
    'expert_load' [n_moe_layers, E], 'balance_loss' [] (mean over MoE layers, unweighted),
    'moe_dropped' [n_moe_layers] ((token, expert) pairs dropped by moe.impl='capacity'; 0 otherwise) and
    'mtp_logits' [mtp_depth, batch, seq, vocab] (depth k at position i predicts token i+k+1) and
    'routing' int32 [batch, seq, n_moe_layers, k] (the experts each token chose in each MoE layer of the main stack).
    `routing` (that layout) replays given experts instead of choosing them (GRPO's keep_routing: the trainer runs
    the experts the sampler ran); gate weights are still computed from the router, so it keeps learning.
    """
    model = nnx.merge(graphdef(cfg), params)
    return model(tokens, positions, segment_ids, cache, with_mtp, routing)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None):
    """An empty KV cache: per layer head-major buffers; `pos` [batch, max_len] = -1 marks empty slots.

    Inside jit, `forward` cannot check that decoding stays within `max_len` (writes past the end clamp onto
    the last slot): the caller sizes the cache for prompt + new tokens, as `rl.sampler` does.
    """
    dt = dtype_of(dtype or cfg.compute_dtype)
    layer_cls = MLA if cfg.mla else Attention
    return {"index": jnp.zeros((), jnp.int32), "pos": jnp.full((batch, max_len), -1, jnp.int32),
            "layers": [layer_cls.init_cache(cfg, batch, max_len, dt) for _ in range(cfg.n_layers)]}


def router_biases(params: nnx.State) -> list:
    """The RouterBias variables in the order of aux['expert_load'] (layers, then MTP modules)."""
    return [v for _, v in sorted(nnx.to_flat_state(params), key=lambda kv: _order(kv[0]))
            if isinstance(v, RouterBias)]


def _order(path):
    head = 0 if path[0] == "layers" else 1
    return (head, path[1] if len(path) > 1 and isinstance(path[1], int) else 0, tuple(map(str, path[2:])))


def update_router_bias(cfg: ModelConfig, params: nnx.State, expert_load) -> nnx.State:
    """Apply the aux-loss-free bias update to every MoE layer. expert_load [n_moe_layers, E]."""
    if cfg.moe is None:
        return params
    flat = dict(nnx.to_flat_state(params))
    paths = sorted((p for p, v in flat.items() if isinstance(v, RouterBias)), key=_order)
    main = [p for p in paths if p[0] == "layers"]
    if len(expert_load) == len(main) < len(paths):
        paths = main  # a forward without MTP (RL, scoring) moves only the main layers' biases
    if len(paths) != len(expert_load):
        raise ValueError(f"expert_load has {len(expert_load)} rows but the model has {len(paths)} MoE layers "
                         f"({len(main)} without MTP)")
    for path, load in zip(paths, expert_load):
        v = flat[path]
        flat[path] = v.replace(bias_update(v[...], load, cfg.moe.bias_update_rate))
    return nnx.from_flat_state(flat)
