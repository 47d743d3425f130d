"""The Pallas flash attention against the XLA reference, its causal mask, and backend dispatch.

On CPU the kernels run in Pallas interpret mode; on a GPU the same tests run them compiled through
Triton (tools/gpu_check.sh). Shapes are tiny because interpretation is slow; the cases cover every
sequence length (neither a multiple of the 64-token block), kv head count (1, 2, all) and head dim
(32, 64, 128) and both dtypes at least once, not as a full product.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pufferfish_jax.model import attention as attention_mod
from pufferfish_jax.model.attention import (AttentionBackendError, attention, fastest_backend, resolve_backend,
                                            xla_attention)
from pufferfish_jax.model.kernels.flash_attention import flash_attention
from pufferfish_jax.model.transformer import Transformer, init_variables
from pufferfish_jax.model.spec import ModelSpec

# The Pallas kernel runs in interpret mode on CPU: correct, but seconds per case. The full suite
# (`just test`, CI) runs these; the edit loop (`just test-fast`) leaves them out.
pytestmark = pytest.mark.slow

N_HEADS = 4
# Largest |kernel - float32 reference| over the reference's largest |value|, per input dtype.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _inputs(B, T, K, H, dtype, seed=0):
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, N_HEADS, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, T, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, T, K, H), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (B, T, N_HEADS, H), jnp.float32)  # a random cotangent for the outputs
    return q, k, v, w


def _output_and_grads(fn, q, k, v, w):
    """(o, dq, dk, dv) of sum(fn(q, k, v) * w), all float32, in one compiled call."""

    def loss(q, k, v):
        o = fn(q, k, v).astype(jnp.float32)
        return jnp.sum(o * w), o

    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(x, np.float32) for x in (o, *grads)]


def _reference(q, k, v, w):
    """XLA attention in float32 on the same (possibly bf16-rounded) inputs, full-precision matmuls."""
    with jax.default_matmul_precision("highest"):
        return _output_and_grads(xla_attention, *(x.astype(jnp.float32) for x in (q, k, v)), w)


def _assert_close(got, want, tol):
    for name, g, r in zip(("o", "dq", "dk", "dv"), got, want):
        err = np.max(np.abs(g - r)) / np.max(np.abs(r))
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("B, T, K, H, dtype", [
    (2, 40, 1, 32, jnp.float32),
    (1, 96, 2, 64, jnp.bfloat16),
    (1, 96, N_HEADS, 128, jnp.float32),
    (1, 40, N_HEADS, 128, jnp.bfloat16),
])
def test_flash_matches_xla_outputs_and_gradients(B, T, K, H, dtype):
    q, k, v, w = _inputs(B, T, K, H, dtype)
    got = _output_and_grads(flash_attention, q, k, v, w)
    _assert_close(got, _reference(q, k, v, w), TOLERANCE[dtype])


def test_flash_with_unequal_blocks():
    """Several blocks of each size, so the causal block bounds are exercised off the diagonal too."""
    q, k, v, w = _inputs(1, 40, 2, 32, jnp.float32, seed=1)
    got = _output_and_grads(lambda q, k, v: flash_attention(q, k, v, block_q=32, block_k=16), q, k, v, w)
    _assert_close(got, _reference(q, k, v, w), TOLERANCE[jnp.float32])


def test_flash_is_causal():
    """Changing the keys and values from position 20 on leaves outputs before 20 bit-identical and
    changes those after; the first output is the first value (it sees only itself)."""
    q, k, v, _ = _inputs(1, 40, 2, 32, jnp.float32, seed=2)
    later = jnp.arange(40)[None, :, None, None] >= 20
    k2, v2 = jnp.where(later, -k, k), jnp.where(later, v + 1.0, v)
    fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, block_q=16, block_k=16))
    o, o2 = np.asarray(fn(q, k, v)), np.asarray(fn(q, k2, v2))
    np.testing.assert_array_equal(o[:, :20], o2[:, :20])
    assert np.all(np.abs(o[:, 20:] - o2[:, 20:]).max(axis=(0, 2, 3)) > 1e-3)
    np.testing.assert_allclose(o[0, 0], np.repeat(np.asarray(v[0, 0]), N_HEADS // 2, axis=0), rtol=1e-5, atol=1e-6)


def test_model_with_pallas_matches_xla():
    spec = ModelSpec(vocab_size=64, num_layers=1, d_model=32, num_heads=4, num_kv_heads=2, head_dim=16,
                     ffn_hidden=64, seq_len=20, dtype="float32", attention="xla", init_std=0.2)
    params = jax.jit(init_variables, static_argnums=0)(spec, jax.random.key(0))[0]
    tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, 64)

    def loss_and_grads(spec):
        loss = lambda p: jnp.mean(Transformer(spec).apply({"params": p}, tokens) ** 2)
        with jax.default_matmul_precision("highest"):
            return jax.jit(jax.value_and_grad(loss))(params)

    want_loss, want_grads = loss_and_grads(spec)
    got_loss, got_grads = loss_and_grads(ModelSpec(**{**spec.__dict__, "attention": "pallas"}))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# --- dispatch ---------------------------------------------------------------------------------------

def _qk(T, H=64, dtype=jnp.bfloat16):
    return jnp.zeros((1, T, 4, H), dtype), jnp.zeros((1, T, 2, H), dtype)


@pytest.fixture
def platform(monkeypatch):
    """Pretend to be on another platform; the auto measurement is replaced by a recorder."""
    asked = []

    def pretend(name):
        monkeypatch.setattr(attention_mod, "_platform", lambda: name)
        monkeypatch.setattr(attention_mod, "fastest_backend", lambda candidates, *shape: asked.append(candidates) or "pallas")
        return asked

    return pretend


def test_auto_on_cpu_is_blocked(platform):
    platform("cpu")
    assert resolve_backend("auto", *_qk(1024)) == "blocked"
    assert resolve_backend("auto", *_qk(1024), cached=True) == "xla"


def test_auto_on_gpu_races_what_runs_for_long_sequences(platform):
    asked = platform("gpu")
    assert resolve_backend("auto", *_qk(128)) == "xla"  # short: no race
    assert asked == []
    assert resolve_backend("auto", *_qk(1024)) == "pallas"
    assert resolve_backend("auto", *_qk(1024, dtype=jnp.float32)) == "pallas"
    assert resolve_backend("auto", *_qk(1024, H=48)) == "pallas"
    # cuDNN needs 16-bit inputs; our kernel needs a power-of-two head dim on GPU; XLA always runs
    assert asked == [("cudnn", "pallas", "xla"), ("pallas", "xla"), ("cudnn", "xla")]


def test_auto_on_tpu_is_splash_when_the_shape_tiles(platform):
    platform("tpu")
    assert resolve_backend("auto", *_qk(1024)) == "splash"
    assert resolve_backend("auto", *_qk(1000)) == "xla"


def test_cache_calls_always_use_xla(platform):
    platform("gpu")
    q, k = _qk(1)
    cache_k = jnp.zeros((1, 512, 2, 64), jnp.bfloat16)
    for backend in ("auto", "pallas", "cudnn"):
        assert resolve_backend(backend, q, cache_k, cached=True) == "xla"


@pytest.mark.parametrize("pretend, backend, fragment", [
    ("cpu", "cudnn", "needs an NVIDIA GPU"),
    ("cpu", "splash", "needs a TPU"),
    ("gpu", "cudnn", "needs bfloat16 or float16"),
    ("tpu", "pallas", "model.attention=splash"),
    ("tpu", "splash", "multiple of 128"),
])
def test_unavailable_explicit_backend_is_a_one_line_error(platform, pretend, backend, fragment):
    platform(pretend)
    q, k = _qk(1000, dtype=jnp.float32)
    with pytest.raises(AttentionBackendError, match=fragment) as info:
        resolve_backend(backend, q, k)
    assert "\n" not in str(info.value) and "model.attention=auto" in str(info.value)


def test_explicit_pallas_runs_here():
    q, k = _qk(40, H=32, dtype=jnp.float32)
    assert resolve_backend("pallas", q, k) == "pallas"


def test_auto_measures_for_real_while_tracing_and_never_fails():
    """The race runs inside a jit trace (as when a train step is compiled); a candidate that cannot
    run is skipped, and with nothing else left the answer is XLA."""
    fastest_backend.cache_clear()
    chosen = []

    @jax.jit
    def traced(x):
        chosen.append(fastest_backend(("pallas",), 1, 40, 4, 2, 32, "float32"))
        chosen.append(fastest_backend(("no-such-kernel",), 1, 40, 4, 2, 32, "float32"))
        return x

    traced(jnp.zeros(()))
    assert chosen == ["pallas", "xla"]


def test_attention_entry_point_uses_the_kernel_only_without_a_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(attention_mod, "run_backend", lambda backend, *a: calls.append(backend) or xla_attention(*a))
    q, k, v, _ = _inputs(1, 8, 2, 16, jnp.float32)
    jax.eval_shape(lambda: attention(q, k, v, backend="pallas"))
    jax.eval_shape(lambda: attention(q, k, v, q_start=jnp.int32(0), backend="pallas"))  # an array offset: a cache call
    jax.eval_shape(lambda: attention(q, k, v, kv_start_B=jnp.zeros((1,), jnp.int32), backend="pallas"))
    assert calls == ["pallas"]
