"""Generation: greedy equals the full-forward rollout, determinism, top-k/top-p, repetition penalty,
streaming, eos, batched prompts of different lengths, and no recompilation within a prompt bucket."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pufferfish_jax.generate as generate_mod
from pufferfish_jax.generate import (Sampling, decode_step, generate, generate_batch, pad_prompts, penalize_repeats,
                                     prefill, sample_logits)
from pufferfish_jax.model.transformer import Transformer, init_variables
from pufferfish_jax.model.spec import ModelSpec

SPEC = ModelSpec(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, ffn_hidden=64,
                 seq_len=48, init_std=0.5)
PROMPT = [5, 17, 3, 42, 8]


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_variables, static_argnums=0)(SPEC, jax.random.key(0))[0]


def test_greedy_matches_argmax_rollout(params):
    forward = jax.jit(lambda p, t: Transformer(SPEC).apply({"params": p}, t))
    out = generate(SPEC, params, PROMPT, Sampling(max_new_tokens=12, temperature=0.0, min_new_tokens=0))
    seq = list(PROMPT)
    for _ in range(12):  # causal model: logits at len(seq) - 1 ignore the zero padding after it
        logits = forward(params, jnp.asarray([seq + [0] * (SPEC.seq_len - len(seq))]))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    assert out == seq[len(PROMPT):]
    assert len(set(out)) > 1  # a non-degenerate rollout, so the comparison means something


def test_seeds(params):
    def sample(seed: int) -> list[int]:
        return generate(SPEC, params, PROMPT, Sampling(max_new_tokens=16, min_new_tokens=0, temperature=1.0, top_k=0,
                                                       top_p=1.0, seed=seed))

    assert sample(seed=1) == sample(seed=1)
    assert sample(seed=1) != sample(seed=2)


def test_top_k_never_samples_outside_top_k():
    logits_V = jax.random.normal(jax.random.key(0), (32,))
    logits_BV = jnp.tile(logits_V, (4096, 1))
    tokens_B = jax.jit(sample_logits)(logits_BV, jax.random.key(1), temperature=1.0, top_k=5, top_p=1.0)
    top5 = set(np.argsort(-np.asarray(logits_V))[:5].tolist())
    assert set(np.asarray(tokens_B).tolist()) == top5


def test_top_k_on_a_large_vocabulary_both_below_and_above_the_partial_sort():
    logits_V = jax.random.normal(jax.random.key(4), (200,))
    logits_BV = jnp.tile(logits_V, (4096, 1))
    ranked = np.argsort(-np.asarray(logits_V))
    draw = functools.partial(jax.jit(sample_logits), logits_BV, jax.random.key(5), temperature=1.0, top_p=1.0)
    assert set(np.asarray(draw(top_k=5)).tolist()) == set(ranked[:5].tolist())  # lax.top_k path
    wide = set(np.asarray(draw(top_k=100)).tolist())  # full-sort path
    assert wide <= set(ranked[:100].tolist()) and wide - set(ranked[:64].tolist())


def test_top_p_never_samples_outside_nucleus():
    probs_V = jnp.array([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])
    logits_BV = jnp.tile(jnp.log(probs_V), (4096, 1))
    draw = functools.partial(jax.jit(sample_logits), logits_BV, jax.random.key(2), temperature=1.0)
    # 0.5 < 0.75 so token 1 joins the nucleus; 0.8 >= 0.75 so token 2 does not.
    assert set(np.asarray(draw(top_k=0, top_p=0.75)).tolist()) == {0, 1}
    assert set(np.asarray(draw(top_k=0, top_p=0.5)).tolist()) == {0}
    assert set(np.asarray(draw(top_k=2, top_p=0.99)).tolist()) == {0, 1}  # top-k applies first
    assert set(np.asarray(draw(top_k=0, top_p=1.0)).tolist()) == set(range(6))
    greedy = sample_logits(logits_BV[:2], jax.random.key(3), temperature=0.0, top_k=0, top_p=1.0)
    assert greedy.tolist() == [0, 0]


def test_on_token_streams_exactly_the_returned_tokens(params):
    streamed = []
    out = generate(SPEC, params, PROMPT, Sampling(max_new_tokens=10, seed=3, min_new_tokens=0), on_token=streamed.append)
    assert len(out) == 10
    assert streamed == out


def test_stops_at_eos(params):
    out = generate(SPEC, params, PROMPT, Sampling(max_new_tokens=12, temperature=0.0, min_new_tokens=0))
    eos = out[4]
    streamed = []
    stopped = generate(SPEC, params, PROMPT, Sampling(max_new_tokens=12, temperature=0.0, min_new_tokens=0), eos_id=eos, on_token=streamed.append)
    assert stopped == out[: out.index(eos) + 1]
    assert streamed == stopped


def test_long_prompt_is_truncated_from_the_left(params):
    long_prompt = list(range(1, 60))  # longer than seq_len
    out = generate(SPEC, params, long_prompt, Sampling(max_new_tokens=8, temperature=0.0, min_new_tokens=0))
    assert out == generate(SPEC, params, long_prompt[-(SPEC.seq_len - 8):], Sampling(max_new_tokens=8, temperature=0.0, min_new_tokens=0))
    assert len(out) == 8
    assert len(generate(SPEC, params, PROMPT, Sampling(max_new_tokens=1000, temperature=0.0, min_new_tokens=0))) == SPEC.seq_len - 1


def test_no_recompilation_within_a_bucket(params, monkeypatch):
    traces = []
    real_init_cache = generate_mod.init_cache
    monkeypatch.setattr(generate_mod, "init_cache", lambda *a, **k: traces.append(1) or real_init_cache(*a, **k))
    spec = dataclasses.replace(SPEC, seq_len=40)  # a spec no other test compiled
    generate(spec, params, [1, 2, 3], Sampling(max_new_tokens=5, temperature=0.0, min_new_tokens=0))
    assert len(traces) == 1
    generate(spec, params, list(range(1, 12)), Sampling(max_new_tokens=9, temperature=0.7, top_k=3, seed=4, min_new_tokens=0))  # same bucket
    assert len(traces) == 1
    generate(spec, params, list(range(1, 20)), Sampling(max_new_tokens=5, min_new_tokens=0))  # next bucket
    assert len(traces) == 2


def test_eos_is_not_sampled_before_min_new_tokens(params):
    out = generate(SPEC, params, PROMPT, Sampling(max_new_tokens=12, temperature=0.0, min_new_tokens=0))
    eos = out[2]
    first = out.index(eos)
    held = generate(SPEC, params, PROMPT, Sampling(max_new_tokens=12, temperature=0.0, min_new_tokens=first + 2), eos_id=eos)
    assert eos not in held[: first + 2]
    assert held[:first] == out[:first]  # identical until the point where eos was suppressed
    assert len(held) >= first + 2


def test_batched_cache_logits_equal_full_forward_at_every_position(params):
    """Left-padded prompts of different lengths, then teacher-forced decoding: every real position's
    logits equal those of the row's own unpadded sequence through the plain forward."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, SPEC.vocab_size, n).tolist() for n in (5, 11, 2)]
    continuations = rng.integers(1, SPEC.vocab_size, (3, 6))
    longest = max(map(len, prompts))
    tokens_BP, start_B = pad_prompts(prompts, 16)
    logits_BPV, cache = jax.jit(prefill, static_argnums=0)(SPEC, {"params": params}, tokens_BP, start_B, longest)
    step = jax.jit(decode_step, static_argnums=0)
    decoded = []
    for t in range(continuations.shape[1]):
        logits_BV, cache = step(SPEC, {"params": params}, jnp.asarray(continuations[:, t]), cache)
        decoded.append(logits_BV)
    decoded_BCV = jnp.stack(decoded, axis=1)

    forward = jax.jit(lambda p, t: Transformer(SPEC).apply({"params": p}, t))
    for row, prompt in enumerate(prompts):
        full_TV = forward(params, jnp.asarray([prompt + continuations[row].tolist()]))[0]
        n = len(prompt)
        np.testing.assert_allclose(logits_BPV[row, start_B[row]:longest], full_TV[:n], rtol=1e-4, atol=1e-4)
        # decode step t consumed continuation token t, so it predicts the token after it
        np.testing.assert_allclose(decoded_BCV[row], full_TV[n:], rtol=1e-4, atol=1e-4)


def test_batch_rows_equal_their_own_generation(params):
    prompts = [PROMPT, [9, 2, 33, 7, 1, 60, 4, 4, 18, 25, 3], [11]]
    alone = [generate(SPEC, params, p, Sampling(max_new_tokens=8, temperature=0.0, min_new_tokens=0)) for p in prompts]
    streamed = []
    together = generate_batch(SPEC, params, prompts, Sampling(max_new_tokens=8, temperature=0.0, min_new_tokens=0),
                              on_token=lambda row, token: streamed.append((row, token)))
    assert together == alone
    assert [[t for r, t in streamed if r == row] for row in range(3)] == together
    # a row that reaches eos stops alone; the others go on
    eos = alone[0][2]
    stopped = generate_batch(SPEC, params, prompts, Sampling(max_new_tokens=8, temperature=0.0, min_new_tokens=0), eos_id=eos)
    for row, out in zip(stopped, alone):
        assert row == (out[: out.index(eos) + 1] if eos in out else out)


def test_penalize_repeats_divides_positive_and_multiplies_negative_logits():
    logits_BV = jnp.array([[2.0, -1.0, 0.5, -3.0]])
    seen_BV = jnp.array([[True, True, False, False]])
    np.testing.assert_allclose(penalize_repeats(logits_BV, seen_BV, 2.0), [[1.0, -2.0, 0.5, -3.0]])
    np.testing.assert_allclose(penalize_repeats(logits_BV, seen_BV, 1.0), logits_BV)


def test_greedy_with_repetition_penalty_matches_penalized_rollout(params):
    penalty, steps = 3.0, 10
    forward = jax.jit(lambda p, t: Transformer(SPEC).apply({"params": p}, t))
    seq = list(PROMPT)
    for _ in range(steps):
        logits = np.asarray(forward(params, jnp.asarray([seq + [0] * (SPEC.seq_len - len(seq))]))[0, len(seq) - 1])
        seen = np.isin(np.arange(SPEC.vocab_size), seq)
        logits = np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)
        seq.append(int(np.argmax(logits)))
    out = generate(SPEC, params, PROMPT, Sampling(max_new_tokens=steps, temperature=0.0, repetition_penalty=penalty, min_new_tokens=0))
    assert out == seq[len(PROMPT):]
    assert out != generate(SPEC, params, PROMPT, Sampling(max_new_tokens=steps, temperature=0.0, min_new_tokens=0))  # the penalty mattered
