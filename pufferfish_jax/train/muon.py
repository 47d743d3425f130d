"""Muon for the hidden matrices, AdamW for the rest, routed by parameter path.

Muon (Jordan et al., modded-nanogpt) replaces each hidden matrix's update by its momentum,
orthogonalized with a few Newton-Schulz iterations: every singular direction moves by about the
same amount. It is defined for matrices that map one hidden space to another, so it gets exactly
the attention projections and the FFN matrices (per expert in a MoE block); the embedding, the LM
head, the norms and the MoE routers stay on AdamW. optax's `optax.contrib.muon` would route by rank
(every 2-D leaf, the embedding and the head included) and bakes a learning rate in, so this builds
the same pieces (`scale_by_muon`, `scale_by_shape`) into an `optax.multi_transform` over our labels.

The learning rate stays outside, as for AdamW (train/state.py): the step multiplies every update
by the scheduled `lr`, whose peak is the AdamW group's (`config.peak_lr`); the Muon branch is
pre-scaled by `muon_lr / peak`, so its rate follows the same schedule with peak `train.muon_lr`.

Our attention weights are 3-D ([D, N, H], [N, H, D]) and the experts' 3-D ([E, D, F]);
`MuonDimensionNumbers` says which axes are the matrix's rows (reduction) and columns (output);
the remaining leading axis of an expert weight is a batch axis, so each expert is orthogonalized
on its own (optax vmaps over it).
"""

from __future__ import annotations

import jax
import ml_collections
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon
from optax.contrib._muon import scale_by_shape  # what optax.contrib.muon chains after scale_by_muon; not re-exported

from pufferfish_jax.config import peak_lr

# Leaf names of the matrices Muon updates; any other leaf (embedding, lm_head, scale, router) is AdamW's.
MUON_LEAVES = ("w_q", "w_k", "w_v", "w_o", "w_gate", "w_up", "w_down")


def _names(path) -> tuple[str, ...]:
    """Dict keys along a tree path (a boxed tree's `.value` attribute steps are skipped)."""
    return tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def is_muon_path(names: tuple[str, ...]) -> bool:
    return bool(names) and names[-1] in MUON_LEAVES


def param_labels(params) -> dict:
    """'muon' or 'adam' for every leaf, from its path."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "muon" if is_muon_path(_names(path)) else "adam", params)


def dimension_numbers(names: tuple[str, ...], ndim: int) -> MuonDimensionNumbers:
    """Rows and columns of a Muon leaf as a matrix: x @ W contracts the rows (fan-in).

    w_q/w_k/w_v [D, N, H] -> D x (N*H); w_o [N, H, D] -> (N*H) x D; a 2-D FFN matrix as it is;
    an expert's [E, D, F] or [E, F, D] -> E matrices (axis 0 is a batch axis).
    """
    if names[-1] in ("w_q", "w_k", "w_v"):
        return MuonDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    if names[-1] == "w_o":
        return MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
    if ndim == 3:
        return MuonDimensionNumbers(reduction_axis=1, output_axis=2)
    return MuonDimensionNumbers(reduction_axis=0, output_axis=1)


def _dimension_numbers_tree(updates):
    """The Muon branch's tree of MuonDimensionNumbers (masked-out leaves stay MaskedNode: no leaves)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: dimension_numbers(_names(path), x.ndim), updates)


def muon_direction(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The Muon branch without the learning rate: Nesterov momentum, Newton-Schulz
    orthogonalization, optax's shape scaling sqrt(max(1, fan_out / fan_in)), decoupled weight decay,
    and the muon_lr / peak ratio (see the module docstring)."""
    return optax.chain(
        scale_by_muon(beta=train_cfg.muon_beta, weight_dimension_numbers=_dimension_numbers_tree),
        scale_by_shape(weight_dimension_numbers=_dimension_numbers_tree),
        optax.add_decayed_weights(train_cfg.muon_weight_decay),
        optax.scale(train_cfg.muon_lr / peak_lr(train_cfg)),
    )


def make_muon(train_cfg: ml_collections.ConfigDict, adam: optax.GradientTransformation) -> optax.GradientTransformation:
    """Gradient clipping over the whole gradient, then Muon on the hidden matrices and `adam` (the
    AdamW direction, train/state.py) on everything else."""
    parts = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip > 0 else []
    parts.append(optax.multi_transform({"muon": muon_direction(train_cfg), "adam": adam}, param_labels))
    return optax.chain(*parts)
