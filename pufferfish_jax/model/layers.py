"""Transformer building blocks: matmul helper, RMSNorm, rotary embeddings, SwiGLU, token embedding.

Mixed precision, one convention for every module here: parameters live in float32 and are cast to
the compute dtype where they are used; every matmul accumulates in float32
(`preferred_element_type`). That is what makes bfloat16 pay on CPU (a bf16-in/bf16-out dot is no
faster than float32 there, bf16-in/f32-out is ~2x) and it keeps long reductions accurate on every
backend. Normalisation statistics and rotary embeddings are computed in float32.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from pufferfish_jax.sharding import constrain

Array = jax.Array


def logical(init, *names: str):
    """`init` whose parameter carries its logical axis names (see sharding.LOGICAL_RULES).

    The names live only in the boxed tree `Module.init` returns; `init_variables` unboxes it, so the
    params handed around are plain arrays and only the sharding code reads the names.
    """
    return nn.with_logical_partitioning(init, names)


def dot(eqn: str, x: Array, w: Array) -> Array:
    """`einsum(eqn, x, w)` in `x`'s dtype with float32 accumulation and a float32 result.

    `w` (a float32 parameter, or an activation) is cast to `x`'s dtype. The float32 result is what
    attention scores and LM-head logits need; weight projections go through `proj`, which rounds.

    The backward pass is written out because autodiff's loses the bf16 speedup: the cotangent of a
    float32 result is float32, and a float32 x bf16 dot runs at float32 speed on CPU. Here both
    backward dots take compute-dtype inputs and accumulate in float32 (measured: bf16 train step
    1.45x faster than with autodiff's VJP), and a float32 `w` gets its gradient unrounded. Requires
    every index of one operand to appear in the other or in the output (true of any matmul or
    attention contraction).
    """
    return _mixed_dot(eqn, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mixed_dot(eqn: str, x: Array, w: Array) -> Array:
    return jnp.einsum(eqn, x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def _mixed_dot_fwd(eqn: str, x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return _mixed_dot(eqn, x, w), (x, w)


def _mixed_dot_bwd(eqn: str, residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, w = residuals
    inputs, out = eqn.split("->")
    x_idx, w_idx = inputs.split(",")
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{out},{w_idx}->{x_idx}", g, w.astype(x.dtype), preferred_element_type=jnp.float32)
    # The weight gradient is produced with x's axes first, then moved into w's order: XLA:CPU runs
    # the tied LM head's 'btd,btv->vd' 1.2-1.4x slower than 'btd,btv->dv' (docs/perf.md). The
    # barrier keeps XLA from folding the transpose back into the dot.
    x_first = "".join(sorted(w_idx, key=lambda a: a not in x_idx))
    dw = jnp.einsum(f"{x_idx},{out}->{x_first}", x, g, preferred_element_type=jnp.float32)
    if x_first != w_idx:
        dw = jnp.einsum(f"{x_first}->{w_idx}", jax.lax.optimization_barrier(dw))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_mixed_dot.defvjp(_mixed_dot_fwd, _mixed_dot_bwd)


def proj(eqn: str, x: Array, w: Array) -> Array:
    """A weight projection: `dot` rounded to `x`'s dtype and named "proj" for remat policies.

    The name is what lets the 'save_dots' policy keep these outputs: `checkpoint_dots_*` policies
    look for dot_general primitives, which the custom VJP above hides from them.
    """
    return checkpoint_name(dot(eqn, x, w).astype(x.dtype), "proj")


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale; statistics in float32, output in `dtype`."""

    eps: float
    dtype: jnp.dtype
    axis_name: str = "embed"  # the logical name of the normalised (last) axis, for sharding

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        scale_D = self.param("scale", logical(nn.initializers.ones, self.axis_name), (x_BTD.shape[-1],), jnp.float32)
        x_BTD = x_BTD.astype(jnp.float32)
        inv_rms_BT1 = jax.lax.rsqrt(jnp.mean(jnp.square(x_BTD), axis=-1, keepdims=True) + self.eps)
        return (x_BTD * inv_rms_BT1 * scale_D).astype(self.dtype)


@functools.lru_cache(maxsize=None)
def rope_table(max_len: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Precomputed (sin_PR, cos_PR) for positions P < max_len and R = head_dim // 2 frequencies.

    Computed once in float64 numpy and embedded as constants: no trig in the compiled step, and
    angles at large positions stay exact before the final rounding to float32.
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq_R = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angle_PR = np.arange(max_len, dtype=np.float64)[:, None] * inv_freq_R[None, :]
    return np.sin(angle_PR).astype(np.float32), np.cos(angle_PR).astype(np.float32)


def rope_angles(positions_BT: Array, max_len: int, head_dim: int, theta: float) -> tuple[Array, Array]:
    """(sin_BTR, cos_BTR) gathered from the table at the given positions."""
    sin_PR, cos_PR = rope_table(max_len, head_dim, theta)
    return jnp.asarray(sin_PR)[positions_BT], jnp.asarray(cos_PR)[positions_BT]


def apply_rope(x_BTNH: Array, sin_BTR: Array, cos_BTR: Array) -> Array:
    """Rotate feature pairs (i, i + H/2) by position-dependent angles (GPT-NeoX "rotate half").

    The half-split pairing needs only contiguous slices (no strided interleave) and is equivalent
    to the interleaved form up to a fixed permutation of the q/k projection columns.
    """
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    sin_BT1R, cos_BT1R = sin_BTR[:, :, None, :], cos_BTR[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos_BT1R - x2 * sin_BT1R, x2 * cos_BT1R + x1 * sin_BT1R], axis=-1)
    return rotated.astype(x_BTNH.dtype)


class SwiGLU(nn.Module):
    """Gated feed-forward: down(silu(x @ gate) * (x @ up)); `out_std` scales the down projection."""

    hidden: int
    init_std: float
    out_std: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        d_model = x_BTD.shape[-1]
        init = logical(nn.initializers.normal(self.init_std), "embed", "mlp")
        w_gate_DF = self.param("w_gate", init, (d_model, self.hidden))
        w_up_DF = self.param("w_up", init, (d_model, self.hidden))
        w_down_FD = self.param("w_down", logical(nn.initializers.normal(self.out_std), "mlp", "embed"),
                               (self.hidden, d_model))
        gate_BTF = constrain(proj("btd,df->btf", x_BTD, w_gate_DF), ("batch", "seq", "mlp"))
        up_BTF = constrain(proj("btd,df->btf", x_BTD, w_up_DF), ("batch", "seq", "mlp"))
        return proj("btf,fd->btd", nn.silu(gate_BTF) * up_BTF, w_down_FD)


class ReLU2(nn.Module):
    """Squared-ReLU feed-forward: down(relu(x @ up)^2) (Primer; modded-nanogpt). Two matrices where
    SwiGLU has three, so `hidden` is 3/2 of SwiGLU's for the same parameters (`ModelSpec.relu2_hidden`)."""

    hidden: int
    init_std: float
    out_std: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        d_model = x_BTD.shape[-1]
        w_up_DF = self.param("w_up", logical(nn.initializers.normal(self.init_std), "embed", "mlp"), (d_model, self.hidden))
        w_down_FD = self.param("w_down", logical(nn.initializers.normal(self.out_std), "mlp", "embed"),
                               (self.hidden, d_model))
        up_BTF = constrain(proj("btd,df->btf", x_BTD, w_up_DF), ("batch", "seq", "mlp"))
        return proj("btf,fd->btd", jnp.square(nn.relu(up_BTF)), w_down_FD)


class Embed(nn.Module):
    """Token embedding table; `attend` reuses it as the (tied) LM head."""

    vocab_size: int
    d_model: int
    init_std: float
    dtype: jnp.dtype

    def setup(self):
        self.embedding = self.param(
            "embedding", logical(nn.initializers.normal(self.init_std), "vocab", "embed"),
            (self.vocab_size, self.d_model), jnp.float32,
        )

    def __call__(self, tokens_BT: Array) -> Array:
        x_BTD = jnp.take(self.embedding, tokens_BT, axis=0).astype(self.dtype)
        return constrain(x_BTD, ("batch", "seq", "embed"))

    def attend(self, x_BTD: Array) -> Array:
        """float32 logits x @ embedding.T."""
        return constrain(dot("btd,vd->btv", x_BTD, self.embedding), ("batch", "seq", "vocab"))
