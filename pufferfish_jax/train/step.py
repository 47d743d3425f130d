"""The pure train and eval steps.

`make_train_step` closes over everything static (model spec, optimizer, accumulation, mesh) and
returns one jitted function of (state, batch, lr) with the state donated, so the update happens in
place and the loop never holds two copies of the parameters. Inputs and outputs carry explicit
shardings (state as `state_shardings` says, batch rows over data x fsdp, scalars replicated);
XLA derives the collectives: gradient all-reduce (data), weight gathers and gradient
reduce-scatters (fsdp), and the tensor-parallel all-reduces.

A MoE model's step also returns each MoE layer's routing metrics and, with balance 'loss_free',
moves each layer's routing bias after the optimizer step, from that layer's routing counts summed
over the whole batch and every accumulation micro-step.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jax.sharding import Mesh

from pufferfish_jax import sharding
from pufferfish_jax.model import moe
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.model.transformer import Transformer
from pufferfish_jax.train.state import TrainState, state_shardings

# Routing statistics summed over micro-steps (the losses are averaged with the gradients instead).
SUMMED_STATS = ("counts", "kept", "entropy_sum")


def token_nll(variables: dict, spec: ModelSpec, window_BT1: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood [B, T] in float32; window holds inputs and shifted targets.
    `variables` is {"params": ..., "moe_state": ...} (`TrainState.variables`)."""
    logits_BTV = Transformer(spec).apply(variables, window_BT1[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), window_BT1[:, 1:])


def make_train_step(spec: ModelSpec, optimizer: optax.GradientTransformation, grad_accum: int, mesh: Mesh) -> Callable:
    """Returns jitted `train_step(state, window_BT1, lr) -> (state, metrics)`.

    With accumulation, micro-batch a takes rows a, a + A, a + 2A, ...: every micro-batch is then
    spread over all data-parallel devices (contiguous blocks would each sit on a few of them).
    """

    def loss_fn(params, moe_state, window_BT1):
        """(LM loss + MoE auxiliary losses, (LM loss, summed routing statistics per MoE layer))."""
        logits_BTV, collections = Transformer(spec).apply(
            {"params": params, moe.MOE_STATE: moe_state}, window_BT1[:, :-1], mutable=[moe.MOE_STATS])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), window_BT1[:, 1:]).mean()
        stats = moe.layer_stats(collections)
        summed = {path: {k: v[k] for k in SUMMED_STATS} for path, v in stats.items()}
        return nll + moe.auxiliary_loss(spec.moe, stats), (nll, summed)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, window_BT1: jax.Array, lr: jax.Array):
        with sharding.activation_sharding(mesh):
            return _update(state, window_BT1, lr)

    def _update(state: TrainState, window_BT1: jax.Array, lr: jax.Array):
        if grad_accum == 1:
            (total, (loss, stats)), grads = grad_fn(state.params, state.moe_state, window_BT1)
        else:
            micro_ABT1 = window_BT1.reshape(-1, grad_accum, window_BT1.shape[-1]).swapaxes(0, 1)
            micro_ABT1 = sharding.constrain(micro_ABT1, (None, "batch", "seq"))

            def accumulate(carry, micro_BT1):
                (total, (loss, stats)), grads = grad_fn(state.params, state.moe_state, micro_BT1)
                return jax.tree.map(jnp.add, carry, (total, loss, stats, grads)), None

            first = jax.eval_shape(grad_fn, state.params, state.moe_state, micro_ABT1[0])
            (_, (_, stats_shape)), _ = first
            zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                     jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape),
                     jax.tree.map(jnp.zeros_like, state.params))
            (total, loss, stats, grads), _ = jax.lax.scan(accumulate, zeros, micro_ABT1)
            total, loss, grads = jax.tree.map(lambda x: x / grad_accum, (total, loss, grads))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
        moe_state = state.moe_state
        metrics = {"loss": loss, "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))}
        if spec.moe is not None:
            if spec.moe.balance == "loss_free":
                counts = {path: values["counts"] for path, values in stats.items()}
                moe_state = moe.update_bias(moe_state, counts, spec.moe.bias_update_rate)
            metrics |= moe.routing_metrics(spec.moe, stats)
            if spec.moe.balance == "aux_loss" or spec.moe.router_z_loss_weight:
                metrics["moe.aux_loss"] = total - loss
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, moe_state=moe_state), metrics

    state_sharding = state_shardings(spec, optimizer, mesh)
    rows, scalar = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(train_step, in_shardings=(state_sharding, rows, scalar),
                   out_shardings=(state_sharding, scalar), donate_argnums=0)


def make_eval_step(spec: ModelSpec, mesh: Mesh) -> Callable:
    """Returns jitted `eval_step(variables, window_BT1, mask_BT) -> (nll_B, count_B)`: each row's
    summed masked nll and token count, float32. Per row, not per batch, so evaluation can measure
    the spread over windows (its standard error); the [B] results are replicated, so every
    process of a multi-host run can read all of them."""

    def eval_step(variables, window_BT1, mask_BT):
        with sharding.activation_sharding(mesh):
            nll_BT = token_nll(variables, spec, window_BT1)
            return (nll_BT * mask_BT).sum(axis=1), mask_BT.sum(axis=1)

    rows, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    variables = state_shardings(spec, optax.identity(), mesh).variables  # no optimizer: params and biases only
    return jax.jit(eval_step, in_shardings=(variables, rows, rows), out_shardings=(replicated, replicated))
