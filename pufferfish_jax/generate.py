"""Text generation: one prefill, then the whole decode loop compiled as a single `lax.while_loop`.

Compilation is keyed only on (spec, batch size, prompt bucket, streaming on/off): prompts are padded
to a power-of-two bucket, the KV cache always spans spec.seq_len, and everything else (true prompt
lengths, max_new_tokens, sampling settings, seed, eos) is a traced argument. New tokens reach the
host as they are produced through an ordered `io_callback`, routed by a per-call request id so that
any Python callable can receive them without being part of the compiled function.

A batch of prompts of different lengths is left-padded so that every row's last prompt token sits
at the same cache slot: then one write offset serves the whole batch (each decode write stays a
single `dynamic_update_slice`), the cache's per-row `start_B` hides the padding from every query,
and rotary positions are counted from each row's own first token, so a row computes exactly what
it would alone.
"""

import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from pufferfish_jax.errors import ConfigError
from pufferfish_jax.model.attention import KVCache, init_cache
from pufferfish_jax.model.moe import MOE_STATE
from pufferfish_jax.model.transformer import Transformer
from pufferfish_jax.model.spec import ModelSpec

Array = jax.Array

MIN_BUCKET = 16
SMALL_TOP_K = 64


def sample_logits(logits_BV: Array, rng: Array, *, temperature, top_k, top_p) -> Array:
    """Sample one token per row. temperature 0 -> greedy, top_k 0 -> off, top_p 1.0 -> off.

    All three settings may be traced: top-k and top-p become one logit threshold read off the
    logits in descending order (the top SMALL_TOP_K when top_k is that small, else a full sort), so
    shapes never depend on them. The nucleus is the smallest prefix of the
    top-k tokens whose probability reaches top_p. Ties at the threshold are all kept. Greedy
    decoding skips the sort through a `lax.cond` (the sort of a large vocabulary costs more than a
    decode step of a small model).
    """
    logits_BV = logits_BV.astype(jnp.float32)
    return jax.lax.cond(temperature > 0,
                        lambda: _sample(logits_BV, rng, temperature=temperature, top_k=top_k, top_p=top_p),
                        lambda: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32))


def _sample(logits_BV: Array, rng: Array, *, temperature, top_k, top_p) -> Array:
    V = logits_BV.shape[-1]
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)  # finite even where a vmapped cond runs both branches
    # A small top-k needs only the top SMALL_TOP_K logits, not a sort of the whole vocabulary.
    small = min(SMALL_TOP_K, V)
    threshold_B1 = jax.lax.cond(
        (top_k > 0) & (top_k <= small),
        lambda: _threshold(jax.lax.top_k(scaled_BV, small)[0], top_k, top_p),
        lambda: _threshold(-jnp.sort(-scaled_BV, axis=-1), top_k, top_p))
    return jax.random.categorical(rng, jnp.where(scaled_BV >= threshold_B1, scaled_BV, -jnp.inf)).astype(jnp.int32)


def _threshold(sorted_BW: Array, top_k, top_p) -> Array:
    """The smallest logit kept by top-k then top-p, from the W largest logits in descending order."""
    W = sorted_BW.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, W), W)
    in_top_k_W = jnp.arange(W) < k
    probs_BW = jax.nn.softmax(jnp.where(in_top_k_W, sorted_BW, -jnp.inf), axis=-1)
    mass_before_BW = jnp.cumsum(probs_BW, axis=-1) - probs_BW
    keep_BW = in_top_k_W & ((mass_before_BW < top_p) | (top_p >= 1.0))
    num_kept_B1 = jnp.maximum(jnp.sum(keep_BW, axis=-1, keepdims=True), 1)
    return jnp.take_along_axis(sorted_BW, num_kept_B1 - 1, axis=-1)


def penalize_repeats(logits_BV: Array, seen_BV: Array, penalty) -> Array:
    """The repetition penalty of CTRL (Keskar et al. 2019), as Hugging Face applies it: the logit of a
    token already in the prompt or the output is divided by `penalty` if positive and multiplied by
    it if negative, so penalty > 1 always makes a repeat less likely. 1.0 = off; may be traced."""
    penalized_BV = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, penalized_BV, logits_BV)


def pad_prompts(prompts: list[list[int]], bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BP, start_B): each prompt left-padded to the longest, then right-padded to `bucket`.

    Every row's last prompt token lands on slot longest - 1; start_B[b] is row b's first real slot.
    The right padding only rounds the shape up to a bucket: generation rewinds the cache to the
    longest prompt and overwrites those slots.
    """
    longest = max(len(p) for p in prompts)
    tokens_BP = np.zeros((len(prompts), bucket), np.int32)
    start_B = np.array([longest - len(p) for p in prompts], np.int32)
    for row, (prompt, start) in enumerate(zip(prompts, start_B)):
        tokens_BP[row, start:longest] = prompt
    return tokens_BP, start_B


def prefill(spec: ModelSpec, variables: dict, tokens_BP: Array, start_B: Array, length) -> tuple[Array, KVCache]:
    """Run padded prompts through the model into a fresh cache; returns (logits_BPV, cache).

    `length` (traced) is the longest prompt: the cache is rewound to it, so decoding continues at
    the slot after every row's last prompt token.
    """
    cache = init_cache(spec, tokens_BP.shape[0], spec.seq_len)._replace(start_B=start_B)
    positions_BP = jnp.clip(jnp.arange(tokens_BP.shape[1])[None, :] - start_B[:, None], 0, spec.seq_len - 1)
    logits_BPV, cache = Transformer(spec).apply(variables, tokens_BP, cache=cache, positions_BT=positions_BP)
    return logits_BPV, cache._replace(length=jnp.asarray(length, jnp.int32))


def decode_step(spec: ModelSpec, variables: dict, token_B: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """One new token per row at slot cache.length; returns (logits_BV, cache)."""
    positions_B1 = (cache.length - cache.start_B)[:, None]
    logits_B1V, cache = Transformer(spec).apply(variables, token_B[:, None], cache=cache,
                                                positions_BT=positions_B1)
    return logits_B1V[:, 0], cache


# request id -> on_token(row, token) callback, for the calls in flight.


@dataclass(frozen=True)
class Sampling:
    """How to sample a continuation: the one definition, used whole by the CLI, the REPL, the
    pipeline's sample stage (its `sample` config section) and `generate`."""

    max_new_tokens: int = 100
    min_new_tokens: int = 50  # the end-of-text token is not sampled before this many tokens
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 0.95  # 1 = off
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the prompt or output less likely
    seed: int = 0

    def describe(self) -> str:
        return (f"temp {self.temperature:g}, top-k {self.top_k or 'off'}, top-p {self.top_p:g}, "
                f"repetition penalty {self.repetition_penalty:g}, "
                f"max {self.max_new_tokens}, min {self.min_new_tokens}, seed {self.seed}")

    def check(self, seq_len: int) -> "Sampling":
        """Refuses settings generation would silently clamp or misread; returns self so calls chain."""
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):  # NaN passes every comparison below
                raise ConfigError(f"{name.replace('_', ' ')} {getattr(self, name)} must be a finite number")
        if not 0 < self.max_new_tokens < seq_len:
            raise ConfigError(f"max new tokens {self.max_new_tokens} must be between 1 and {seq_len - 1} "
                              f"(the model's context is {seq_len} tokens)")
        if self.min_new_tokens < 0:
            raise ConfigError(f"min new tokens {self.min_new_tokens} must be 0 or more")
        if self.temperature < 0:
            raise ConfigError(f"temperature {self.temperature:g} must be 0 (greedy) or more")
        if self.top_k < 0:
            raise ConfigError(f"top-k {self.top_k} must be 0 (off) or more")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top-p {self.top_p:g} must be in (0, 1] (1 = off)")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition penalty {self.repetition_penalty:g} must be positive "
                              "(1 = off, 1.1-1.3 is typical)")
        return self


class _Knobs(NamedTuple):
    """The sampling settings as traced scalars: changing them never recompiles the decode loop."""

    max_new_tokens: Array
    min_new_tokens: Array
    temperature: Array
    top_k: Array
    top_p: Array
    repetition_penalty: Array

    @classmethod
    def of(cls, s: Sampling, max_new_tokens: int) -> "_Knobs":
        return cls(jnp.int32(max_new_tokens), jnp.int32(s.min_new_tokens), jnp.float32(s.temperature),
                   jnp.int32(s.top_k), jnp.float32(s.top_p), jnp.float32(s.repetition_penalty))


_SINKS: dict[int, Callable[[int, int], None]] = {}
_SINKS_LOCK = threading.Lock()
_REQUEST_IDS = itertools.count()


def _deliver(request_id, tokens_B, active_B) -> None:
    sink = _SINKS[int(request_id)]
    for row, (token, active) in enumerate(zip(tokens_B.tolist(), active_B.tolist())):
        if active:
            sink(row, token)


def _decode(spec: ModelSpec, stream: bool, variables, tokens_BP, start_B, longest, knobs: _Knobs, rng, eos_id,
            request_id):
    """Prefill the padded prompts and decode up to max_new_tokens per row; returns (tokens_BS, count_B).

    A row stops after its eos; the loop stops when every row has, or after max_new_tokens.
    """
    B, V = tokens_BP.shape[0], spec.vocab_size
    logits_BPV, cache = prefill(spec, variables, tokens_BP, start_B, longest)
    logits_BV = jax.lax.dynamic_index_in_dim(logits_BPV, longest - 1, axis=1, keepdims=False)
    real_BP = (jnp.arange(tokens_BP.shape[1])[None, :] >= start_B[:, None]) & (jnp.arange(tokens_BP.shape[1]) < longest)
    seen_BV = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], tokens_BP].max(real_BP)

    def emit(i, logits_BV, state):
        done_B, seen_BV, out_BS, count_B = state
        logits_BV = penalize_repeats(logits_BV.astype(jnp.float32), seen_BV, knobs.repetition_penalty)
        too_early_V = (jnp.arange(V) == eos_id) & (i < knobs.min_new_tokens)
        logits_BV = jnp.where(too_early_V, -jnp.inf, logits_BV)
        token_B = sample_logits(logits_BV, jax.random.fold_in(rng, i), temperature=knobs.temperature,
                                top_k=knobs.top_k, top_p=knobs.top_p)
        active_B = ~done_B
        if stream:
            io_callback(_deliver, None, request_id, token_B, active_B, ordered=True)
        out_BS = out_BS.at[:, i].set(jnp.where(active_B, token_B, 0))
        seen_BV = seen_BV.at[jnp.arange(B), token_B].set(True)
        return token_B, (done_B | (token_B == eos_id), seen_BV, out_BS, count_B + active_B)

    def cond(carry):
        i, _, _, (done_B, *_) = carry
        return (i < knobs.max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        i, token_B, cache, state = carry
        logits_BV, cache = decode_step(spec, variables, token_B, cache)
        token_B, state = emit(i, logits_BV, state)
        return i + 1, token_B, cache, state

    state = (jnp.zeros((B,), bool), seen_BV, jnp.zeros((B, spec.seq_len), jnp.int32), jnp.zeros((B,), jnp.int32))
    token_B, state = emit(0, logits_BV, state)
    _, _, _, (_, _, out_BS, count_B) = jax.lax.while_loop(cond, body, (jnp.int32(1), token_B, cache, state))
    return out_BS, count_B


_decode_jit = jax.jit(_decode, static_argnums=(0, 1))


def prompt_bucket(prompt_len: int, seq_len: int) -> int:
    """The padded prompt length: the next power of two (at least MIN_BUCKET), capped at seq_len."""
    return min(seq_len, max(MIN_BUCKET, 1 << (prompt_len - 1).bit_length()))


def generate(spec: ModelSpec, params, prompt_ids: list[int], sampling: Sampling, *, eos_id: int | None = None,
             on_token: Callable[[int], None] | None = None, moe_state: dict | None = None) -> list[int]:
    """Continue `prompt_ids` by up to `sampling.max_new_tokens` tokens and return the new tokens only.

    Context limit: max_new_tokens is capped at spec.seq_len - 1, then the prompt keeps only its last
    spec.seq_len - max_new_tokens tokens, so the requested continuation length wins over old context.
    Generation stops after `eos_id` (which is included in the result), which is never sampled among
    the first `min_new_tokens` tokens: a short document's end should not cut a requested
    continuation to a few words. `on_token` receives every
    returned token, in order, as soon as it is sampled. Same arguments and seed -> same tokens.
    A MoE model needs its `moe_state` (the routing biases: they choose the experts).
    """
    sink = None if on_token is None else (lambda row, token: on_token(token))
    return generate_batch(spec, params, [prompt_ids], sampling, eos_id=eos_id, on_token=sink, moe_state=moe_state)[0]


def generate_batch(spec: ModelSpec, params, prompts: list[list[int]], sampling: Sampling, *,
                   eos_id: int | None = None, on_token: Callable[[int, int], None] | None = None,
                   moe_state: dict | None = None) -> list[list[int]]:
    """`generate` for several prompts of any lengths at once, decoded together in one compiled loop.

    Returns the new tokens of each prompt, in order; each row stops at its own eos. `on_token(row,
    token)` receives every returned token as soon as it is sampled (rows interleaved, each row's
    tokens in order). The settings apply to every row.
    """
    if not prompts or not all(prompts):
        raise ValueError("generate needs a non-empty prompt")
    if sampling.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive, got {sampling.repetition_penalty}")
    if spec.moe is not None and moe_state is None:
        raise ValueError("a MoE model needs its moe_state (the routing biases) to generate")
    max_new_tokens = min(sampling.max_new_tokens, spec.seq_len - 1)
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    prompts = [list(p)[-(spec.seq_len - max_new_tokens):] for p in prompts]
    longest = max(len(p) for p in prompts)
    tokens_BP, start_B = pad_prompts(prompts, prompt_bucket(longest, spec.seq_len))

    with _SINKS_LOCK:
        request_id = next(_REQUEST_IDS)
        if on_token is not None:
            _SINKS[request_id] = on_token
    try:
        out_BS, count_B = _decode_jit(
            spec, on_token is not None, {"params": params, MOE_STATE: moe_state or {}}, jnp.asarray(tokens_BP),
            jnp.asarray(start_B), jnp.int32(longest), _Knobs.of(sampling, max_new_tokens),
            jax.random.key(sampling.seed), jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(request_id))
        out_BS, count_B = np.asarray(out_BS), np.asarray(count_B)
    finally:
        with _SINKS_LOCK:
            _SINKS.pop(request_id, None)
    return [row[:count].tolist() for row, count in zip(out_BS, count_B)]
