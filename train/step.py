"""The jitted train step: a pure function (state, batch) -> (state, metrics) with explicit shardings.

state = {'params': nnx.State (Param + RouterBias), 'opt_state': optax state over the Params, 'step': int32}.
Gradients flow only to `nnx.Param` leaves; the MoE correction biases move by the aux-loss-free rule after
the optimizer update, from the expert loads of this step.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model import init_params, update_router_bias
from model.config import ModelConfig
from sharding import DEFAULT_RULES, ShardingError, batch_sharding, check_batch, param_shardings, use_rules
from train.config import LossConfig, OptimConfig
from train.losses import lm_loss
from train.optim import make_optimizer


def split_trainable(params: nnx.State):
    """-> (Params, everything else)."""
    return nnx.split_state(params, nnx.Param, ...)


def _micro(batch, n):
    return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


class Trainer:
    """Builds the sharded state and the compiled step for one (model, optimizer, loss, mesh, rules)."""

    def __init__(self, cfg: ModelConfig, ocfg: OptimConfig, lcfg: LossConfig, mesh: Mesh, rules=DEFAULT_RULES,
                 loss_fn=None):
        """loss_fn(params, batch, denominator, n_micro) -> (total, parts dict, expert_load [n_moe, E] or None, or
        {'expert_load', 'moe_dropped' [n_moe]});
        default: the language-model loss of train.losses (RL passes its policy loss here)."""
        self.cfg, self.ocfg, self.lcfg, self.mesh, self.rules = cfg, ocfg, lcfg, mesh, rules
        self.loss_fn = loss_fn or (lambda params, batch, den, n: lm_loss(cfg, lcfg, params, batch, den, n))
        self._check_divisible()
        with use_rules(mesh, rules):
            abstract = jax.eval_shape(lambda: init_params(cfg, 0))
            self.param_sharding = param_shardings(abstract, mesh, rules)
        self.tx = make_optimizer(ocfg, split_trainable(abstract)[0])
        self._step = None

    def _check_divisible(self):
        from model import abstract_params
        if self.cfg.moe is not None and "expert" in self.mesh.shape:
            self.cfg.moe.check_expert_axis(self.mesh.shape["expert"])  # ConfigError naming the field
        param_shardings(abstract_params(self.cfg), self.mesh, self.rules)  # raises ShardingError naming the dim

    # ---- state ---------------------------------------------------------------------------------------------
    def init_state(self, rng=0):
        with use_rules(self.mesh, self.rules):
            params = jax.jit(lambda: init_params(self.cfg, rng), out_shardings=self.param_sharding)()
            return self.state_from_params(params)

    def state_from_params(self, params):
        with use_rules(self.mesh, self.rules):
            params = jax.device_put(params, self.param_sharding)
            init = lambda p: self.tx.init(split_trainable(p)[0])  # noqa: E731
            # moments sharded like their parameters (jit would otherwise replicate them on every device)
            opt_sharding = optax.tree_map_params(
                self.tx, lambda _, sh: sh, jax.eval_shape(init, params), split_trainable(self.param_sharding)[0],
                transform_non_params=lambda _: NamedSharding(self.mesh, P()))
            opt_state = jax.jit(init, out_shardings=opt_sharding)(params)
            return {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}

    def state_shardings(self, state):
        return jax.tree.map(lambda x: x.sharding, state)

    # ---- step ----------------------------------------------------------------------------------------------
    def _loss_and_grads(self, params, batch, denominator):
        trainable, rest = split_trainable(params)

        def loss_fn(tr):
            total, parts, load = self.loss_fn(nnx.merge_state(tr, rest), batch, denominator, self.lcfg.micro_batches)
            return total, (parts, load)

        (loss, (parts, load)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        return loss, parts, load, grads

    def _step_fn(self, state, batch):
        params, n = state["params"], self.lcfg.micro_batches
        mask = batch["loss_mask"].astype(jnp.float32)
        denominator = jnp.maximum(jnp.sum(mask), 1.0)
        if n == 1:
            loss, parts, load, grads = self._loss_and_grads(params, batch, denominator)
        else:
            def body(carry, mb):
                loss, parts, load, grads = self._loss_and_grads(params, mb, denominator)
                add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
                return add(carry, (loss, parts, load, grads)), None

            first = jax.tree.map(lambda x: x[: x.shape[0] // n], batch)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(self._loss_and_grads, params, first, denominator))
            (loss, parts, load, grads), _ = jax.lax.scan(body, zeros, _micro(batch, n))
        trainable, rest = split_trainable(params)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], trainable)
        new_params = nnx.merge_state(optax.apply_updates(trainable, updates), rest)
        metrics = {"loss": loss, **parts, "grad_norm": grad_norm, "tokens": denominator}
        if isinstance(load, dict):  # lm_loss: loads and dropped-pair counts (summed over micro-batches)
            metrics["moe_dropped"] = load["moe_dropped"] / jnp.sum(load["expert_load"], axis=-1)
            load = load["expert_load"]
        if load is not None:
            new_params = update_router_bias(self.cfg, new_params, load)
            metrics["expert_load"] = load / jnp.sum(load, axis=-1, keepdims=True)
        new = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
        # a non-finite loss or gradient skips the update (the step counter still advances)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = {"params": jax.tree.map(lambda a, b: jnp.where(ok, a, b), new["params"], params),
               "opt_state": jax.tree.map(lambda a, b: jnp.where(ok, a, b), new["opt_state"], state["opt_state"]),
               "step": new["step"]}
        metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
        return new, metrics

    def step(self, state, batch):
        """One optimizer step. batch arrays [batch, seq], placed (or resharded) onto the mesh."""
        bsz = batch["loss_mask"].shape[0]
        check_batch(bsz, self.mesh, self.rules)
        if bsz % self.lcfg.micro_batches:
            raise ShardingError(f"batch size {bsz} is not divisible by loss.micro_batches={self.lcfg.micro_batches}")
        if self._step is None:
            st_sh = self.state_shardings(state)
            b_sh = jax.tree.map(lambda x: batch_sharding(self.mesh, self.rules, x.ndim), batch)
            self._step = jax.jit(self._step_fn, in_shardings=(st_sh, b_sh), out_shardings=(st_sh, None),
                                 donate_argnums=0)
        with use_rules(self.mesh, self.rules):
            return self._step(state, batch)
