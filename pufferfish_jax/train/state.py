"""Train state, the AdamW transform and the learning-rate schedule.

The learning rate is not baked into the optimizer: the loop computes it on the host from
(step, total_steps) and passes it to the step as a scalar. A budgeted run re-fits total_steps as
it learns the real step time, and the schedule must follow that without recompiling anything.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from pufferfish_jax import sharding
from pufferfish_jax.config import peak_lr
from pufferfish_jax.model.moe import MOE_STATE
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.model.transformer import init_variables
from pufferfish_jax.train.muon import make_muon


class TrainState(struct.PyTreeNode):
    """`moe_state` holds the MoE routing biases ({} for a dense model): state the train step
    updates itself, outside `params`, so no gradient, optimizer or weight decay ever touches it.
    It is checkpointed with the rest."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    moe_state: dict = struct.field(default_factory=dict)

    @property
    def variables(self) -> dict:
        """What `Transformer.apply` needs: the params and the routing state."""
        return {"params": self.params, MOE_STATE: self.moe_state}


def _decay_mask(params: dict) -> dict:
    """Weight decay on matrices only: norms (1-D) and the embedding stay undecayed."""

    def decays(path, leaf) -> bool:
        names = "/".join(str(getattr(p, "key", p)) for p in path).lower()
        return leaf.ndim >= 2 and "embed" not in names

    return jax.tree_util.tree_map_with_path(decays, params)


def adamw_direction(train_cfg: ml_collections.ConfigDict) -> list[optax.GradientTransformation]:
    """AdamW without the learning rate: the Adam direction plus the masked decoupled decay."""
    return [optax.scale_by_adam(b1=train_cfg.beta1, b2=train_cfg.beta2, eps=1e-8),
            optax.add_decayed_weights(train_cfg.weight_decay, mask=_decay_mask)]


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The update direction without the learning rate: the step scales it by -lr.

    optimizer=adamw: clipping then AdamW on every parameter (the state layout checkpoints of
    earlier versions hold). optimizer=muon: clipping, then Muon on the hidden matrices and AdamW
    on the rest (train/muon.py).
    """
    if train_cfg.get("optimizer", "adamw") == "muon":
        return make_muon(train_cfg, optax.chain(*adamw_direction(train_cfg)))
    parts = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip > 0 else []
    return optax.chain(*parts, *adamw_direction(train_cfg))


def init_state(spec: ModelSpec, optimizer: optax.GradientTransformation, rng: jax.Array, *,
               boxed: bool = False) -> TrainState:
    """A fresh state of plain arrays; pure, so `jax.eval_shape` of it is the abstract state.

    boxed=True keeps every parameter, and every optimizer moment shaped like one, boxed with its
    logical axis names (optax maps over the boxes, so the moments inherit them): what the
    shardings derive from. The MoE routing biases are never boxed, so they are replicated.
    """
    params, moe_state = init_variables(spec, rng, boxed=True)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       moe_state=nn.meta.unbox(moe_state))
    return state if boxed else nn.meta.unbox(state)


def state_shardings(spec: ModelSpec, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Where every leaf of the state lives on `mesh`, from the logical names (no allocation)."""
    boxed = jax.eval_shape(functools.partial(init_state, spec, optimizer, boxed=True), jax.random.key(0))
    return sharding.tree_shardings(nn.get_partition_spec(boxed), nn.meta.unbox(boxed), mesh)


# XLA:CPU compiles the init (threefry and the truncated normals, unrolled per parameter) at this
# LLVM level instead of the default: the values are bit-identical and it runs as fast, but it
# compiles in 1.1-1.3 s instead of 2.8-3.1 at 2 layers x d128 (3.7 instead of 5.4-6.3 at
# 8 x d512), and every fresh run pays that compile before its first step. Level 0 would compile
# no faster and ran the 8 x d512 init 7x slower.
_CPU_INIT_OPTIONS = {"xla_backend_optimization_level": 1}


def create_state(spec: ModelSpec, optimizer: optax.GradientTransformation, seed: int, mesh: Mesh) -> TrainState:
    """A fresh state born sharded: each device initializes only its own shards (nothing is built
    whole on one device first). Same seed -> same values whatever the mesh."""
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    init = jax.jit(lambda: init_state(spec, optimizer, jax.random.key(seed)),
                   out_shardings=state_shardings(spec, optimizer, mesh),
                   compiler_options=_CPU_INIT_OPTIONS if on_cpu else None)
    return init()


def with_params(state: TrainState, params: dict) -> TrainState:
    """`state` with `params` (host arrays, the same tree and shapes: imported weights) in place of
    its own, each laid out as the state's own leaf. The optimizer's moments are zeros whatever the
    values, so the rest of a fresh state stays valid."""
    def place(new, old: jax.Array) -> jax.Array:
        new = np.asarray(new, old.dtype)
        if new.shape != old.shape:
            raise ValueError(f"initial parameter of shape {new.shape} where the model has {old.shape}")
        return jax.make_array_from_callback(old.shape, old.sharding, lambda index: new[index])

    return state.replace(params=jax.tree.map(place, params, state.params))


def abstract_state(spec: ModelSpec, optimizer: optax.GradientTransformation, mesh: Mesh | None = None) -> TrainState:
    """Shapes, dtypes and shardings of the state without allocating it: the restore target.

    The shardings are this run's, not the saving run's, so Orbax reshards on restore: a
    checkpoint saved under one mesh restores under another, or on one device (the default).
    """
    mesh = mesh or sharding.single_device_mesh()
    shapes = jax.eval_shape(lambda: init_state(spec, optimizer, jax.random.key(0)))
    return jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                        shapes, state_shardings(spec, optimizer, mesh))


def learning_rate(progress: float, train_cfg: ml_collections.ConfigDict, warmdown_from: float | None = None) -> float:
    """The scheduled learning rate of a step whose progress is (step + 1) / total steps.

    Both schedules warm up linearly over the first warmup_fraction. cosine then decays to
    min_lr_ratio * peak at progress 1. wsd holds the peak, then decays linearly to zero from
    progress `warmdown_from` to 1: by default 1 - warmdown_fraction (a steps= run); a budgeted run
    passes the progress at which the clock said the warmdown was due (math.inf: not yet), which
    the loop records with every checkpoint so a resumed run gets the same rates.

    Keyed to progress, not steps, so that a budgeted run, whose total is re-fitted to the clock,
    can keep the schedule monotone: the loop never lets progress go backwards, and whatever the
    re-fits did, the last step has progress 1, so the run ends at the floor.
    """
    progress = min(max(progress, 0.0), 1.0)
    peak, warmup = peak_lr(train_cfg), train_cfg.warmup_fraction
    rise = progress / warmup if progress < warmup else 1.0
    if train_cfg.get("schedule", "cosine") == "wsd":
        start = 1.0 - train_cfg.warmdown_fraction if warmdown_from is None else warmdown_from
        done = 1.0 if progress >= 1.0 else max(0.0, (progress - start) / max(1.0 - start, 1e-9))
        return peak * min(rise, 1.0 - done)
    if progress < warmup:
        return peak * rise
    floor = peak * train_cfg.min_lr_ratio
    decay = (progress - warmup) / max(1.0 - warmup, 1e-9)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * decay))
