"""model/fused_head.py: the chunked tied head + cross-entropy equals the plain head and loss."""

import jax
import jax.numpy as jnp
import optax
import pytest

from pufferfish_jax.model.fused_head import chunk_for, tied_head_cross_entropy
from pufferfish_jax.model.layers import dot


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_value_and_gradients_match_the_plain_head_and_loss(dtype, tol):
    x = jax.random.normal(jax.random.key(1), (2, 64, 32), dtype)
    emb = jax.random.normal(jax.random.key(2), (300, 32)) * 0.1
    y = jax.random.randint(jax.random.key(3), (2, 64), 0, 300)

    def plain(x, emb):  # times 3: the cotangent reaching the fused op is not 1
        return 3 * optax.softmax_cross_entropy_with_integer_labels(dot("btd,vd->btv", x, emb), y).mean()

    def fused(x, emb):
        return 3 * tied_head_cross_entropy(x, emb, y, 64)

    (want, (want_dx, want_de)), (got, (got_dx, got_de)) = [
        jax.value_and_grad(f, argnums=(0, 1))(x, emb) for f in (plain, fused)]
    assert got == pytest.approx(float(want), rel=1e-6)
    assert got_dx.dtype == dtype and got_de.dtype == jnp.float32
    scale = float(jnp.abs(want_de).max())
    assert float(jnp.abs(got_de - want_de).max()) <= tol * scale
    assert float(jnp.abs(got_dx.astype(jnp.float32) - want_dx.astype(jnp.float32)).max()) <= \
        tol * float(jnp.abs(want_dx.astype(jnp.float32)).max())


def test_chunk_is_a_power_of_two_dividing_the_tokens_or_none():
    assert chunk_for(16 * 256, 8192) == 512 and chunk_for(3 * 64, 2**18) == 64
    assert chunk_for(4 * 256, 8192) == 0  # 32 MiB of logits stay in cache: the plain form is faster
    assert chunk_for(2 * 63, 2**20) == 0  # no chunk of 64 or more divides it
