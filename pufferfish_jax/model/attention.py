"""Grouped-query attention with rotary embeddings, a static-shape KV cache, and backend dispatch.

One masking rule serves training, prefill and decode: query t of a call sits at cache slot
`q_start + t` and sees key slots `start_b <= s <= q_start + t`. With `q_start = 0` and S = T this is
the causal mask; over a fixed-size cache it also hides the slots not written yet, so decode needs no
separate validity mask and never changes shape, and `start_b` hides the left padding of row b.

Backends (`model.attention`): xla (einsum, any platform), blocked (causal query blocks with a
hand-written backward, `blocked_attention.py`; the fast one on CPU), cudnn (`jax.nn.dot_product_attention`),
pallas (our flash kernel, `kernels/flash_attention.py`), splash (TPU) and auto. Kernels are imported
only when selected.
"""

import concurrent.futures
import functools
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pufferfish_jax.model.blocked_attention import causal_attention
from pufferfish_jax.model.layers import RMSNorm, apply_rope, dot, logical, proj
from pufferfish_jax.errors import AttentionBackendError
from pufferfish_jax.model.spec import ATTENTION_BACKENDS, ModelSpec, check_choice
from pufferfish_jax import sharding
from pufferfish_jax.sharding import constrain

Array = jax.Array

# `auto` leaves sequences shorter than this to XLA: their score matrix is small enough that a fused
# kernel buys little and a measurement would cost more than it saves.
AUTO_MIN_SEQ = 256


class KVCache(NamedTuple):
    """Keys and values of every layer, stacked so each layer updates its slice in place.

    k_LBSKH, v_LBSKH: [layers, batch, max_len, kv heads, head dim] in the compute dtype.
    length: int32 scalar, the number of filled slots, shared by the batch; the next call writes its
    T tokens at slots [length, length + T). One write offset for the whole batch keeps every write a
    single `dynamic_update_slice` (per-row offsets would become scatters).
    start_B: int32 [batch], the first slot of each row that holds a real token. Prompts of different
    lengths are left-padded so they all end at the same slot; no query ever sees a slot before its
    row's start.
    """

    k_LBSKH: Array
    v_LBSKH: Array
    length: Array
    start_B: Array


def init_cache(spec: ModelSpec, batch_size: int, max_len: int, dtype: jnp.dtype | None = None) -> KVCache:
    """An empty cache for `batch_size` sequences of up to `max_len` (<= spec.seq_len) tokens."""
    if max_len > spec.seq_len:
        raise ValueError(f"cache max_len {max_len} exceeds the model's seq_len {spec.seq_len}")
    shape = (spec.num_layers, batch_size, max_len, spec.num_kv_heads, spec.head_dim)
    dtype = spec.compute_dtype if dtype is None else dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32),
                   jnp.zeros((batch_size,), jnp.int32))


def _platform() -> str:
    return jax.default_backend()


def backend_problem(backend: str, q_BTNH: Array) -> str | None:
    """Why `backend` cannot run this call here (a short reason), or None if it can."""
    check_choice("model.attention", backend, ATTENTION_BACKENDS)
    platform, dtype, H, T = _platform(), q_BTNH.dtype, q_BTNH.shape[-1], q_BTNH.shape[1]
    if backend in ("xla", "blocked"):
        return None
    if backend == "cudnn":
        if platform != "gpu":
            return f"needs an NVIDIA GPU (this platform is {platform})"
        if dtype not in (jnp.bfloat16, jnp.float16):
            return f"needs bfloat16 or float16 inputs, not {dtype} (set model.dtype=bfloat16)"
        if H % 8 or H > 128:
            return f"needs a head dim that is a multiple of 8 up to 128, not {H}"
        return None
    if backend == "pallas":
        if platform == "tpu":
            return "is our GPU (Triton) kernel; on TPU use model.attention=splash"
        if platform == "gpu" and (H < 16 or H & (H - 1)):
            return f"needs a power-of-two head dim >= 16 on GPU, not {H}"
        return None
    if platform != "tpu":
        return f"needs a TPU (this platform is {platform})"
    from pufferfish_jax.model.kernels.splash import BLOCK, splash_supported

    if not splash_supported(T):
        return f"needs a sequence length that is a multiple of {BLOCK}, not {T}"
    return None


def resolve_backend(backend: str, q_BTNH: Array, k_BSKH: Array, *, cached: bool = False) -> str:
    """The backend that runs this call.

    Calls on a KV cache (prefill and decode) always use XLA: one query against a cache is a
    matrix-vector product no kernel speeds up, and only XLA implements the cache's offset mask.
    An explicit backend that cannot run here is an error; 'auto' never fails: TPU -> splash, GPU ->
    the fastest of cuDNN, our Pallas kernel and XLA measured on this shape, CPU -> blocked (1.8x
    the einsum form there, docs/perf.md), otherwise (short sequences, shapes a kernel cannot
    take) -> XLA.
    """
    check_choice("model.attention", backend, ATTENTION_BACKENDS)
    if cached or backend == "xla":
        return "xla"
    if backend != "auto":
        problem = backend_problem(backend, q_BTNH)
        if problem:
            raise AttentionBackendError(f"model.attention={backend} {problem}; use model.attention=auto or xla")
        return backend
    platform = _platform()
    if platform == "tpu" and not backend_problem("splash", q_BTNH):
        return "splash"
    if platform == "gpu" and q_BTNH.shape[1] >= AUTO_MIN_SEQ:
        candidates = tuple(b for b in ("cudnn", "pallas") if not backend_problem(b, q_BTNH))
        B, T, N, H = q_BTNH.shape
        shape = (candidates + ("xla",), B, T, N, k_BSKH.shape[2], H, jnp.dtype(q_BTNH.dtype).name)
        return agreed_fastest_backend(*shape) if sharding.tracing_across_processes() else fastest_backend(*shape)
    return "blocked" if platform == "cpu" else "xla"


@functools.lru_cache(maxsize=None)
def fastest_backend(candidates: tuple[str, ...], B: int, T: int, N: int, K: int, H: int, dtype: str) -> str:
    """The candidate with the shortest forward+backward time on random inputs of this shape.

    Measured once per shape and process (a few compilations, seconds on a GPU); a candidate that
    fails to compile or run is skipped, and XLA, which always runs, is the last resort.
    """
    # JAX's trace state is per thread: in a fresh thread the timing runs for real even when this is
    # called while a training step is being traced.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_time_candidates, candidates, B, T, N, K, H, dtype).result()


_AGREED: dict[tuple, str] = {}  # process 0's choice per shape, for programs that span processes


def agreed_fastest_backend(candidates: tuple[str, ...], B: int, T: int, N: int, K: int, H: int, dtype: str) -> str:
    """Process 0's `fastest_backend` on every process. Each process times the candidates on its own
    GPU and may rank them differently; a program that spans processes must be the same program
    everywhere, or its collectives diverge or hang. Called while every process traces the same
    step, so the broadcast (in a side thread, outside the trace) meets its partners."""
    key = (candidates, B, T, N, K, H, dtype)
    if key not in _AGREED:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            _AGREED[key] = pool.submit(lambda: sharding.agree_json(fastest_backend(*key))).result()
    return _AGREED[key]


def _time_candidates(candidates: tuple[str, ...], B: int, T: int, N: int, K: int, H: int, dtype: str) -> str:
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, N, H), dtype)
    k, v = (jax.random.normal(key, (B, T, K, H), dtype) for key in ks[1:])
    best, best_s = "xla", float("inf")
    for name in candidates:
        step = jax.jit(jax.grad(lambda q, k, v, name=name: run_backend(name, q, k, v).astype(jnp.float32).sum(),
                                argnums=(0, 1, 2)))
        try:
            jax.block_until_ready(step(q, k, v))
            start = time.perf_counter()
            for _ in range(3):
                out = step(q, k, v)
            jax.block_until_ready(out)
        except Exception:  # an unsupported shape or a compiler limit: not a candidate
            continue
        if (elapsed := time.perf_counter() - start) < best_s:
            best, best_s = name, elapsed
    return best


def run_backend(backend: str, q_BTNH: Array, k_BTKH: Array, v_BTKH: Array) -> Array:
    """Causal GQA attention over a whole sequence (no cache) with a concrete backend; o_BTNH."""
    if backend == "xla":
        return xla_attention(q_BTNH, k_BTKH, v_BTKH)
    if backend == "blocked":
        return causal_attention(q_BTNH, k_BTKH, v_BTKH)
    if backend == "cudnn":
        return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation="cudnn")
    if backend == "pallas":
        from pufferfish_jax.model.kernels.flash_attention import flash_attention

        return flash_attention(q_BTNH, k_BTKH, v_BTKH)
    check_choice("model.attention", backend, ATTENTION_BACKENDS)
    from pufferfish_jax.model.kernels.splash import splash_attention

    return splash_attention(q_BTNH, k_BTKH, v_BTKH)


def attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, *, q_start: Array | int = 0,
              kv_start_B: Array | None = None, backend: str = "auto") -> Array:
    """Causal GQA attention: query t attends to key slots s with kv_start_B[b] <= s <= q_start + t.

    Returns o_BTNH. A call with q_start = 0, S = T and no kv_start_B is a plain training/eval
    forward and may run on a kernel; anything else is a cache call and runs on XLA.
    """
    cached = kv_start_B is not None or not (isinstance(q_start, int) and q_start == 0) or k_BSKH.shape[1] != q_BTNH.shape[1]
    backend = resolve_backend(backend, q_BTNH, k_BSKH, cached=cached)
    if backend == "xla":
        return xla_attention(q_BTNH, k_BSKH, v_BSKH, q_start=q_start, kv_start_B=kv_start_B)
    return run_backend(backend, q_BTNH, k_BSKH, v_BSKH)


def xla_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, *, q_start: Array | int = 0,
                  kv_start_B: Array | None = None) -> Array:
    """Plain einsum attention; float32 scores and softmax whatever the compute dtype.

    GQA groups the N query heads as [K, N/K] against the K kv heads, so K/V are read once and
    never repeated in memory.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    scores_BKGTS = dot("btkgh,bskh->bkgts", q_BTKGH, k_BSKH) * H**-0.5
    visible_TS = jnp.arange(S)[None, :] <= q_start + jnp.arange(T)[:, None]
    visible_BTS = visible_TS[None] if kv_start_B is None else visible_TS & (jnp.arange(S) >= kv_start_B[:, None, None])
    scores_BKGTS = jnp.where(visible_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
    o_BTKGH = dot("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    return o_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


class Attention(nn.Module):
    """Self-attention of one block: projections, RoPE, cache write, attention, output projection.

    `layer` indexes this block's slice of the stacked KVCache.
    """

    spec: "ModelSpec"
    layer: int

    @nn.compact
    def __call__(
        self, x_BTD: Array, sin_BTR: Array, cos_BTR: Array, cache: KVCache | None
    ) -> tuple[Array, KVCache | None]:
        spec = self.spec
        D, N, K, H = spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim
        init = nn.initializers.normal(spec.init_std)
        w_q_DNH = self.param("w_q", logical(init, "embed", "heads", "head_dim"), (D, N, H))
        w_k_DKH = self.param("w_k", logical(init, "embed", "kv_heads", "head_dim"), (D, K, H))
        w_v_DKH = self.param("w_v", logical(init, "embed", "kv_heads", "head_dim"), (D, K, H))
        w_o_NHD = self.param("w_o", logical(nn.initializers.normal(spec.out_std), "heads", "head_dim", "embed"), (N, H, D))

        q_BTNH, k_BTKH = proj("btd,dnh->btnh", x_BTD, w_q_DNH), proj("btd,dkh->btkh", x_BTD, w_k_DKH)
        if spec.qk_norm:  # per head, over head_dim, before the rotation (OLMo 2, modded-nanogpt)
            q_BTNH = RMSNorm(spec.norm_eps, q_BTNH.dtype, "head_dim", name="q_norm")(q_BTNH)
            k_BTKH = RMSNorm(spec.norm_eps, k_BTKH.dtype, "head_dim", name="k_norm")(k_BTKH)
        q_BTNH, k_BTKH = apply_rope(q_BTNH, sin_BTR, cos_BTR), apply_rope(k_BTKH, sin_BTR, cos_BTR)
        v_BTKH = proj("btd,dkh->btkh", x_BTD, w_v_DKH)
        q_BTNH = constrain(q_BTNH, ("batch", "seq", "heads", "head_dim"))
        k_BTKH = constrain(k_BTKH, ("batch", "seq", "kv_heads", "head_dim"))
        v_BTKH = constrain(v_BTKH, ("batch", "seq", "kv_heads", "head_dim"))

        if cache is None:
            o_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, backend=spec.attention)
        else:
            start = (self.layer, 0, cache.length, 0, 0)
            k_LBSKH = jax.lax.dynamic_update_slice(cache.k_LBSKH, k_BTKH[None].astype(cache.k_LBSKH.dtype), start)
            v_LBSKH = jax.lax.dynamic_update_slice(cache.v_LBSKH, v_BTKH[None].astype(cache.v_LBSKH.dtype), start)
            cache = cache._replace(k_LBSKH=k_LBSKH, v_LBSKH=v_LBSKH)
            o_BTNH = attention(
                q_BTNH,
                k_LBSKH[self.layer].astype(q_BTNH.dtype),
                v_LBSKH[self.layer].astype(q_BTNH.dtype),
                q_start=cache.length,
                kv_start_B=cache.start_B,
                backend=spec.attention,
            )
        return proj("btnh,nhd->btd", o_BTNH, w_o_NHD), cache
