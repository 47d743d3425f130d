#!/usr/bin/env python
"""KV-cache decoding against recomputing the full forward for every new token.

    python tools/bench_generate.py [--prompt 64] [--new 256] [--batch 1] [--layers 3] [--d-model 128]
        [--heads 4] [--kv-heads 2] [--vocab 8192] [--dtype bfloat16] [--reps 3]

The default model is the shape `python -m pufferfish_jax plan budget=5m` picks on the project's
2-core CPU (3 layers, d 128, 4 heads / 2 kv heads, vocab 8192, bfloat16), with the context widened
to prompt + new tokens. Both decoders are greedy, run as one compiled `lax.while_loop` and are
timed after a warm-up call, so compilation is excluded and the only difference is the cache:

- kv cache: `pufferfish_jax.generate.generate_batch` (prefill, then one token per step against the cache);
- recompute: every step runs the model over the whole fixed window (prompt + new tokens, later
  slots still zero; causality makes them irrelevant) and reads the logits at the last real position.

Prints tokens/s of each, their ratio, and how many of the generated tokens the two agree on.
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
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from pufferfish_jax.generate import Sampling, generate_batch  # noqa: E402
from pufferfish_jax.model.transformer import Transformer, init_variables  # noqa: E402
from pufferfish_jax.model.spec import ModelSpec  # noqa: E402


def recompute_decoder(spec: ModelSpec):
    """Greedy decoding without a cache: the full forward over the window for every new token."""

    @jax.jit
    def decode(params, window_BW, prompt_len, max_new_tokens):
        def body(carry):
            i, window_BW = carry
            logits_BWV = Transformer(spec).apply({"params": params}, window_BW)
            last_BV = jax.lax.dynamic_index_in_dim(logits_BWV, prompt_len + i - 1, axis=1, keepdims=False)
            token_B = jnp.argmax(last_BV, axis=-1).astype(jnp.int32)
            return i + 1, jax.lax.dynamic_update_slice(window_BW, token_B[:, None], (0, prompt_len + i))

        _, window_BW = jax.lax.while_loop(lambda c: c[0] < max_new_tokens, body, (jnp.int32(0), window_BW))
        return window_BW

    return decode


def timed(fn, reps: int) -> tuple[float, object]:
    result = fn()  # warm-up: compilation
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    window = args.prompt + args.new
    spec = ModelSpec(vocab_size=args.vocab, num_layers=args.layers, d_model=args.d_model, num_heads=args.heads,
                     num_kv_heads=args.kv_heads, head_dim=args.d_model // args.heads,
                     ffn_hidden=64 * -(-8 * args.d_model // (3 * 64)), seq_len=window + 1, dtype=args.dtype)
    params = jax.jit(init_variables, static_argnums=0)(spec, jax.random.key(0))[0]
    prompts = np.random.default_rng(0).integers(1, args.vocab, (args.batch, args.prompt)).tolist()

    cached_s, cached = timed(lambda: generate_batch(spec, params, prompts, Sampling(max_new_tokens=args.new, temperature=0.0, min_new_tokens=0)),
                             args.reps)
    decode = recompute_decoder(spec)
    window_BW = jnp.zeros((args.batch, window), jnp.int32).at[:, : args.prompt].set(jnp.asarray(prompts, jnp.int32))
    recompute_s, recomputed = timed(lambda: decode(params, window_BW, jnp.int32(args.prompt), jnp.int32(args.new)),
                                    args.reps)
    recomputed = np.asarray(recomputed)[:, args.prompt:]
    agree = int(sum((np.asarray(row) == recomputed[b]).sum() for b, row in enumerate(cached)))

    tokens = args.batch * args.new
    table = Table(title=f"greedy decoding on {jax.devices()[0].platform}: {args.new} new tokens after a {args.prompt}-token "
                        f"prompt, batch {args.batch}; {args.layers} layers, d {args.d_model}, {args.heads} heads "
                        f"({args.kv_heads} kv), vocab {args.vocab}, {args.dtype}")
    for column in ("decoder", "seconds", "tokens/s", "ms/token", "speed-up"):
        table.add_column(column, justify="left" if column == "decoder" else "right")
    for name, seconds in (("kv cache", cached_s), ("recompute", recompute_s)):
        table.add_row(name, f"{seconds:.3f}", f"{tokens / seconds:,.0f}", f"{seconds / args.new * 1e3:.2f}",
                      f"{recompute_s / seconds:.1f}x")
    Console(width=160).print(table)
    print(f"the two decoders agree on {agree}/{tokens} generated tokens (bf16 rounding may flip near-ties)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
