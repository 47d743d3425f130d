"""The blocked causal attention (the CPU fast path) against the plain einsum reference: values and
gradients, ragged last blocks, GQA, both compute dtypes, and the backend dispatch that picks it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pufferfish_jax.model.attention import attention, resolve_backend, xla_attention
from pufferfish_jax.model.blocked_attention import causal_attention


def qkv(B, T, N, K, H, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(r, (B, T, n, H), jnp.float32).astype(dtype) for r, n in zip(keys, (N, K, K)))
    cotangent = jax.random.normal(keys[3], (B, T, N, H), jnp.float32)  # a non-uniform output weighting
    return q, k, v, cotangent


def weighted_grads(fn, q, k, v, cotangent):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


# exact blocks, a ragged last block, one block, one-row blocks; GQA groups of 2, MHA, MQA
@pytest.mark.parametrize("T,block,N,K", [(12, 4, 4, 2), (13, 4, 3, 3), (16, 64, 6, 1), (9, 1, 4, 2)])
def test_matches_einsum_reference_float32(T, block, N, K):
    q, k, v, cot = qkv(2, T, N, K, 8, jnp.float32)
    blocked = lambda q, k, v: causal_attention(q, k, v, block=block)
    np.testing.assert_allclose(jax.jit(blocked)(q, k, v), jax.jit(xla_attention)(q, k, v), rtol=2e-5, atol=2e-5)
    (value, grads), (ref_value, ref_grads) = weighted_grads(blocked, q, k, v, cot), weighted_grads(xla_attention, q, k, v, cot)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-4)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4)


def test_bfloat16_close_to_float32_reference():
    q, k, v, cot = qkv(2, 20, 4, 2, 16, jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    blocked = lambda q, k, v: causal_attention(q, k, v, block=8)
    out = jax.jit(blocked)(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), xla_attention(*f32), rtol=3e-2, atol=3e-2)
    (_, grads), (_, ref_grads) = weighted_grads(blocked, q, k, v, cot), weighted_grads(xla_attention, *f32, cot)
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == jnp.bfloat16
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(g.astype(jnp.float32) / scale, ref / scale, atol=3e-2)


def test_auto_dispatch_uses_blocked_for_self_attention_and_einsum_for_cache_reads():
    q, k, v, _ = qkv(1, 10, 4, 2, 8, jnp.float32)
    assert resolve_backend("auto", q, k) == "blocked"  # this test runs on CPU
    assert resolve_backend("auto", q, k, cached=True) == "xla"
    np.testing.assert_allclose(attention(q, k, v), xla_attention(q, k, v), rtol=2e-5, atol=2e-5)
    # A query block at cache offset 3 over 10 slots: the blocked path does not apply; same rule as the reference.
    out = attention(q[:, :4], k, v, q_start=3, backend="blocked")
    np.testing.assert_allclose(out, xla_attention(q[:, :4], k, v, q_start=3), rtol=1e-6, atol=1e-6)
