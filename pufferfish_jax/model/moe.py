"""Mixture of experts with auxiliary-loss-free load balancing, as in DeepSeek-V3.

Routing, per token, in float32: router logits -> scores (sigmoid or softmax) -> the top-k of
`scores + bias` choose the experts -> the gates are the chosen experts' *unbiased* scores
(renormalised over the k for sigmoid scores, which do not sum to one). The bias only steers the
choice; it never scales an expert's output, so balancing does not distort what the model computes.

The bias is state, not a parameter: it lives in the `moe_state` variable collection, gets no
gradient and is never seen by the optimizer or weight decay. The train step moves it after each
optimizer step by `rate * sign(mean_load - load_e)`, from each layer's own routing counts summed
over the step's whole batch (`update_bias`). The counts, and what the metrics and the optional
auxiliary losses need, are sown into the `moe_stats` collection when the caller makes it mutable
(the train step does; eval and generation do not, and pay nothing for it).

Dispatch, both with static shapes under jit and the same results:
  dense   every expert runs on every token and the combine weights are zero where a token did not
          choose it: no gather or sort, best for few experts (cost E / k of the routed work).
  sorted  the (token, expert) assignments are sorted by expert; with a capacity the tokens are
          gathered into an [E, C, D] buffer for one batched matmul per weight, dropless
          (capacity_factor 0) they go through `jax.lax.ragged_dot`, a grouped matmul.
  auto    the cheaper of the two on this backend (`resolve_dispatch`).
Shared experts run on every token, outside the router.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from pufferfish_jax.model.layers import SwiGLU, dot, logical, proj
from pufferfish_jax.model.spec import MoESpec

Array = jax.Array

MOE_STATE = "moe_state"  # the per-expert routing bias of every MoE layer
MOE_STATS = "moe_stats"  # routing statistics sown during a training forward pass


def resolve_dispatch(spec: MoESpec, backend: str | None = None) -> str:
    """'dense' or 'sorted' for spec.dispatch == 'auto'.

    Capacity-limited, sorted computes capacity_factor * k expert rows per token against dense's
    E, so it wins once that is fewer. Dropless, sorted needs `ragged_dot`, a grouped matmul on
    GPU and TPU but on CPU about 3x slower than running every expert densely (measured with 8
    experts): there, dense.
    """
    if spec.dispatch != "auto":
        return spec.dispatch
    if spec.capacity_factor > 0:
        return "sorted" if spec.capacity_factor * spec.top_k < spec.num_experts else "dense"
    backend = backend or jax.default_backend()
    return "sorted" if backend != "cpu" and spec.num_experts > 2 * spec.top_k else "dense"


def route(logits_NE: Array, bias_E: Array, spec: MoESpec) -> tuple[Array, Array, Array]:
    """(experts_NK, gates_NK, probs_NE): the k experts chosen by scores + bias, their gates from
    the unbiased scores, and the scores normalised to a distribution (for entropy and aux loss)."""
    logits_NE = logits_NE.astype(jnp.float32)
    if spec.score == "sigmoid":
        scores_NE = jax.nn.sigmoid(logits_NE)
        probs_NE = scores_NE / jnp.sum(scores_NE, axis=-1, keepdims=True)
    else:
        scores_NE = probs_NE = jax.nn.softmax(logits_NE, axis=-1)
    _, experts_NK = jax.lax.top_k(scores_NE + jax.lax.stop_gradient(bias_E), spec.top_k)
    gates_NK = jnp.take_along_axis(scores_NE, experts_NK, axis=-1)
    if spec.score == "sigmoid":
        gates_NK = gates_NK / jnp.sum(gates_NK, axis=-1, keepdims=True)
    return experts_NK, gates_NK, probs_NE


def sort_assignments(experts_A: Array, num_experts: int) -> tuple[Array, Array, Array]:
    """(order_A, counts_E, rank_A): the permutation that sorts the assignments by expert (stable,
    so earlier tokens come first), each expert's count, and each sorted assignment's position
    within its expert. Capacity drops the assignments whose rank reaches it."""
    order_A = jnp.argsort(experts_A, stable=True)
    counts_E = jnp.bincount(experts_A, length=num_experts).astype(jnp.int32)
    starts_E = jnp.cumsum(counts_E) - counts_E
    rank_A = jnp.arange(experts_A.shape[0], dtype=jnp.int32) - starts_E[experts_A[order_A]]
    return order_A, counts_E, rank_A


def _swiglu_experts(x_ECD: Array, w_gate_EDF: Array, w_up_EDF: Array, w_down_EFD: Array) -> Array:
    h_ECF = nn.silu(proj("ecd,edf->ecf", x_ECD, w_gate_EDF)) * proj("ecd,edf->ecf", x_ECD, w_up_EDF)
    return proj("ecf,efd->ecd", h_ECF, w_down_EFD)


def _dense_dispatch(x_ND, experts_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD) -> Array:
    """Every expert on every token; the combine weight is zero where the token did not choose it.

    The experts are laid side by side ([D, E*F]) so each projection is one plain matmul, and the
    combine weights scale the hidden units before the down projection (it is linear, so that is
    the weighted sum of the experts' outputs). Plain matmuls also keep to what XLA:CPU runs in
    bf16: it has no bf16 kernel for some batched-dot layouts its optimiser picks.
    """
    (N, D), (E, _, F) = x_ND.shape, w_gate_EDF.shape
    combine_NE = jnp.sum(jax.nn.one_hot(experts_NK, E, dtype=jnp.float32) * weights_NK[..., None], axis=1)
    w_gate_DG = w_gate_EDF.transpose(1, 0, 2).reshape(D, E * F)
    w_up_DG = w_up_EDF.transpose(1, 0, 2).reshape(D, E * F)
    h_NG = nn.silu(proj("nd,dg->ng", x_ND, w_gate_DG)) * proj("nd,dg->ng", x_ND, w_up_DG)
    h_NG = (h_NG.reshape(N, E, F) * combine_NE[:, :, None]).astype(x_ND.dtype).reshape(N, E * F)
    return dot("ng,gd->nd", h_NG, w_down_EFD.reshape(E * F, D))


def _sorted_dispatch(x_ND, experts_NK, weights_NK, order_A, counts_E, rank_A, capacity,
                     w_gate_EDF, w_up_EDF, w_down_EFD) -> Array:
    """Assignments sorted by expert; gathered into [E, C, D] slots, or grouped by ragged_dot when
    every assignment is kept (capacity None)."""
    N, K = experts_NK.shape
    E, D = w_gate_EDF.shape[0], x_ND.shape[-1]
    token_A = order_A // K  # the token of each sorted assignment
    if capacity is None:
        x_AD = x_ND[token_A]
        dtype = x_ND.dtype

        def grouped(lhs, w):
            return jax.lax.ragged_dot(lhs, w.astype(dtype), counts_E, preferred_element_type=jnp.float32).astype(dtype)

        y_AD = grouped(nn.silu(grouped(x_AD, w_gate_EDF)) * grouped(x_AD, w_up_EDF), w_down_EFD)
    else:
        C = capacity
        expert_A = experts_NK.reshape(-1)[order_A]
        slot_A = jnp.where(rank_A < C, expert_A * C + rank_A, E * C)  # E * C: the overflow slot
        token_of_slot = jnp.full((E * C + 1,), N, jnp.int32).at[slot_A].set(token_A)[: E * C]
        x_pad = jnp.concatenate([x_ND, jnp.zeros((1, D), x_ND.dtype)])  # row N: an empty slot reads zeros
        y_ECD = _swiglu_experts(x_pad[token_of_slot].reshape(E, C, D), w_gate_EDF, w_up_EDF, w_down_EFD)
        y_AD = jnp.concatenate([y_ECD.reshape(E * C, D), jnp.zeros((1, D), y_ECD.dtype)])[slot_A]
    inverse_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(order_A.shape[0], dtype=order_A.dtype))
    y_NKD = y_AD[inverse_A].reshape(N, K, D)
    return jnp.einsum("nkd,nk->nd", y_NKD, weights_NK, preferred_element_type=jnp.float32)


class MoE(nn.Module):
    """Routed experts plus shared experts, in place of a block's SwiGLU FFN.

    Params: router [D, E] (float32, used in float32), w_gate/w_up [E, D, F], w_down [E, F, D],
    shared/{w_gate, w_up, w_down} (one SwiGLU of width num_shared_experts * F, which equals the
    sum of that many experts). State: moe_state/bias [E].
    """

    spec: MoESpec
    init_std: float
    out_std: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        spec = self.spec
        B, T, D = x_BTD.shape
        E, F, K = spec.num_experts, spec.expert_hidden, spec.top_k
        init = nn.initializers.normal(self.init_std)
        w_router_DE = self.param("router", logical(init, "embed", "expert"), (D, E))
        w_gate_EDF = self.param("w_gate", logical(init, "expert", "embed", "mlp"), (E, D, F))
        w_up_EDF = self.param("w_up", logical(init, "expert", "embed", "mlp"), (E, D, F))
        w_down_EFD = self.param("w_down", logical(nn.initializers.normal(self.out_std), "expert", "mlp", "embed"), (E, F, D))
        bias_E = self.variable(MOE_STATE, "bias", jnp.zeros, (E,), jnp.float32).value

        x_ND = x_BTD.reshape(B * T, D)
        N = B * T
        logits_NE = jnp.einsum("nd,de->ne", x_ND.astype(jnp.float32), w_router_DE)
        experts_NK, gates_NK, probs_NE = route(logits_NE, bias_E, spec)
        order_A, counts_E, rank_A = sort_assignments(experts_NK.reshape(-1), E)
        capacity = spec.capacity(N)
        kept_A = rank_A < capacity  # in sorted order
        keep_NK = jnp.zeros((N * K,), bool).at[order_A].set(kept_A).reshape(N, K)
        weights_NK = gates_NK * keep_NK

        if resolve_dispatch(spec) == "dense":
            y_ND = _dense_dispatch(x_ND, experts_NK, weights_NK, w_gate_EDF, w_up_EDF, w_down_EFD)
        else:
            y_ND = _sorted_dispatch(x_ND, experts_NK, weights_NK, order_A, counts_E, rank_A,
                                    None if spec.capacity_factor == 0 else capacity, w_gate_EDF, w_up_EDF, w_down_EFD)
        y_BTD = y_ND.astype(self.dtype).reshape(B, T, D)
        if spec.num_shared_experts:
            shared = SwiGLU(spec.num_shared_experts * F, self.init_std, self.out_std, self.dtype, name="shared")
            y_BTD = y_BTD + shared(x_BTD)

        # Statistics for the train step (no-ops unless MOE_STATS is mutable).
        self.sow(MOE_STATS, "counts", counts_E)
        self.sow(MOE_STATS, "kept", jnp.sum(kept_A, dtype=jnp.int32))
        self.sow(MOE_STATS, "entropy_sum", -jnp.sum(probs_NE * jnp.log(jnp.maximum(probs_NE, 1e-30))))
        load_fraction_E = jax.lax.stop_gradient(counts_E / (N * K))
        self.sow(MOE_STATS, "balance_loss", E * jnp.sum(load_fraction_E * jnp.mean(probs_NE, axis=0)))
        self.sow(MOE_STATS, "z_loss", jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1))))
        return y_BTD


def layer_stats(collections: dict) -> dict[tuple[str, ...], dict[str, Array]]:
    """{module path: {stat name: value}} from the variables `apply(..., mutable=[MOE_STATS])` returned."""
    flat = traverse_util.flatten_dict(collections.get(MOE_STATS, {}))
    by_layer: dict[tuple[str, ...], dict[str, Array]] = {}
    for path, values in flat.items():
        by_layer.setdefault(path[:-1], {})[path[-1]] = values[0]
    return by_layer


def layer_index(path: tuple[str, ...]) -> int:
    """The block number of a MoE module path such as ('block_3', 'moe')."""
    return int(path[0].rsplit("_", 1)[1])


def auxiliary_loss(spec: MoESpec | None, stats: dict) -> Array:
    """The weighted balance loss (Switch style, balance='aux_loss') and router z-loss, summed over layers."""
    total = jnp.zeros((), jnp.float32)
    if spec is None:
        return total
    for values in stats.values():
        if spec.balance == "aux_loss":
            total += spec.aux_loss_weight * values["balance_loss"]
        if spec.router_z_loss_weight:
            total += spec.router_z_loss_weight * values["z_loss"]
    return total


def update_bias(moe_state: dict, counts: dict[tuple[str, ...], Array], rate: float) -> dict:
    """Each layer's bias += rate * sign(mean load - load), from that layer's own counts.

    Overloaded experts become less likely to be chosen, underloaded ones more; `counts` maps a
    module path (as `layer_stats` gives it) to the assignment counts of its experts.
    """
    flat = traverse_util.flatten_dict(moe_state)
    updated = {}
    for path, bias_E in flat.items():
        load_E = counts[path[:-1]].astype(jnp.float32)
        updated[path] = bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)
    return traverse_util.unflatten_dict(updated)


def routing_metrics(spec: MoESpec, stats: dict[tuple[str, ...], dict[str, Array]]) -> dict[str, Array]:
    """Per MoE layer i: moe.{i}.max_load (max / mean expert load), moe.{i}.dropped (fraction of
    assignments over capacity) and moe.{i}.entropy (mean router entropy, nats); `stats` holds
    counts, kept and entropy_sum summed over the step."""
    metrics = {}
    for path, values in stats.items():
        i = layer_index(path)
        load_E = values["counts"].astype(jnp.float32)
        assignments = jnp.sum(load_E)
        metrics[f"moe.{i}.max_load"] = jnp.max(load_E) / jnp.mean(load_E)
        metrics[f"moe.{i}.dropped"] = 1.0 - values["kept"] / assignments
        metrics[f"moe.{i}.entropy"] = values["entropy_sum"] / (assignments / spec.top_k)
    return metrics
