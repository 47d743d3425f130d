"""The TPU splash wrapper (layout, GQA grouping, query scaling) against XLA, with the TPU kernel run
in Pallas interpret mode: no TPU is needed, only the wrapper is ours."""

import jax
import jax.numpy as jnp
import numpy as np

from pufferfish_jax.model.attention import xla_attention
from pufferfish_jax.model.kernels.splash import BLOCK, splash_attention


def test_splash_wrapper_matches_xla_outputs_and_gradients():
    B, T, N, K, H = 1, BLOCK, 4, 2, 32
    kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (B, T, N, H))
    k, v = jax.random.normal(kk, (B, T, K, H)), jax.random.normal(kv, (B, T, K, H))
    w = jax.random.normal(kw, (B, T, N, H))

    def loss_and_grads(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v) * w)
        with jax.default_matmul_precision("highest"):
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    want_loss, want_grads = loss_and_grads(xla_attention)
    got_loss, got_grads = loss_and_grads(lambda q, k, v: splash_attention(q, k, v, interpret=True))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
