"""Train state, the AdamW transform and the learning-rate schedule.

The learning rate is not baked into the optimizer: the loop computes it on the host from
(step, total_steps) and passes it to the step as a scalar. A budgeted run re-fits total_steps as
it learns the real step time, and the schedule must follow that without recompiling anything.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from pufferfish_jax.model.transformer import ModelSpec, init_params


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def _decay_mask(params: dict) -> dict:
    """Weight decay on matrices only: norms (1-D) and the embedding stay undecayed."""

    def decays(path, leaf) -> bool:
        names = "/".join(str(getattr(p, "key", p)) for p in path).lower()
        return leaf.ndim >= 2 and "embed" not in names

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW direction without the learning rate: the step scales the update by -lr."""
    parts = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip > 0 else []
    parts += [
        optax.scale_by_adam(b1=train_cfg.beta1, b2=train_cfg.beta2, eps=1e-8),
        optax.add_decayed_weights(train_cfg.weight_decay, mask=_decay_mask),
    ]
    return optax.chain(*parts)


def init_state(spec: ModelSpec, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    params = init_params(spec, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def abstract_state(spec: ModelSpec, optimizer: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of the state without allocating it: the restore target."""
    return jax.eval_shape(lambda: init_state(spec, optimizer, jax.random.key(0)))


def learning_rate(step: int, total_steps: int, train_cfg: ml_collections.ConfigDict) -> float:
    """Linear warmup, then cosine decay from the peak to min_lr_ratio * peak at total_steps."""
    total_steps = max(total_steps, 1)
    warmup = max(1, round(train_cfg.warmup_fraction * total_steps))
    peak, floor = train_cfg.lr, train_cfg.lr * train_cfg.min_lr_ratio
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
