"""The tied LM head and the mean cross-entropy as one op whose [B*T, V] logits never exist whole.

At the planner's small shapes (2 x d128, vocab 8192) the tied head is two thirds of the FLOPs,
and its dots are thin (contracting over d_model only), so the plain form is bound by memory
traffic over the float32 logits (128 MiB at 4,096 tokens), written by the head, read and
rewritten by the softmax, and read again by both backward dots. Here the tokens go through in
chunks of `chunk` rows: a chunk's logits, log-sum-exp, loss and gradient (softmax - onehot) / n
stay in cache, and the gradients of x and of the embedding are made right there, in the forward
pass, since the mean loss is the last op of the step (its cotangent is a scalar that the
backward just multiplies in). No logits are recomputed (the chunked form that recomputes them,
attempt 4 in docs/perf.md, was slower). Same math as `dot` + optax's cross-entropy, float32
accumulation and compute-dtype dot inputs included; attempt 16 in docs/perf.md has the numbers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 512  # tokens per chunk: 512 x 8192 float32 logits = 16 MiB, in this CPU's L3
# Below this many bytes of float32 logits the plain form is not memory-bound and stays faster
# (measured: 1.44x faster fused at 4,096 x 8,192 = 128 MiB, 0.9x at 1,024 x 8,192 = 32 MiB).
MIN_LOGIT_BYTES = 128 * 2**20


def chunk_for(tokens: int, vocab: int) -> int:
    """The chunk size for `tokens` rows over `vocab` logits: the largest power of two <= CHUNK
    dividing `tokens`, or 0 (use the plain form) when none of 64 or more does or the logits are
    small enough to stay in cache."""
    chunk = math.gcd(tokens, CHUNK)
    return chunk if chunk >= 64 and 4 * tokens * vocab >= MIN_LOGIT_BYTES else 0


def _loss_and_grads(x_BTD, embedding_VD, targets_BT, chunk: int):
    B, T, D = x_BTD.shape
    n = B * T
    x_NCD = x_BTD.reshape(n // chunk, chunk, D)
    y_NC = targets_BT.reshape(n // chunk, chunk)
    w_VD = embedding_VD.astype(x_BTD.dtype)
    vocab = w_VD.shape[0]

    def one_chunk(dw_DV, xy):
        x_CD, y_C = xy
        logits_CV = jnp.einsum("cd,vd->cv", x_CD, w_VD, preferred_element_type=jnp.float32)
        lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
        nll_C = lse_C - jnp.take_along_axis(logits_CV, y_C[:, None], axis=-1)[:, 0]
        g_CV = ((jnp.exp(logits_CV - lse_C[:, None]) - jax.nn.one_hot(y_C, vocab, dtype=jnp.float32)) / n
                ).astype(x_CD.dtype)
        dx_CD = jnp.einsum("cv,vd->cd", g_CV, w_VD, preferred_element_type=jnp.float32)
        dw_DV = dw_DV + jnp.einsum("cd,cv->dv", x_CD, g_CV, preferred_element_type=jnp.float32)
        return dw_DV, (nll_C.sum(), dx_CD.astype(x_CD.dtype))

    dw_DV, (nll_N, dx_NCD) = jax.lax.scan(one_chunk, jnp.zeros((D, vocab), jnp.float32), (x_NCD, y_NC))
    # x's axes first, then moved (see layers._mixed_dot_bwd: XLA:CPU's faster order)
    return nll_N.sum() / n, dx_NCD.reshape(B, T, D), jax.lax.optimization_barrier(dw_DV).T.astype(embedding_VD.dtype)


def tied_head_cross_entropy(x_BTD: jax.Array, embedding_VD: jax.Array, targets_BT: jax.Array, chunk: int) -> jax.Array:
    """mean_t CE(softmax(x_t . embedding^T), target_t) in float32; `chunk` divides B * T."""
    return _fused(chunk, x_BTD, embedding_VD, targets_BT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(chunk, x_BTD, embedding_VD, targets_BT):
    return _loss_and_grads(x_BTD, embedding_VD, targets_BT, chunk)[0]


def _fused_fwd(chunk, x_BTD, embedding_VD, targets_BT):
    loss, dx_BTD, dw_VD = _loss_and_grads(x_BTD, embedding_VD, targets_BT, chunk)
    return loss, (dx_BTD, dw_VD, targets_BT)


def _fused_bwd(chunk, residuals, g):
    dx_BTD, dw_VD, targets_BT = residuals
    return dx_BTD * g.astype(dx_BTD.dtype), dw_VD * g, np.zeros(targets_BT.shape, jax.dtypes.float0)


_fused.defvjp(_fused_fwd, _fused_bwd)
