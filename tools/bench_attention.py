#!/usr/bin/env python
"""Attention backends head to head: forward+backward time and achieved TFLOP/s per shape.

    python tools/bench_attention.py [--seq 1024,4096] [--head-dim 64,128] [--dtype bfloat16]
        [--backends pallas,cudnn,xla] [--batch 4] [--heads 16] [--kv-heads 8] [--pallas-blocks 64x64,128x64]

Each row times one jitted step computing causal GQA attention and its gradients with respect to q,
k and v (the training cost), median of --reps runs after a warm-up. TFLOP/s counts the useful
causal FLOPs, the same for every backend: forward 2 matmuls x 2*B*N*T*T*H / 2 (half the scores are
masked), backward 2.5x the forward. "vs xla" and "vs cudnn" are time ratios measured in this run
(> 1: faster than that backend). "err" is the largest |o - o_xla| / max |o_xla| in the compute dtype.
A backend this platform cannot run is listed with the reason, a failure with its first line, so one
broken backend never hides the others. Pallas on CPU runs interpreted: correct, not fast.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from pufferfish_jax.model.attention import backend_problem, run_backend  # noqa: E402
from pufferfish_jax.model.kernels.flash_attention import flash_attention  # noqa: E402


def causal_flops(B: int, T: int, N: int, H: int) -> float:
    forward = 2 * 2 * B * N * T * T * H / 2
    return forward * 3.5


def attention_fn(backend: str):
    if backend.startswith("pallas:"):
        block_q, block_k = (int(b) for b in backend.split(":")[1].split("x"))
        return lambda q, k, v: flash_attention(q, k, v, block_q=block_q, block_k=block_k)
    return lambda q, k, v: run_backend(backend, q, k, v)


def time_step(fn, q, k, v, reps: int) -> float:
    """Median seconds of one forward+backward step."""
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
    jax.block_until_ready(step(q, k, v))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(step(q, k, v))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    on_gpu = jax.default_backend() == "gpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="1024,4096" if on_gpu else "256,512")
    parser.add_argument("--head-dim", default="64,128" if on_gpu else "64")
    parser.add_argument("--dtype", default="bfloat16" if on_gpu else "float32")
    parser.add_argument("--backends", default="pallas,cudnn,xla")
    parser.add_argument("--pallas-blocks", default="64x64", help="block_q x block_k variants of our kernel, comma-separated")
    parser.add_argument("--batch", type=int, default=4 if on_gpu else 1)
    parser.add_argument("--heads", type=int, default=16 if on_gpu else 4)
    parser.add_argument("--kv-heads", type=int, default=8 if on_gpu else 2)
    parser.add_argument("--reps", type=int, default=10 if on_gpu else 3)
    args = parser.parse_args()

    device = jax.devices()[0]
    table = Table(title=f"causal GQA attention, forward+backward on {device.platform} ({device.device_kind}), "
                        f"batch {args.batch}, {args.heads} heads / {args.kv_heads} kv heads, {args.dtype}")
    for column in ("T", "head dim", "backend", "ms", "TFLOP/s", "vs xla", "vs cudnn", "err"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    backends = []
    for name in args.backends.split(","):
        if name == "pallas":
            backends += [f"pallas:{blocks}" for blocks in args.pallas_blocks.split(",")]
        else:
            backends.append(name)

    for T in (int(t) for t in args.seq.split(",")):
        for H in (int(h) for h in args.head_dim.split(",")):
            kq, kk, kv = jax.random.split(jax.random.key(0), 3)
            q = jax.random.normal(kq, (args.batch, T, args.heads, H), args.dtype)
            k = jax.random.normal(kk, (args.batch, T, args.kv_heads, H), args.dtype)
            v = jax.random.normal(kv, (args.batch, T, args.kv_heads, H), args.dtype)
            reference = jax.jit(attention_fn("xla"))(q, k, v).astype(jnp.float32)
            scale = float(jnp.max(jnp.abs(reference)))
            results: dict[str, float] = {}
            rows = []
            for backend in backends:
                label = backend.replace(":", " ") + (" (interpreted)" if backend.startswith("pallas") and not on_gpu else "")
                problem = backend_problem(backend.split(":")[0], q)
                if problem:
                    rows.append((label, f"n/a: {problem}"))
                    continue
                try:
                    fn = attention_fn(backend)
                    err = float(jnp.max(jnp.abs(jax.jit(fn)(q, k, v).astype(jnp.float32) - reference))) / scale
                    seconds = time_step(fn, q, k, v, args.reps)
                except Exception as e:  # noqa: BLE001 - report and go on to the next backend
                    rows.append((label, f"failed: {str(e).strip().splitlines()[0][:80]}"))
                    continue
                results[backend] = seconds
                rows.append((label, seconds, err))
            for row in rows:
                if len(row) == 2:
                    table.add_row(str(T), str(H), f"{row[0]}: {row[1]}", "", "", "", "", "")
                    continue
                label, seconds, err = row
                ratio = lambda base: f"{results[base] / seconds:.2f}x" if base in results else "-"
                table.add_row(str(T), str(H), label, f"{seconds * 1e3:.2f}",
                              f"{causal_flops(args.batch, T, args.heads, H) / seconds / 1e12:.2f}",
                              ratio("xla"), ratio("cudnn"), f"{err:.1e}")
            table.add_section()
    Console(width=160).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
