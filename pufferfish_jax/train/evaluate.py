"""Validation loss in nats/token and bits per byte, so models with different tokenizers compare."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from jax.sharding import Mesh

from pufferfish_jax import sharding
from pufferfish_jax.data.pipeline import eval_batches


@dataclass(frozen=True)
class EvalResult:
    loss: float  # nats per token
    bpb: float  # bits per UTF-8 byte of the evaluated text
    tokens: int


def evaluate(eval_step: Callable, variables: dict, val_tokens: np.ndarray, val_bytes: int, *, seq_len: int,
             batch_size: int, mesh: Mesh, max_tokens: int = 0) -> EvalResult:
    """Runs eval_step over the held-out stream (all of it when max_tokens is 0); `variables` is
    what the model applies (`TrainState.variables`); each process hands over only its rows of
    each batch.

    bpb = nats * tokens / (bytes * ln 2). A partial eval charges the bytes pro rata to the tokens
    it covered, which is exact in expectation and good enough for the progress curve; the final
    eval covers every token, so its bpb is exact.
    """
    total_nll, total_count = 0.0, 0.0
    for window, mask in eval_batches(val_tokens, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens):
        nll, count = eval_step(variables, sharding.shard_batch(window, mesh), sharding.shard_batch(mask, mesh))
        total_nll += float(nll)
        total_count += float(count)
    loss = total_nll / max(total_count, 1.0)
    covered_bytes = val_bytes * total_count / max(len(val_tokens) - 1, 1)
    return EvalResult(loss=loss, bpb=total_nll / (max(covered_bytes, 1.0) * math.log(2)), tokens=int(total_count))
