#!/usr/bin/env python
"""The tied LM head + cross-entropy, plain against a fused chunked form, forward + backward.

    python tools/bench_head_ce.py [--batches 4,8,16] [--dtype bfloat16] [--rounds 7]

Interleaved rounds in one process at d_model 128, seq 256, vocab 8192 (the planner's small
shape), medians and minima in ms. The fused form (docs/perf.md, attempt 16; not kept in the
package) runs the tokens through in chunks: a chunk's float32 logits, log-sum-exp, loss and
gradient (softmax - onehot) / n stay in cache, and the gradients of x and of the embedding are
made in the forward pass (the mean loss is the last op; its backward only scales them), so the
[B*T, V] logits never exist whole and nothing is recomputed. Both forms' values are printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


CHUNK = 512


def fused_head_cross_entropy():
    """mean CE(softmax(x . emb^T), y) as a custom-VJP op, chunked over the B*T tokens."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    def loss_and_grads(x_BTD, emb_VD, y_BT):
        B, T, D = x_BTD.shape
        n, w_VD = B * T, emb_VD.astype(x_BTD.dtype)

        def one_chunk(dw_DV, xy):
            x_CD, y_C = xy
            logits_CV = jnp.einsum("cd,vd->cv", x_CD, w_VD, preferred_element_type=jnp.float32)
            lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
            nll = (lse_C - jnp.take_along_axis(logits_CV, y_C[:, None], axis=-1)[:, 0]).sum()
            g_CV = ((jnp.exp(logits_CV - lse_C[:, None]) - jax.nn.one_hot(y_C, w_VD.shape[0])) / n).astype(x_CD.dtype)
            dx_CD = jnp.einsum("cv,vd->cd", g_CV, w_VD, preferred_element_type=jnp.float32).astype(x_CD.dtype)
            return dw_DV + jnp.einsum("cd,cv->dv", x_CD, g_CV, preferred_element_type=jnp.float32), (nll, dx_CD)

        xs = (x_BTD.reshape(n // CHUNK, CHUNK, D), y_BT.reshape(n // CHUNK, CHUNK))
        dw_DV, (nll_N, dx) = jax.lax.scan(one_chunk, jnp.zeros((D, w_VD.shape[0]), jnp.float32), xs)
        return nll_N.sum() / n, dx.reshape(x_BTD.shape), jax.lax.optimization_barrier(dw_DV).T

    @functools.partial(jax.custom_vjp)
    def fused(x_BTD, emb_VD, y_BT):
        return loss_and_grads(x_BTD, emb_VD, y_BT)[0]

    def fwd(x_BTD, emb_VD, y_BT):
        loss, dx, dw = loss_and_grads(x_BTD, emb_VD, y_BT)
        return loss, (dx, dw, y_BT)

    def bwd(res, g):
        dx, dw, y_BT = res
        return dx * g.astype(dx.dtype), dw * g, np.zeros(y_BT.shape, jax.dtypes.float0)

    fused.defvjp(fwd, bwd)
    return fused


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="4,8,16")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from pufferfish_jax.model.layers import dot

    fused = fused_head_cross_entropy()

    for batch in (int(b) for b in args.batches.split(",")):
        x = jax.random.normal(jax.random.key(1), (batch, 256, 128), jnp.dtype(args.dtype))
        emb = jax.random.normal(jax.random.key(2), (8192, 128)) * 0.02
        y = jax.random.randint(jax.random.key(3), (batch, 256), 0, 8192)
        forms = {"plain": lambda x, e: optax.softmax_cross_entropy_with_integer_labels(dot("btd,vd->btv", x, e), y).mean(),
                 "fused": lambda x, e: fused(x, e, y)}
        steps = {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for k, f in forms.items()}
        times = {k: [] for k in steps}
        values = {k: float(f(x, emb)[0]) for k, f in steps.items()}
        for _ in range(args.rounds):
            for k, f in steps.items():
                start = time.perf_counter()
                jax.block_until_ready(f(x, emb))
                times[k].append((time.perf_counter() - start) * 1e3)
        (plain, fused) = (np.median(times["plain"]), np.median(times["fused"]))
        print(f"batch {batch:3d} {args.dtype}: plain {plain:7.1f} ms (min {min(times['plain']):.1f}), fused "
              f"{fused:7.1f} ms (min {min(times['fused']):.1f}), fused speed-up {plain / fused:.2f}x "
              f"({4 * batch * 256 * 8192 / 2**20:.0f} MiB of float32 logits; loss {values['plain']:.6f} vs "
              f"{values['fused']:.6f})", flush=True)


if __name__ == "__main__":
    main()
