"""Validation loss in nats/token and bits per byte, so models with different tokenizers compare."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from pufferfish_jax import sharding
from pufferfish_jax.data.pipeline import eval_batches


@dataclass(frozen=True)
class EvalResult:
    loss: float  # nats per token
    bpb: float  # bits per UTF-8 byte of the evaluated text
    tokens: int
    bpb_se: float = math.nan  # standard error of bpb over eval windows (`window_loss`); nan under 2 windows


def window_loss(nll_W: np.ndarray, count_W: np.ndarray) -> tuple[float, float]:
    """(mean nll per token, its standard error) from each eval window's summed nll and token count.

    The loss is the ratio sum(nll) / sum(count), every token weighted alike; its standard error is
    the ratio estimator's (delta method) over windows as independent samples:
    sqrt(W / (W - 1) * sum((nll_w - loss * count_w)^2)) / sum(count), which for equal windows is
    the plain standard error of the mean of the per-window losses, and weights a short last
    window by its tokens. Windows of one document are correlated, so this is a lower bound on the
    true uncertainty; it is nan with fewer than 2 windows (no spread to measure). Windows with no
    tokens (the padding rows of the last batch) are not samples and are left out.
    """
    keep = count_W > 0
    nll_W, count_W = np.asarray(nll_W, np.float64)[keep], np.asarray(count_W, np.float64)[keep]
    total = count_W.sum()
    loss = float(nll_W.sum() / max(total, 1.0))
    windows = len(count_W)
    if windows < 2:
        return loss, math.nan
    residual_W = nll_W - loss * count_W
    return loss, float(math.sqrt(windows / (windows - 1) * (residual_W ** 2).sum()) / total)


def evaluate(eval_step: Callable, variables: dict, val_tokens: np.ndarray, val_bytes: int, *, seq_len: int,
             batch_size: int, mesh: Mesh, max_tokens: int = 0) -> EvalResult:
    """Runs eval_step over the held-out stream (all of it when max_tokens is 0); `variables` is
    what the model applies (`TrainState.variables`); each process hands over only its rows of
    each batch.

    bpb = nats * tokens / (bytes * ln 2). A partial eval charges the bytes pro rata to the tokens
    it covered, which is exact in expectation and good enough for the progress curve; the final
    eval covers every token, so its bpb is exact. The same bytes-per-token ratio converts the
    loss's standard error over windows (`window_loss`) into bpb_se: it measures how much the
    score would move on other text like this, not the (small) error of the byte count.
    """
    # Each batch's results stay on the device until the end: reading them back one by one would make
    # the host wait for every step, where it could be preparing and dispatching the next batches.
    parts = [eval_step(variables, sharding.shard_batch(window, mesh), sharding.shard_batch(mask, mesh))
             for window, mask in eval_batches(val_tokens, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)]
    nll_parts, count_parts = zip(*jax.device_get(parts))  # no batches: a ValueError, as np.concatenate gave
    nll_W, count_W = np.concatenate(nll_parts), np.concatenate(count_parts)
    loss, loss_se = window_loss(nll_W, count_W)
    total_count = float(count_W.sum())
    covered_bytes = val_bytes * total_count / max(len(val_tokens) - 1, 1)
    bits_per_nat_token = total_count / (max(covered_bytes, 1.0) * math.log(2))
    return EvalResult(loss=loss, bpb=loss * bits_per_nat_token, tokens=int(total_count),
                      bpb_se=loss_se * bits_per_nat_token)
