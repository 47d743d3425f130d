"""The decoder-only Transformer built from a `ModelSpec` (spec.py): blocks, remat, init, parameter
count and FLOP model.

Parameter tree (all float32, no biases):
    embed/embedding [V, D]
    block_{i}/attn_norm/scale [D]
    block_{i}/attn/{w_q [D, N, H], w_k [D, K, H], w_v [D, K, H], w_o [N, H, D]}
    block_{i}/attn/{q_norm/scale [H], k_norm/scale [H]}             (model.qk_norm only)
    block_{i}/mlp_norm/scale [D]
    block_{i}/mlp/{w_gate [D, F], w_up [D, F], w_down [F, D]}        (dense blocks, model.mlp=swiglu)
    block_{i}/mlp/{w_up [D, 3F/2], w_down [3F/2, D]}                 (dense blocks, model.mlp=relu2)
    block_{i}/moe/{router [D, E], w_gate [E, D, Fe], w_up [E, D, Fe], w_down [E, Fe, D],
                   shared/{w_gate [D, S*Fe], w_up [D, S*Fe], w_down [S*Fe, D]}}   (MoE blocks; see model/moe.py)
    final_norm/scale [D]
    lm_head [D, V]                   (untied only)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from pufferfish_jax.model import spec as spec_lib
from pufferfish_jax.model.attention import Attention, KVCache
from pufferfish_jax.model.layers import Embed, ReLU2, RMSNorm, SwiGLU, dot, logical, rope_angles
from pufferfish_jax.model.moe import MOE_STATE, MoE
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.sharding import constrain

Array = jax.Array

# Name -> jax.checkpoint policy; 'none' means the block is not wrapped in remat at all.
# 'save_dots' keeps the weight projection outputs (tagged "proj" in layers.proj; the dots-based
# policies cannot see them through its custom VJP) and recomputes the rest, attention scores
# included: the usual middle ground between memory and recompute.
CHECKPOINT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.save_only_these_names("proj"),
}
assert tuple(CHECKPOINT_POLICIES) == spec_lib.REMAT_POLICIES  # the names users may choose live in spec.py


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    spec: ModelSpec
    layer: int

    @nn.compact
    def __call__(
        self, x_BTD: Array, sin_BTR: Array, cos_BTR: Array, cache: KVCache | None
    ) -> tuple[Array, KVCache | None]:
        spec = self.spec
        dtype = spec.compute_dtype
        h_BTD = RMSNorm(spec.norm_eps, dtype, name="attn_norm")(x_BTD)
        h_BTD, cache = Attention(spec, self.layer, name="attn")(h_BTD, sin_BTR, cos_BTR, cache)
        x_BTD = x_BTD + h_BTD
        h_BTD = RMSNorm(spec.norm_eps, dtype, name="mlp_norm")(x_BTD)
        if spec.is_moe(self.layer):
            ffn = MoE(spec.moe, spec.init_std, spec.out_std, dtype, name="moe")
        elif spec.mlp == "relu2":
            ffn = ReLU2(spec.relu2_hidden, spec.init_std, spec.out_std, dtype, name="mlp")
        else:
            ffn = SwiGLU(spec.ffn_hidden, spec.init_std, spec.out_std, dtype, name="mlp")
        x_BTD = x_BTD + ffn(h_BTD)
        return constrain(x_BTD, ("batch", "seq", "embed")), cache


def remat_block(policy_name: str) -> type[Block]:
    """Block, wrapped in `nn.remat` with the named checkpoint policy unless it is 'none'."""
    if policy_name == "none":
        return Block
    return nn.remat(Block, policy=CHECKPOINT_POLICIES[policy_name])


class Transformer(nn.Module):
    """Llama-style decoder.

    Training / eval: `apply(vars, tokens_BT) -> logits_BTV` (float32), positions 0..T-1.
    Prefill / decode: `apply(vars, tokens_BT, cache=cache) -> (logits_BTV, cache)`: the tokens go to
    cache slots [cache.length, cache.length + T), at rotary positions `positions_BT` (default: the
    same slot indices), and attend to every filled slot up to their own.
    """

    spec: ModelSpec

    @nn.compact
    def __call__(self, tokens_BT: Array, *, cache: KVCache | None = None, positions_BT: Array | None = None):
        spec = self.spec
        T = tokens_BT.shape[1]
        if T > spec.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {spec.seq_len}")
        if positions_BT is None:
            start = 0 if cache is None else cache.length
            positions_BT = start + jnp.arange(T)[None, :]
        sin_BTR, cos_BTR = rope_angles(positions_BT, spec.seq_len, spec.head_dim, spec.rope_theta)

        embed = Embed(spec.vocab_size, spec.d_model, spec.init_std, spec.compute_dtype, name="embed")
        x_BTD = embed(tokens_BT)
        block = remat_block(spec.remat)
        for i in range(spec.num_layers):
            x_BTD, cache = block(spec, i, name=f"block_{i}")(x_BTD, sin_BTR, cos_BTR, cache)
        x_BTD = RMSNorm(spec.norm_eps, spec.compute_dtype, name="final_norm")(x_BTD)

        if spec.tie_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            w_DV = self.param("lm_head", logical(nn.initializers.normal(spec.init_std), "embed", "vocab"),
                              (spec.d_model, spec.vocab_size))
            logits_BTV = constrain(dot("btd,dv->btv", x_BTD, w_DV), ("batch", "seq", "vocab"))
        if spec.logit_softcap:  # float32, like the logits
            logits_BTV = spec.logit_softcap * jnp.tanh(logits_BTV / spec.logit_softcap)
        if cache is None:
            return logits_BTV
        return logits_BTV, cache._replace(length=cache.length + T)


def init_variables(spec: ModelSpec, rng: Array, *, boxed: bool = False) -> tuple[dict, dict]:
    """(params, moe_state): fresh float32 parameters and the MoE routing biases (zeros; an empty
    dict for a dense model). Pure, so `jax.eval_shape` of it gives the abstract tree for free.

    boxed=True keeps every parameter boxed with its logical axis names (`nn.LogicallyPartitioned`):
    `nn.get_partition_spec` of that tree is what the shardings derive from.
    """
    variables = Transformer(spec).init(rng, jnp.zeros((1, 1), jnp.int32))
    params, moe_state = variables["params"], variables.get(MOE_STATE, {})
    return (params, moe_state) if boxed else nn.meta.unbox((params, moe_state))


def _ffn_params(spec: ModelSpec, layer: int, active: bool) -> int:
    """FFN weights of one block; a MoE block counts its router, shared experts and either every
    routed expert or (active) only the top_k a token passes through."""
    D = spec.d_model
    if not spec.is_moe(layer):
        return spec.dense_ffn_params()
    m = spec.moe
    routed = m.top_k if active else m.num_experts
    return D * m.num_experts + 3 * D * m.expert_hidden * (routed + m.num_shared_experts)


def count_params(spec: ModelSpec, embedding: bool = True, active: bool = False) -> int:
    """Exact parameter count, analytic (equals the size of `init_variables`' params).

    embedding=False gives the non-embedding count N of scaling laws: it leaves out the token
    embedding and, when untied, the LM head (both are lookups/readouts whose size tracks V, not
    model capacity). active=True counts, in MoE blocks, only the experts one token uses (the
    top_k routed and the shared ones): what compute scales with, where memory scales with the total.
    """
    D, N, K, H, V = spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size
    per_block = 2 * D + D * N * H + 2 * D * K * H + N * H * D + (2 * H if spec.qk_norm else 0)
    total = spec.num_layers * per_block + sum(_ffn_params(spec, i, active) for i in range(spec.num_layers)) + D
    if embedding:
        total += V * D * (1 if spec.tie_embeddings else 2)
    return total


def flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) at context length `seq_len`.

        6 * P_matmul + 12 * L * T * N * H

    P_matmul = the weights every token multiplies by: per block D*N*H + 2*D*K*H + N*H*D + 3*D*F (a MoE
    block: its router and active experts only), plus the LM head D*V (tied or not; the embedding
    lookup itself is free). Each weight costs 2 FLOPs
    forward and 4 backward. Attention adds q.k and p.v, 2 * 2 * T * N * H forward per layer, times 3
    for training. Not halved for causality (the PaLM MFU convention, so figures compare with
    published ones): the einsum backend computes the full T x S score matrix and masks it; the
    blocked backend (`model.attention=auto` in training) skips the blocks above the diagonal, doing
    (n + 1) / 2n of it for n key blocks, so its MFU counts a little more than it computes. The one
    count behind the planner's time model, the dashboard's MFU and tools/bench_train.py.
    """
    D, N, K, H, V = spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size
    ffn = sum(_ffn_params(spec, i, active=True) for i in range(spec.num_layers))
    matmul_params = spec.num_layers * (D * N * H + 2 * D * K * H + N * H * D) + ffn + D * V
    return 6.0 * matmul_params + 12.0 * spec.num_layers * seq_len * N * H
