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

With `cfg.scan_layers` the per-layer `layers.{i}` become two stacks, each one Block whose every leaf has a
leading `layers` axis (logical axis 'layers', mapped to no mesh axis):
    dense_layers.* [first_k_dense, ...]  (all n_layers for a dense model)   moe_layers.* [n_moe_layers, ...]
and each stack runs as one `lax.scan` (remat inside the scanned body), so the lowered program does not grow with
depth. Values are identical to the unscanned model's (`stack_blocks` stacks the same per-layer initialisation).
The KV cache is then stacked the same way and decoding scans too (`init_cache`). MTP modules stay unstacked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import Attention, attention_mask
from model.config import ModelConfig
from model.dispatch import EXPERT_SAVED
from model.layers import MLP, Dense, Embed, KeyGen, RMSNorm, dtype_of, linear
from model.mla import MLA
from model.moe import MoE, RouterBias, bias_update
from model.rope import rope_tables
from sharding.rules import constrain

# 'dots': the outputs of matmuls without batch dimensions (the projections) and the routed experts' gate/up
# outputs; attention's batched score products are recomputed (dots_saveable kept them: [T, T] per head, more
# than no remat at all with the XLA or blocked kernels). MaxText's 'minimal' plus the routed experts' gate/up outputs (batched dots).
_REMAT_POLICIES = {"block": None, "dots": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names(*EXPERT_SAVED))}
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


def stack_blocks(blocks: list[Block]) -> Block:
    """One Block whose leaves are the blocks' leaves stacked on a new leading axis (logical name 'layers')."""
    gdef, first = nnx.split(blocks[0])
    states = [first] + [nnx.split(b)[1] for b in blocks[1:]]

    def stack(*vs):
        axes = ("layers",) + tuple(vs[0].get_metadata().get("axes") or ())
        return vs[0].replace(jnp.stack([v.get_value() for v in vs]), axes=axes)

    return nnx.merge(gdef, jax.tree.map(stack, *states, is_leaf=lambda v: isinstance(v, nnx.Variable)))


def layer_stacks(cfg: ModelConfig) -> dict[str, int]:
    """Scanned layout: stack name -> number of layers, in execution order (dense prefix, then the MoE body)."""
    n_moe = sum(cfg.is_moe_layer)
    return {k: n for k, n in (("dense_layers", cfg.n_layers - n_moe), ("moe_layers", n_moe)) if n}


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: KeyGen):
        self.cfg = cfg
        self.embed_tokens = Embed(cfg, rngs)
        blocks = [Block(cfg, moe, rngs) for moe in cfg.is_moe_layer]
        if cfg.scan_layers:  # dense layers always come first (is_moe_layer is i >= first_k_dense)
            start = 0
            for name, n in layer_stacks(cfg).items():
                setattr(self, name, stack_blocks(blocks[start:start + n]))
                start += n
        else:
            self.layers = nnx.List(blocks)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype_of(cfg.param_dtype))
        self.lm_head = None if cfg.tie_embeddings else Dense(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), cfg, rngs)
        self.mtp = nnx.List([MTPModule(cfg, cfg.n_layers + k, rngs) for k in range(cfg.mtp_depth)])

    def head(self, h):
        """h [batch, seq, d] (already normed) -> float32 logits [batch, seq, vocab].

        The matmul runs in the compute dtype but accumulates and returns float32 (preferred_element_type):
        bf16 logits would round every logit to 8 bits of mantissa (±0.06 at |logit| 16) before the softmax.
        """
        w = self.embed_tokens.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return linear(h, w.astype(h.dtype), preferred_element_type=jnp.float32)

    def __call__(self, tokens, positions, segment_ids, cache, with_mtp, routing=None, last_only=False):
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
        rope = rope_tables(cfg.rope, cfg.rope_dim, cfg.max_seq_len, positions,
                           min_rows=0 if cache is None else cache["pos"].shape[1])

        def run(layer, x, layer_cache, replay=None):
            return layer(x, rope, mask_info, layer_cache, replay)

        if cfg.remat != "none" and cache is None:
            def run(layer, x, layer_cache, replay=None):  # functional split/merge: jax.checkpoint sees only arrays
                gdef, state = nnx.split(layer)
                block = jax.checkpoint(lambda st, h, r: nnx.merge(gdef, st)(h, rope, mask_info, None, r),
                                       policy=_REMAT_POLICIES[cfg.remat])
                return block(state, x, replay)
        x = constrain(self.embed_tokens(tokens, dt), _ACT)
        if cfg.scan_layers:
            x, new_layers, main = self._scanned(x, rope, mask_info, cache, routing)
        else:
            new_layers, stats = [], []
            moe_index = [sum(cfg.is_moe_layer[:i]) for i in range(cfg.n_layers)]
            for i, layer in enumerate(self.layers):
                replay = None if routing is None or not layer.is_moe else routing[:, :, moe_index[i]]
                x, c, s = run(layer, x, None if cache is None else cache["layers"][i], replay)
                x = constrain(x, _ACT)
                new_layers.append(c)
                if s is not None:
                    stats.append(s)
            main = jax.tree.map(lambda *a: jnp.stack(a), *stats) if stats else None
        logits = self.head(self.norm(x[:, -1:] if last_only else x))

        mtp_logits, stats = [], []
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
        # per-layer stats, [n_moe_layers (+ mtp), ...]: the main stack's, then the MTP modules' (not replayed)
        rows = ([main] if main is not None else []) + [jax.tree.map(lambda a: a[None], s) for s in stats]
        if rows:
            aux["expert_load"] = jnp.concatenate([r["load"] for r in rows])
            aux["balance_loss"] = jnp.mean(jnp.concatenate([r["balance_loss"] for r in rows]))
            aux["moe_dropped"] = jnp.concatenate([r["dropped"] for r in rows])
        if main is not None:
            aux["routing"] = jnp.moveaxis(main["routing"], 0, 2)  # [n, b, t, k] -> [b, t, n, k]
        if mtp_logits:
            aux["mtp_logits"] = jnp.stack(mtp_logits)
        new_cache = None
        if cache is not None:
            new_cache = {"index": index + t, "pos": kv_pos, "layers": new_layers}
        return logits, new_cache, aux

    def _scanned(self, x, rope, mask_info, cache, routing):
        """The layer stacks as one lax.scan each. x [b, t, d] -> (x, {stack: its stacked cache} or None-valued,
        stacked MoE stats {'load' [n, E], 'balance_loss' [n], 'dropped' [n], 'routing' [n, b, t, k]} or None)."""
        cfg, new_cache, main = self.cfg, {}, None
        for name in layer_stacks(cfg):
            gdef, state = nnx.split(getattr(self, name))
            is_moe = name == "moe_layers"
            replay = jnp.moveaxis(routing, 2, 0) if is_moe and routing is not None else None  # [n, b, t, k]

            def body(h, xs, gdef=gdef):
                st, c, r = xs
                h, c, s = nnx.merge(gdef, st)(h, rope, mask_info, c, r)
                return constrain(h, _ACT), (c, s)

            if cfg.remat != "none" and cache is None:
                # remat inside the scanned body: the scan saves only each layer's input; prevent_cse is not
                # needed under scan (jax.checkpoint docs) and would block fusions
                body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
            layer_cache = None if cache is None else cache["layers"][name]
            x, (new_cache[name], s) = jax.lax.scan(body, x, (state, layer_cache, replay))
            if is_moe:
                main = s
        return x, new_cache, main


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
            with_mtp: bool = True, routing=None, last_only: bool = False):
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
    `last_only`: logits of the last position only, [batch, 1, vocab] (a sampler's prefill: the LM head over the whole
    prompt would cost batch x seq x d x vocab for one row of it).
    """
    model = nnx.merge(graphdef(cfg), params)
    return model(tokens, positions, segment_ids, cache, with_mtp, routing, last_only)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None):
    """An empty KV cache: per layer head-major buffers; `pos` [batch, max_len] = -1 marks empty slots.

    'layers' is a list over layers, or with `cfg.scan_layers` a dict {stack name: buffers with a leading
    [n_layers_in_stack] axis}: decoding scans over the stacked cache as training scans over the stacked params.

    Inside jit, `forward` cannot check that decoding stays within `max_len` (writes past the end clamp onto
    the last slot): the caller sizes the cache for prompt + new tokens, as `rl.sampler` does.
    """
    dt = dtype_of(dtype or cfg.compute_dtype)
    layer_cls = MLA if cfg.mla else Attention
    one = layer_cls.init_cache(cfg, batch, max_len, dt)
    if cfg.scan_layers:
        layers = {name: jax.tree.map(lambda a, n=n: jnp.zeros((n,) + a.shape, a.dtype), one)
                  for name, n in layer_stacks(cfg).items()}
    else:
        layers = [one] + [layer_cls.init_cache(cfg, batch, max_len, dt) for _ in range(cfg.n_layers - 1)]
    return {"index": jnp.zeros((), jnp.int32), "pos": jnp.full((batch, max_len), -1, jnp.int32), "layers": layers}


def grow_cache(cfg: ModelConfig, cache, max_len: int):
    """`cache` (from `init_cache(cfg, batch, n)`, possibly filled) with room for `max_len` slots: each buffer
    zero-padded along its slot axis, `pos` with -1 (empty), `index` kept. Lets a prefill attend over its prompt's
    slots only, and `rl.sampler` grow it between decode phases (`rl.sampler.decode_phases`)."""
    b, n = cache["pos"].shape
    if max_len < n:
        raise ValueError(f"grow_cache: max_len {max_len} is below the cache's {n} slots")
    target = jax.eval_shape(lambda: init_cache(cfg, b, max_len))

    def pad(x, want, fill=0):
        return jnp.pad(x, [(0, w - s) for s, w in zip(x.shape, want.shape)], constant_values=fill)

    return {"index": cache["index"], "pos": pad(cache["pos"], target["pos"], -1),
            "layers": jax.tree.map(pad, cache["layers"], target["layers"])}


def router_biases(params: nnx.State) -> list:
    """The RouterBias variables in the order of aux['expert_load'] (layers, then MTP modules); with scan_layers
    the MoE stack's is one variable [n_moe_layers, E] covering that many rows."""
    return [v for _, v in sorted(nnx.to_flat_state(params), key=lambda kv: _order(kv[0]))
            if isinstance(v, RouterBias)]


_MAIN = ("layers", "dense_layers", "moe_layers")


def _order(path):
    head = 0 if path[0] in _MAIN else 1
    return (head, path[1] if len(path) > 1 and isinstance(path[1], int) else 0, tuple(map(str, path[2:])))


def update_router_bias(cfg: ModelConfig, params: nnx.State, expert_load) -> nnx.State:
    """Apply the aux-loss-free bias update to every MoE layer. expert_load [n_moe_layers (+ mtp_depth), E]."""
    if cfg.moe is None:
        return params
    flat = dict(nnx.to_flat_state(params))
    paths = sorted((p for p, v in flat.items() if isinstance(v, RouterBias)), key=_order)
    rows = {p: flat[p].get_value().shape[0] if flat[p].get_value().ndim == 2 else 1 for p in paths}
    main = [p for p in paths if p[0] in _MAIN]
    n_main, n_all = sum(rows[p] for p in main), sum(rows.values())
    if len(expert_load) == n_main < n_all:
        paths = main  # a forward without MTP (RL, scoring) moves only the main layers' biases
    elif len(expert_load) != n_all:
        raise ValueError(f"expert_load has {len(expert_load)} rows but the model has {n_all} MoE layers "
                         f"({n_main} without MTP)")
    start = 0
    for path in paths:
        v, n = flat[path], rows[path]
        if v.get_value().ndim == 2:  # a scanned stack: one bias row per layer
            new = jax.vmap(bias_update, in_axes=(0, 0, None))(v[...], expert_load[start:start + n],
                                                               cfg.moe.bias_update_rate)
        else:
            new = bias_update(v[...], expert_load[start], cfg.moe.bias_update_rate)
        flat[path] = v.replace(new)
        start += n
    return nnx.from_flat_state(flat)
