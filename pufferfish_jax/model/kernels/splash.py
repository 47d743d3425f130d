"""Thin wrapper over JAX's TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`).

Only the layout is ours: [B, T, N, H] with GQA in, splash's per-kv-head MQA kernel (queries
[G, T, H] against one key/value head [T, H]) vmapped over batch and kv heads. Splash does not
scale queries, so they are scaled here. The model selects it on TPU only (`model/attention.py`
imports this module lazily); tests run it interpreted on CPU.
"""

import functools

import jax

Array = jax.Array

# Splash tiles the sequence in blocks of this many tokens (its default block size).
BLOCK = 128


def splash_supported(seq_len: int) -> bool:
    """Whether splash can take this shape: the sequence must tile into its blocks."""
    return seq_len % BLOCK == 0


@functools.lru_cache(maxsize=None)
def _kernel(groups: int, seq_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * groups)
    return splash.make_splash_mqa_single_device(mask, interpret=interpret)


def splash_attention(q_BTNH: Array, k_BTKH: Array, v_BTKH: Array, *, interpret: bool = False) -> Array:
    """Causal GQA attention through splash; returns o_BTNH. `interpret` runs the TPU kernel in
    Pallas interpret mode on any platform (how the tests check this wrapper without a TPU)."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    kernel = _kernel(N // K, T, interpret)
    q_BKGTH = (q_BTNH * H**-0.5).reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
    o_BKGTH = jax.vmap(jax.vmap(kernel))(q_BKGTH, k_BKTH, v_BKTH)
    return o_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)
