"""Causal flash attention in Pallas: forward and backward kernels behind one `custom_vjp`.

Why our own: the model needs grouped-query attention without materialising repeated K/V, a
backward pass that reuses the forward's log-sum-exp, and one code path that runs compiled on GPU
(Triton lowering) and interpreted on CPU (so CI checks the very kernels a GPU runs).

Algorithm (FlashAttention-2): each program owns one block of queries of one head and streams the
key/value blocks of that head's kv head through an online softmax, keeping the running max `m`,
the running sum `l` and the unnormalised output in float32. Causality skips whole blocks: a query
block stops at the last key block that reaches its diagonal, and only the blocks that straddle the
diagonal compute the mask. The forward saves
lse = m + log2(l) per query (base 2: the kernels use exp2, the cheaper instruction), so the backward
recomputes probabilities as exp2(s - lse) without a second reduction.

Backward: delta = rowsum(dO * O) (plain XLA), then two kernels. The dQ kernel mirrors the forward
(one query block, key blocks up to the diagonal). The dK/dV kernel owns one key block of one kv
head and walks, for each of the G query heads sharing that kv head, the query blocks from the
diagonal to the last real query, so GQA gradients are summed in registers and never written per
query head. Q, dO and lse are viewed as [.., K, G * ..] (a free reshape) so that every load is a
contiguous slice.

Sequence lengths that are not a multiple of the block are padded with zeros. No extra mask is
needed: under the causal mask a real query t < T only sees keys s <= t < T, padded queries are
sliced off, their dO is zero, and the dK/dV loop stops at the last block holding a real query.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

Array = jax.Array

LOG2_E = math.log2(math.e)
# Finite, so a fully masked row gives exp2(MASK - m) = 0 rather than NaN from (-inf) - (-inf).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static settings of one kernel instance (hashable: a nondiff argument of the custom VJP)."""

    block_q: int
    block_k: int
    seq_len: int  # the real (unpadded) T
    interpret: bool
    num_warps: int
    num_stages: int


def default_interpret() -> bool:
    """Compiled through Triton on GPU; interpreted everywhere else (CPU tests, TPU fallback)."""
    return jax.default_backend() != "gpu"


def flash_attention(q_BTNH: Array, k_BTKH: Array, v_BTKH: Array, *, block_q: int = 64, block_k: int = 64,
                    interpret: bool | None = None, num_warps: int | None = None, num_stages: int = 2) -> Array:
    """Causal GQA attention, softmax scale head_dim**-0.5; returns o_BTNH in q's dtype.

    N query heads share K kv heads (N % K == 0; query head n reads kv head n // (N/K)). Inputs may
    be float32 or bfloat16; scores, softmax statistics and accumulators are float32. Differentiable
    (its own backward kernels). block_q and block_k are powers of two; they shrink for short
    sequences so a tiny T is not padded to a large block.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    if k_BTKH.shape != (B, T, K, H) or v_BTKH.shape != k_BTKH.shape:
        raise ValueError(f"flash_attention: q {q_BTNH.shape}, k {k_BTKH.shape}, v {v_BTKH.shape} do not match")
    if N % K:
        raise ValueError(f"flash_attention: {N} query heads are not a multiple of {K} kv heads")
    if not q_BTNH.dtype == k_BTKH.dtype == v_BTKH.dtype:
        raise ValueError(f"flash_attention: q, k, v dtypes differ ({q_BTNH.dtype}, {k_BTKH.dtype}, {v_BTKH.dtype})")
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"flash_attention: {name}={block} must be a power of two >= 16")
    shortest = max(16, pl.next_power_of_2(T))
    block_q, block_k = min(block_q, shortest), min(block_k, shortest)
    interpret = default_interpret() if interpret is None else interpret
    cfg = KernelConfig(block_q, block_k, T, interpret, num_warps or (4 if H <= 64 else 8), num_stages)

    padded = -(-T // max(block_q, block_k)) * max(block_q, block_k)
    pad = ((0, 0), (0, padded - T), (0, 0), (0, 0))
    o_BPNH = _flash(jnp.pad(q_BTNH, pad), jnp.pad(k_BTKH, pad), jnp.pad(v_BTKH, pad), cfg)
    return o_BPNH[:, :T]


def _compiler_params(cfg: KernelConfig):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    # Named TritonCompilerParams before JAX 0.6.
    params_cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return params_cls(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _dot(a, b, *, trans_a: bool = False, trans_b: bool = False, precision=None) -> Array:
    """A 2-D matmul with a float32 result (what Triton's tl.dot computes), operands optionally transposed."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _precision(dtype) -> lax.Precision | None:
    """float32 inputs get full-precision dots (no TF32 on GPU), so they match the XLA reference."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _scores(q, k, span_q, span_k, scale_log2, precision, masked: bool):
    """Scores in the log2 domain, (q . k) * scale * log2(e), float32 [bq, bk]; causally masked only
    for blocks that straddle the diagonal (`masked`), the others skip the compare and select."""
    s = _dot(q, k, trans_b=True, precision=precision) * scale_log2
    return jnp.where(span_q[:, None] >= span_k[None, :], s, MASK_VALUE) if masked else s


def _key_block_ranges(q_block, block_q: int, block_k: int):
    """(full, end): key blocks [0, full) are visible to every query of the block, [full, end) only
    partly (the diagonal), and later ones to none: they are skipped."""
    full = lax.div(q_block * block_q, block_k)
    return full, lax.div((q_block + 1) * block_q + block_k - 1, block_k)


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_k: int, precision):
    block_q, H = q_ref.shape
    i = pl.program_id(0)
    scale_log2 = H**-0.5 * LOG2_E
    q = q_ref[...]
    span_q = i * block_q + jnp.arange(block_q)

    def visit(j, carry, masked):
        acc, m, l = carry
        keys = pl.ds(j * block_k, block_k)
        s = _scores(q, k_ref[keys, :], span_q, j * block_k + jnp.arange(block_k), scale_log2, precision, masked)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp2(s - m_new[:, None])
        rescale = jnp.exp2(m - m_new)
        v = v_ref[keys, :]
        acc = acc * rescale[:, None] + _dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_new, l * rescale + jnp.sum(p, axis=-1)

    init = (jnp.zeros((block_q, H), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    full, end = _key_block_ranges(i, block_q, block_k)
    carry = lax.fori_loop(0, full, functools.partial(visit, masked=False), init)
    acc, m, l = lax.fori_loop(full, end, functools.partial(visit, masked=True), carry)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def _forward(q_BPNH, k_BPKH, v_BPKH, cfg: KernelConfig):
    B, P, N, H = q_BPNH.shape
    G = N // k_BPKH.shape[2]
    grid = (P // cfg.block_q, B, N)
    q_spec = pl.BlockSpec((None, cfg.block_q, None, H), lambda i, b, n: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, P, None, H), lambda i, b, n: (b, 0, n // G, 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, block_k=cfg.block_k, precision=_precision(q_BPNH.dtype)),
        grid=grid,
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, cfg.block_q), lambda i, b, n: (b, n, i))],
        out_shape=[jax.ShapeDtypeStruct(q_BPNH.shape, q_BPNH.dtype), jax.ShapeDtypeStruct((B, N, P), jnp.float32)],
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg),
        name="pufferfish_flash_forward",
    )(q_BPNH, k_BPKH, v_BPKH)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, block_k: int, precision):
    block_q, H = q_ref.shape
    i = pl.program_id(0)
    scale = H**-0.5
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    span_q = i * block_q + jnp.arange(block_q)

    def visit(j, dq, masked):
        keys = pl.ds(j * block_k, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = _scores(q, k, span_q, j * block_k + jnp.arange(block_k), scale * LOG2_E, precision, masked)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (_dot(do, v, trans_b=True, precision=precision) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, precision=precision)

    full, end = _key_block_ranges(i, block_q, block_k)
    dq = lax.fori_loop(0, full, functools.partial(visit, masked=False), jnp.zeros((block_q, H), jnp.float32))
    dq = lax.fori_loop(full, end, functools.partial(visit, masked=True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, block_q: int, groups: int,
                padded_len: int, real_q_blocks: int, precision):
    block_k, H = k_ref.shape
    j = pl.program_id(0)
    scale = H**-0.5
    k, v = k_ref[...], v_ref[...]
    span_k = j * block_k + jnp.arange(block_k)
    # Query blocks before `first` see none of these keys, [first, full) see some (the diagonal),
    # [full, real_q_blocks) see all; blocks past the last real query only hold padding.
    first = lax.div(j * block_k, block_q)
    full = jnp.minimum(lax.div((j + 1) * block_k - 1 + block_q - 1, block_q), real_q_blocks)

    def visit_group(g, masked):
        def visit(i, carry):
            dk, dv = carry
            rows = pl.ds(i * block_q, block_q)
            head = pl.ds(g * H, H)  # query head g of this kv head's group, a contiguous slice
            q, do = q_ref[rows, head], do_ref[rows, head]
            stats = pl.ds(g * padded_len + i * block_q, block_q)
            lse, delta = lse_ref[stats], delta_ref[stats]
            s = _scores(q, k, i * block_q + jnp.arange(block_q), span_k, scale * LOG2_E, precision, masked)
            p = jnp.exp2(s - lse[:, None])
            dv = dv + _dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
            ds = p * (_dot(do, v, trans_b=True, precision=precision) - delta[:, None])
            return dk + _dot(ds.astype(q.dtype), q, trans_a=True, precision=precision), dv

        return visit

    carry = (jnp.zeros((block_k, H), jnp.float32), jnp.zeros((block_k, H), jnp.float32))
    for g in range(groups):
        carry = lax.fori_loop(first, full, visit_group(g, masked=True), carry)
        carry = lax.fori_loop(full, real_q_blocks, visit_group(g, masked=False), carry)
    dk, dv = carry
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(cfg: KernelConfig, residuals, do_BPNH):
    q_BPNH, k_BPKH, v_BPKH, o_BPNH, lse_BNP = residuals
    B, P, N, H = q_BPNH.shape
    K = k_BPKH.shape[2]
    G = N // K
    do_BPNH = do_BPNH.astype(q_BPNH.dtype)
    delta_BNP = jnp.einsum("bpnh,bpnh->bnp", o_BPNH.astype(jnp.float32), do_BPNH.astype(jnp.float32))
    precision = _precision(q_BPNH.dtype)

    row_spec = pl.BlockSpec((None, cfg.block_q, None, H), lambda i, b, n: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, P, None, H), lambda i, b, n: (b, 0, n // G, 0))
    stat_spec = pl.BlockSpec((None, None, cfg.block_q), lambda i, b, n: (b, n, i))
    dq_BPNH = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=cfg.block_k, precision=precision),
        grid=(P // cfg.block_q, B, N),
        in_specs=[row_spec, kv_spec, kv_spec, row_spec, stat_spec, stat_spec],
        out_specs=row_spec,
        out_shape=jax.ShapeDtypeStruct(q_BPNH.shape, q_BPNH.dtype),
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg),
        name="pufferfish_flash_dq",
    )(q_BPNH, k_BPKH, v_BPKH, do_BPNH, lse_BNP, delta_BNP)

    # Grouped views: query heads of kv head k are [k*G, (k+1)*G), adjacent in memory.
    group_spec = pl.BlockSpec((None, P, None, G * H), lambda j, b, k: (b, 0, k, 0))
    group_stat_spec = pl.BlockSpec((None, None, G * P), lambda j, b, k: (b, k, 0))
    key_spec = pl.BlockSpec((None, cfg.block_k, None, H), lambda j, b, k: (b, j, k, 0))
    dk_BPKH, dv_BPKH = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=cfg.block_q, groups=G, padded_len=P,
                          real_q_blocks=-(-cfg.seq_len // cfg.block_q), precision=precision),
        grid=(P // cfg.block_k, B, K),
        in_specs=[group_spec, key_spec, key_spec, group_spec, group_stat_spec, group_stat_spec],
        out_specs=[key_spec, key_spec],
        out_shape=[jax.ShapeDtypeStruct(k_BPKH.shape, k_BPKH.dtype), jax.ShapeDtypeStruct(v_BPKH.shape, v_BPKH.dtype)],
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg),
        name="pufferfish_flash_dkv",
    )(q_BPNH.reshape(B, P, K, G * H), k_BPKH, v_BPKH, do_BPNH.reshape(B, P, K, G * H),
      lse_BNP.reshape(B, K, G * P), delta_BNP.reshape(B, K, G * P))
    return dq_BPNH, dk_BPKH, dv_BPKH


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q_BPNH, k_BPKH, v_BPKH, cfg: KernelConfig):
    return _forward(q_BPNH, k_BPKH, v_BPKH, cfg)[0]


def _flash_fwd(q_BPNH, k_BPKH, v_BPKH, cfg: KernelConfig):
    o_BPNH, lse_BNP = _forward(q_BPNH, k_BPKH, v_BPKH, cfg)
    return o_BPNH, (q_BPNH, k_BPKH, v_BPKH, o_BPNH, lse_BNP)


_flash.defvjp(_flash_fwd, _backward)
