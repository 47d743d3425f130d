"""Model correctness: RoPE, GQA, causality, remat, parameter count, mixed precision, KV cache."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from pufferfish_jax.model.attention import attention, init_cache, xla_attention
from pufferfish_jax.model.layers import apply_rope, dot, rope_angles
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.model.transformer import Transformer, count_params, flops_per_token, init_variables


def make_spec(**overrides) -> ModelSpec:
    cfg = dict(vocab_size=96, num_layers=2, d_model=48, num_heads=4, num_kv_heads=2, head_dim=0, ffn_hidden=0,
               seq_len=32, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, dtype="float32", remat="none",
               attention="auto", init_std=0.2)
    cfg.update(overrides)
    return ModelSpec.from_config(ml_collections.ConfigDict(cfg))


@functools.partial(jax.jit, static_argnums=0)
def init(spec: ModelSpec, seed: int = 0) -> dict:
    return init_variables(spec, jax.random.key(seed))[0]


@functools.partial(jax.jit, static_argnums=0)
def forward(spec: ModelSpec, params: dict, tokens_BT: jax.Array) -> jax.Array:
    return Transformer(spec).apply({"params": params}, tokens_BT)


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grads(spec: ModelSpec, params: dict, tokens_BT: jax.Array):
    """((next-token loss, logits), grads) of the forward on tokens_BT[:, :-1]."""

    def loss(p):
        logits = Transformer(spec).apply({"params": p}, tokens_BT[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BT[:, 1:]).mean(), logits

    return jax.value_and_grad(loss, has_aux=True)(params)


def tokens(spec: ModelSpec, B: int, T: int, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, T), 0, spec.vocab_size)


def test_from_config_resolves_derived_sizes():
    spec = make_spec(d_model=256, num_heads=8)
    assert spec.head_dim == 32
    assert spec.ffn_hidden == 704  # 8/3 * 256 = 682.7 -> next multiple of 64
    assert make_spec(head_dim=16, ffn_hidden=100).ffn_hidden == 100
    with pytest.raises(ValueError):
        make_spec(remat="sometimes")
    with pytest.raises(ValueError):
        make_spec(attention="magic")
    with pytest.raises(ValueError):
        make_spec(num_kv_heads=3)


@pytest.mark.parametrize("eqn", ["btd,dnh->btnh", "btkgh,bskh->bkgts", "bkgts,bskh->btkgh", "btd,vd->btv"])
def test_dot_vjp_matches_autodiff(eqn):
    inputs, _ = eqn.split("->")
    sizes = dict(b=2, t=3, s=3, d=4, n=2, k=2, g=2, h=5, v=6)
    x, w = (jax.random.normal(jax.random.key(i), [sizes[c] for c in idx]) for i, idx in enumerate(inputs.split(",")))
    cot = jax.random.normal(jax.random.key(2), jnp.einsum(eqn, x, w).shape)
    vjp = jax.jit(lambda f, x, w, cot: jax.vjp(f, x, w)[1](cot), static_argnums=0)
    ours = vjp(functools.partial(dot, eqn), x, w, cot)
    expected = vjp(functools.partial(jnp.einsum, eqn), x, w, cot)
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    ours16 = vjp(functools.partial(dot, eqn), x.astype(jnp.bfloat16), w, cot)
    assert ours16[0].dtype == jnp.bfloat16 and ours16[1].dtype == jnp.float32  # w's gradient stays float32


def test_rope_scores_depend_only_on_relative_position():
    H, max_len = 16, 64
    q_H, k_H = jax.random.normal(jax.random.key(0), (2, H))

    def score(m, n):
        positions_12 = jnp.array([[m, n]])
        sin, cos = rope_angles(positions_12, max_len, H, 10000.0)
        x_12NH = jnp.stack([q_H, k_H])[None, :, None, :]
        rotated = apply_rope(x_12NH, sin, cos)[0, :, 0]
        return jnp.dot(rotated[0], rotated[1])

    for m, n in [(3, 1), (10, 10), (2, 9)]:
        for shift in (1, 7, 40):
            np.testing.assert_allclose(score(m, n), score(m + shift, n + shift), rtol=1e-5, atol=1e-5)
    assert abs(score(5, 1) - score(5, 2)) > 1e-3  # and it does depend on the difference


def test_gqa_equals_mha_with_repeated_kv():
    B, T, N, K, H = 2, 7, 6, 2, 8
    q, k, v = (jax.random.normal(r, (B, T, n, H)) for r, n in zip(jax.random.split(jax.random.key(0), 3), (N, K, K)))

    @jax.jit
    def mha_reference(q, k, v):
        k_rep, v_rep = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
        scores = jnp.einsum("btnh,bsnh->bnts", q, k_rep) / np.sqrt(H)
        scores = jnp.where(np.tril(np.ones((T, T), bool)), scores, -jnp.inf)
        return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v_rep)

    expected = mha_reference(q, k, v)
    np.testing.assert_allclose(jax.jit(xla_attention)(q, k, v), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(attention)(q, k, v), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        attention(q, k, v, backend="nope")


def test_causality():
    spec = make_spec()
    params = init(spec)
    a = tokens(spec, 2, 16, seed=1)
    b = a.at[:, 9:].set(tokens(spec, 2, 7, seed=2))
    logits_a, logits_b = forward(spec, params, a), forward(spec, params, b)
    np.testing.assert_allclose(logits_a[:, :9], logits_b[:, :9], rtol=1e-6, atol=1e-6)
    assert not np.allclose(logits_a[:, 9:], logits_b[:, 9:])


@pytest.mark.slow  # compiles the gradient three times: the full suite, not the edit loop
def test_remat_policies_give_equal_loss_and_grads():
    tok = tokens(make_spec(), 2, 17)
    params = init(make_spec())
    (ref_loss, _), ref_grads = loss_and_grads(make_spec(), params, tok)
    for remat in ("full", "save_dots"):
        (loss, _), grads = loss_and_grads(make_spec(remat=remat), params, tok)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), grads, ref_grads)


@pytest.mark.parametrize("tie", [True, False])
def test_count_params_matches_tree(tie):
    spec = make_spec(tie_embeddings=tie)
    abstract = jax.eval_shape(functools.partial(init_variables, spec), jax.random.key(0))[0]
    assert count_params(spec) == sum(x.size for x in jax.tree.leaves(abstract))
    embedding_params = spec.vocab_size * spec.d_model * (1 if tie else 2)
    assert count_params(spec, embedding=False) == count_params(spec) - embedding_params
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))
    assert set(abstract) >= {"embed", "block_0", "block_1", "final_norm"}
    assert ("lm_head" in abstract) == (not tie)


def test_create_state_equals_the_init_compiled_with_xla_defaults():
    """create_state compiles the init at a lower LLVM level on CPU to start sooner; it must not
    change a single bit of the fresh state (parameters, optimizer moments, MoE biases) from what
    XLA's default level (2; this suite sets 0 for everything else) computes."""
    from pufferfish_jax.sharding import single_device_mesh
    from pufferfish_jax.train.state import create_state, init_state

    spec = make_spec(qk_norm=True)
    optimizer = optax.adamw(1e-3)
    fresh = create_state(spec, optimizer, 3, single_device_mesh())
    reference = jax.jit(lambda: init_state(spec, optimizer, jax.random.key(3)),
                        compiler_options={"xla_backend_optimization_level": 2})()
    assert jax.tree.structure(fresh) == jax.tree.structure(reference)
    for got, want in zip(jax.tree.leaves(fresh), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_flops_per_token_formula():
    spec = make_spec(num_kv_heads=4)  # MHA: q, k, v, o are all D x D
    D, F, V, L, T = spec.d_model, spec.ffn_hidden, spec.vocab_size, spec.num_layers, 32
    expected = 6 * (L * (4 * D * D + 3 * D * F) + D * V) + 12 * L * T * D
    assert flops_per_token(spec, T) == expected


@pytest.mark.slow  # compiles several whole models: the full suite, not the edit loop
def test_bfloat16_compute_is_close_to_float32():
    spec32, spec16 = make_spec(), make_spec(dtype="bfloat16")
    params = init(spec32)
    tok = tokens(spec32, 2, 17)
    (_, logits32), grads32 = loss_and_grads(spec32, params, tok)
    (_, logits16), grads16 = loss_and_grads(spec16, params, tok)
    assert logits16.dtype == jnp.float32
    assert np.isfinite(logits16).all()
    scale, error = float(jnp.std(logits32)), jnp.abs(logits16 - logits32)
    assert float(jnp.mean(error)) < 0.03 * scale and float(jnp.max(error)) < 0.25 * scale  # bf16: ~3 digits
    assert float(jnp.mean(jnp.argmax(logits16, -1) == jnp.argmax(logits32, -1))) > 0.9
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
    cos = optax.tree.vdot(grads16, grads32) / (optax.tree.norm(grads16) * optax.tree.norm(grads32))
    assert cos > 0.99


@pytest.mark.parametrize("tie", [True, False])
def test_kv_cache_decode_matches_full_forward(tie):
    spec = make_spec(tie_embeddings=tie)
    params = init(spec)
    tok = tokens(spec, 2, 20)
    full = forward(spec, params, tok)
    step = jax.jit(lambda t, c: Transformer(spec).apply({"params": params}, t, cache=c))

    cache = init_cache(spec, batch_size=2, max_len=spec.seq_len)
    chunks = [tok[:, :7], tok[:, 7:10]] + [tok[:, t:t + 1] for t in range(10, 20)]  # prefill, chunk, decode
    pieces = []
    for chunk in chunks:
        logits, cache = step(chunk, cache)
        pieces.append(logits)
    assert int(cache.length) == 20
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)
