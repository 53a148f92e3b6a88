"""DeepSeekMoE (V3 report eq. 12-20): shared experts + fine-grained routed experts.

Routing: scores s = sigmoid(x·e_i) (or softmax); the experts are chosen by top-k over s + b, optionally
limited to the `topk_groups` best groups (group score = sum of its top-2 biased scores); gate weights use
the unbiased s, normalised over the chosen k and multiplied by `routed_scaling_factor`.

The correction bias b is a `RouterBias` variable, not an `nnx.Param`: gradients and the optimizer never see
it. It moves only through `update_router_bias` (b_i += γ·sign(mean load − load_i)), applied after each step
from the expert loads the forward pass reports.

Routed experts run as `moe.impl` says (model/config.py MoEConfig): 'dense' computes every expert on every
token (gated by zeros; the reference, cost ~E), 'capacity' and 'dropless' sort the n·k (token, expert) pairs
by expert and compute only those (model/dispatch.py; cost ~k). With an `expert` mesh axis > 1 the sparse impls
dispatch and combine over all-to-all inside a shard_map (model/expert_parallel.py); 'dense' stays GSPMD.
Every impl reports the same routing statistics: per-expert load (the global count of chosen pairs, dropped or
not) and the sequence-wise balance loss, plus the number of dropped pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model import dispatch
from model.config import ModelConfig
from model.layers import MLP, KeyGen, dtype_of, param


class RouterBias(nnx.Variable):
    """Aux-loss-free load-balancing bias [n_experts]; not trainable."""


def route(scores_logits, bias, moe, idx=None):
    """Expert choice for tokens.

    scores_logits [n, E] float32, bias [E] -> (weights [n, k], indices [n, k], scores [n, E]).
    `idx` int32 [n, k] replays a given choice (routing replay: the experts the sampler used); the gate weights are
    still computed from these scores, so the router keeps learning.
    """
    if moe.score_func == "sigmoid":
        scores = jax.nn.sigmoid(scores_logits)
    else:
        scores = jax.nn.softmax(scores_logits, axis=-1)
    if idx is not None:
        return _gate_weights(scores, idx, moe), idx.astype(jnp.int32), scores
    choice = scores + bias
    n, e = choice.shape
    if moe.n_groups > 1:
        grouped = choice.reshape(n, moe.n_groups, e // moe.n_groups)
        if moe.score_func == "sigmoid":
            group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
        else:
            group_score = grouped.max(-1)
        _, top_groups = jax.lax.top_k(group_score, moe.topk_groups)
        keep = jnp.zeros((n, moe.n_groups), bool).at[jnp.arange(n)[:, None], top_groups].set(True)
        choice = jnp.where(jnp.repeat(keep, e // moe.n_groups, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, moe.experts_per_token)
    return _gate_weights(scores, idx, moe), idx, scores


def _gate_weights(scores, idx, moe):
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if moe.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * moe.routed_scaling_factor


def balance_loss(scores, idx, n_experts, k, batch):
    """Sequence-wise balance loss Σ_i f_i P_i, averaged over sequences (without the weight α).

    scores [batch*seq, E], idx [batch*seq, k].
    """
    s = scores.reshape(batch, -1, n_experts)
    t = s.shape[1]
    chosen = jax.nn.one_hot(idx, n_experts, dtype=jnp.float32).sum(-2).reshape(batch, t, n_experts)
    f = chosen.sum(1) * n_experts / (k * t)
    p = (s / s.sum(-1, keepdims=True)).mean(1)
    return jnp.mean(jnp.sum(f * p, axis=-1))


def route_tokens(flat, kernel, bias, moe, batch: int, idx=None):
    """flat [n, d] (n = batch·seq), router kernel [d, E], bias [E] (idx [n, k] to replay) -> (weights [n, k],
    idx [n, k] (the experts that run), stats {'load' [E] float32: pairs per expert, 'own' [n, k]: the router's own
    choice (= idx unless replayed), 'balance_loss' []: mean over the `batch` sequences})."""
    logits = flat.astype(jnp.float32) @ kernel.astype(jnp.float32)
    w, used, scores = route(logits, bias, moe, idx)
    # 'own' is the router's own choice even under replay: what the sampler and the trainer may disagree on
    own = used if idx is None else route(logits, bias, moe)[1]
    load = jnp.zeros((moe.n_routed_experts,), jnp.float32).at[used.reshape(-1)].add(1.0)
    return w, used, {"load": load, "own": own,
                     "balance_loss": balance_loss(scores, used, moe.n_routed_experts, moe.experts_per_token, batch)}


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: KeyGen):
        e = cfg.moe.n_routed_experts
        self.kernel = param(rngs, (cfg.d_model, e), ("embed", "expert"), cfg.init_std, jnp.float32)
        self.bias = RouterBias(jnp.zeros((e,), jnp.float32), axes=("expert",))


class Experts(nnx.Module):
    """Routed experts, stacked: gate/up [E, d_model, mlp], down [E, mlp, d_model]."""

    def __init__(self, cfg: ModelConfig, rngs: KeyGen):
        e, d, f = cfg.moe.n_routed_experts, cfg.d_model, cfg.moe.mlp_dim
        dt, std = dtype_of(cfg.param_dtype), cfg.init_std
        self.gate_proj = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, dt)
        self.up_proj = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std, dt)
        self.down_proj = param(rngs, (e, f, d), ("expert", "mlp", "embed"), std, dt)

    def __call__(self, x, gates):
        """x [n, d], gates [n, E] (zero for unchosen experts) -> [n, d].

        Computed as two flat matmuls over all experts ([n, d] @ [d, E*f], then [n, E*f] @ [E*f, d]): token-major
        activations need no [E, n, f] -> [n, E*f] transpose, which cost more than the expert matmuls themselves.
        """
        dt = x.dtype
        e, d, f = self.gate_proj.shape
        flat = lambda w: jnp.transpose(w[...].astype(dt), (1, 0, 2)).reshape(d, e * f)  # noqa: E731
        h = jax.nn.silu(x @ flat(self.gate_proj)) * (x @ flat(self.up_proj))
        h = h * jnp.repeat(gates.astype(dt), f, axis=1)
        return h @ self.down_proj[...].astype(dt).reshape(e * f, d)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: KeyGen):
        self.cfg = cfg
        self.gate = Router(cfg, rngs)
        self.experts = Experts(cfg, rngs)
        n_shared = cfg.moe.n_shared_experts
        self.shared_experts = MLP(cfg, cfg.moe.mlp_dim * n_shared, rngs) if n_shared else None

    def __call__(self, x, routing=None):
        """x [batch, seq, d_model] (routing int32 [batch, seq, k]: experts to replay) -> (y [batch, seq, d_model],
        stats {'load' [E], 'balance_loss' [], 'dropped' [] (pairs dropped by 'capacity', float32),
        'routing' int32 [batch, seq, k]: the experts the router chose (under replay: would have chosen)})."""
        from model import expert_parallel  # imports sharding; kept out of module import order

        plan = expert_parallel.active_plan(self.cfg.moe, x.shape[0])
        if plan is not None:
            y, stats = expert_parallel.moe_forward(self, x, plan, routing)
        else:
            y, stats = self.routed(x, routing)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y, stats

    def expert_weights(self, dt):
        return tuple(p[...].astype(dt) for p in (self.experts.gate_proj, self.experts.up_proj, self.experts.down_proj))

    def routed(self, x, routing=None):
        """Routed experts on the tokens this program holds (one device, or GSPMD): x [b, t, d] -> (y, stats)."""
        moe = self.cfg.moe
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        replay = None if routing is None else routing.reshape(b * t, -1)
        w, idx, stats = route_tokens(flat, self.gate.kernel[...], self.gate.bias[...], moe, b, replay)
        dropped = jnp.zeros((), jnp.float32)
        if moe.impl == "dense":
            gates = jnp.einsum("nk,nke->ne", w, jax.nn.one_hot(idx, moe.n_routed_experts, dtype=jnp.float32))
            y = self.experts(flat, gates)
        elif moe.impl == "capacity":
            y, n_drop = dispatch.capacity_moe(flat, w, idx, *self.expert_weights(x.dtype), moe.capacity(b * t))
            dropped = n_drop.astype(jnp.float32)
        else:
            y = dispatch.dropless_moe(flat, w, idx, *self.expert_weights(x.dtype))
        own = stats.pop("own")
        return y.reshape(b, t, d), {**stats, "dropped": dropped, "routing": own.reshape(b, t, -1)}


def bias_update(bias, load, rate):
    """Aux-loss-free update: b_i += γ·sign(mean(load) − load_i). bias, load: [E]."""
    return bias + rate * jnp.sign(jnp.mean(load) - load)
