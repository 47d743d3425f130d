"""Text generation: one prefill, then the whole decode loop compiled as a single `lax.while_loop`.

Compilation is keyed only on (spec, prompt bucket, streaming on/off): the prompt is right-padded to a
power-of-two bucket, the KV cache always spans spec.seq_len, and everything else (true prompt
length, max_new_tokens, sampling settings, seed, eos) is a traced argument. New tokens reach the
host as they are produced through an ordered `io_callback`, routed by a per-call request id so that
any Python callable can receive them without being part of the compiled function.
"""

import itertools
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from pufferfish_jax.model.attention import init_cache
from pufferfish_jax.model.moe import MOE_STATE
from pufferfish_jax.model.transformer import ModelSpec, Transformer

Array = jax.Array

MIN_BUCKET = 16


def sample_logits(logits_BV: Array, rng: Array, *, temperature, top_k, top_p) -> Array:
    """Sample one token per row. temperature 0 -> greedy, top_k 0 -> off, top_p 1.0 -> off.

    All three settings may be traced: top-k and top-p become one logit threshold read off a single
    descending sort, so shapes never depend on them. The nucleus is the smallest prefix of the
    top-k tokens whose probability reaches top_p. Ties at the threshold are all kept.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    V = logits_BV.shape[-1]
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    in_top_k_V = jnp.arange(V) < k
    probs_BV = jax.nn.softmax(jnp.where(in_top_k_V, sorted_BV, -jnp.inf), axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = in_top_k_V & ((mass_before_BV < top_p) | (top_p >= 1.0))
    num_kept_B1 = jnp.maximum(jnp.sum(keep_BV, axis=-1, keepdims=True), 1)
    threshold_B1 = jnp.take_along_axis(sorted_BV, num_kept_B1 - 1, axis=-1)
    sampled_B = jax.random.categorical(rng, jnp.where(scaled_BV >= threshold_B1, scaled_BV, -jnp.inf))
    return jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BV, axis=-1)).astype(jnp.int32)


# request id -> on_token callback, for the calls in flight.
_SINKS: dict[int, Callable[[int], None]] = {}
_SINKS_LOCK = threading.Lock()
_REQUEST_IDS = itertools.count()


def _deliver(request_id, token) -> None:
    _SINKS[int(request_id)](int(token))


def _decode(spec: ModelSpec, stream: bool, variables, prompt_1P, prompt_len, max_new_tokens, min_new_tokens,
            temperature, top_k, top_p, rng, eos_id, request_id):
    """Prefill prompt_1P[:, :prompt_len] and decode up to max_new_tokens; returns (tokens_S, count)."""
    model = Transformer(spec)
    cache = init_cache(spec, 1, spec.seq_len)
    logits_1PV, cache = model.apply(variables, prompt_1P, cache=cache)
    # Slots past prompt_len hold padding; rewinding the length lets decode overwrite them.
    cache = cache._replace(length=prompt_len)
    logits_1V = jax.lax.dynamic_index_in_dim(logits_1PV, prompt_len - 1, axis=1, keepdims=False)

    def emit(i, logits_1V, out_S):
        too_early_V = (jnp.arange(logits_1V.shape[-1]) == eos_id) & (i < min_new_tokens)
        logits_1V = jnp.where(too_early_V, -jnp.inf, logits_1V)
        rng_i = jax.random.fold_in(rng, i)
        token_1 = sample_logits(logits_1V, rng_i, temperature=temperature, top_k=top_k, top_p=top_p)
        if stream:
            io_callback(_deliver, None, request_id, token_1[0], ordered=True)
        return token_1, out_S.at[i].set(token_1[0])

    def cond(carry):
        i, token_1, _, _ = carry
        return (i < max_new_tokens) & (token_1[0] != eos_id)

    def body(carry):
        i, token_1, cache, out_S = carry
        logits_11V, cache = model.apply(variables, token_1[:, None], cache=cache)
        token_1, out_S = emit(i, logits_11V[:, 0], out_S)
        return i + 1, token_1, cache, out_S

    token_1, out_S = emit(0, logits_1V, jnp.zeros((spec.seq_len,), jnp.int32))
    count, _, _, out_S = jax.lax.while_loop(cond, body, (jnp.int32(1), token_1, cache, out_S))
    return out_S, count


_decode_jit = jax.jit(_decode, static_argnums=(0, 1))


def prompt_bucket(prompt_len: int, seq_len: int) -> int:
    """The padded prompt length: the next power of two (at least MIN_BUCKET), capped at seq_len."""
    return min(seq_len, max(MIN_BUCKET, 1 << (prompt_len - 1).bit_length()))


def generate(spec: ModelSpec, params, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 50, top_p: float = 0.95, seed: int = 0, eos_id: int | None = None,
             min_new_tokens: int = 0, on_token: Callable[[int], None] | None = None,
             moe_state: dict | None = None) -> list[int]:
    """Continue `prompt_ids` by up to `max_new_tokens` tokens and return the new tokens only.

    Context limit: max_new_tokens is capped at spec.seq_len - 1, then the prompt keeps only its last
    spec.seq_len - max_new_tokens tokens, so the requested continuation length wins over old context.
    Generation stops after `eos_id` (which is included in the result), which is never sampled among
    the first `min_new_tokens` tokens: a short document's end should not cut a requested
    continuation to a few words. `on_token` receives every
    returned token, in order, as soon as it is sampled. Same arguments and seed -> same tokens.
    A MoE model also needs its `moe_state` (the routing biases it was trained with).
    """
    if not prompt_ids:
        raise ValueError("generate needs a non-empty prompt")
    if spec.moe is not None and moe_state is None:
        raise ValueError("a MoE model needs its moe_state (the routing biases) to generate")
    max_new_tokens = min(max_new_tokens, spec.seq_len - 1)
    if max_new_tokens <= 0:
        return []
    prompt_ids = list(prompt_ids)[-(spec.seq_len - max_new_tokens):]
    bucket = prompt_bucket(len(prompt_ids), spec.seq_len)
    prompt_1P = jnp.asarray([prompt_ids + [0] * (bucket - len(prompt_ids))], jnp.int32)

    with _SINKS_LOCK:
        request_id = next(_REQUEST_IDS)
        if on_token is not None:
            _SINKS[request_id] = on_token
    try:
        out_S, count = _decode_jit(
            spec, on_token is not None, {"params": params, MOE_STATE: moe_state or {}}, prompt_1P,
            jnp.int32(len(prompt_ids)), jnp.int32(max_new_tokens),
            jnp.int32(min_new_tokens), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jax.random.key(seed),
            jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(request_id),
        )
        tokens = out_S[: int(count)].tolist()
    finally:
        with _SINKS_LOCK:
            _SINKS.pop(request_id, None)
    return tokens
