"""From a token stream to batches, and the unigram baseline.

Training batches are a pure function of (seed, step): resuming at step k needs no replay and no
saved iterator state. Preparing the token streams lives in prepare.py and the token cache in
cache.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import grain
import numpy as np

from pufferfish_jax.errors import DataError


# The unigram baseline counts at most this many training tokens: the frequencies of a few thousand
# token types are settled long before that, while counting a memmap of gigabytes reads it all from
# disk first (7 s for the 260 M tokens of a 1 GB corpus here, before a warm run's first step).
UNIGRAM_FIT_TOKENS = 1 << 24


def unigram_bpb(train_tokens: np.ndarray, val_tokens: np.ndarray, val_bytes: int, vocab_size: int) -> float:
    """Bits per byte on val of a model that knows only the frequencies of the training tokens
    (the first UNIGRAM_FIT_TOKENS of them), add-one smoothed.

    The floor any LM must beat; scored on the same predicted tokens as `eval_batches`
    (val_tokens[1:]), so it compares directly with the model's bits per byte.
    """
    counts_v = np.bincount(train_tokens[:UNIGRAM_FIT_TOKENS], minlength=vocab_size) + 1
    log2_p_v = np.log2(counts_v) - np.log2(counts_v.sum())
    val_counts_v = np.bincount(val_tokens[1:], minlength=vocab_size)
    return float(-(val_counts_v @ log2_p_v) / val_bytes)


def num_windows_available(tokens: np.ndarray, seq_len: int) -> int:
    """Non-overlapping training windows of seq_len + 1 tokens (stride seq_len) in `tokens`."""
    return max(0, (len(tokens) - 1) // seq_len)


class _Windows:
    """Grain source: window i is tokens[s : s + seq_len + 1] with s = window_ids[i] * seq_len."""

    def __init__(self, tokens: np.ndarray, seq_len: int, window_ids: np.ndarray):
        self._tokens, self._seq_len, self._window_ids = tokens, seq_len, window_ids

    def __len__(self) -> int:
        return len(self._window_ids)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self._window_ids[i]) * self._seq_len
        return np.asarray(self._tokens[start:start + self._seq_len + 1], dtype=np.int32)


def _batch_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                   num_windows: int, part: tuple[int, int] = (0, 1)) -> grain.MapDataset:
    """The infinite, randomly addressable sequence of training batches, or of one part of each.

    The window subset comes from one seed-fixed permutation and is materialized, so it is the
    same every epoch; grain's shuffle then draws a fresh order per epoch (its seed + epoch). The two
    seeds are hashed from `seed`, so runs with seeds s and s + 1 do not share epoch orders.
    `part` = (index, count) keeps rows [index * b, (index + 1) * b), b = batch_size / count, of
    every batch: batch k is windows [k * batch_size, (k + 1) * batch_size) of one shuffled stream,
    so the parts of all processes put together are the one-process batch, and each process reads
    only its own windows.

    The batches drop their remainder: the stream is endless (sys.maxsize windows), and grain sizes
    a batched dataset as math.ceil(len / b) in floating point unless it drops the remainder, which
    for a part of one row rounds to 2**63, past an index-sized int, so slicing it raised
    OverflowError (batch 1, or any batch split into one-row parts). Floor division is exact, and
    the one batch it drops lies past any step a run can reach.
    """
    available = num_windows_available(tokens, seq_len)
    index, count = part
    if seq_len <= 0 or batch_size <= 0 or seed < 0 or num_windows < 0:
        raise DataError(f"seq_len={seq_len}, batch_size={batch_size} must be positive and seed={seed}, "
                        f"num_windows={num_windows} non-negative; fix the model/train settings")
    if count <= 0 or batch_size % count or not 0 <= index < count:
        raise DataError(f"part {index} of {count} does not split a batch of {batch_size}; "
                        "make train.batch_size a multiple of the data-parallel processes")
    if available == 0 or num_windows > available:
        raise DataError(f"the training text has {available:,} windows of {seq_len + 1} tokens but "
                        f"{max(num_windows, 1):,} are needed; use a bigger corpus or a shorter model.seq_len")
    subset_seed, order_seed = np.random.SeedSequence(seed).generate_state(2)
    window_ids = (np.random.default_rng(subset_seed).permutation(available)[:num_windows]
                  if num_windows else np.arange(available))
    source = grain.MapDataset.source(_Windows(tokens, seq_len, window_ids))
    return source.shuffle(int(order_seed)).repeat().batch(batch_size // count, drop_remainder=True)[index::count]


def batch_at(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int, step: int,
             num_windows: int = 0, part: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Batch `step` of `train_batches`, computed directly: [batch_size / part count, seq_len + 1] int32."""
    return _batch_dataset(tokens, seq_len=seq_len, batch_size=batch_size, seed=seed,
                          num_windows=num_windows, part=part)[step]


def _closing(iterator: grain.DatasetIterator) -> Iterator[np.ndarray]:
    """Yields from a grain iterator and stops its prefetch threads when closed or collected."""
    try:
        yield from iterator
    finally:
        iterator.close()


def train_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int, start_step: int = 0,
                  num_windows: int = 0, part: tuple[int, int] = (0, 1), num_threads: int = 2,
                  prefetch: int = 4) -> Iterator[np.ndarray]:
    """Endless training batches [batch_size, seq_len + 1] int32, from batch `start_step` on; with
    `part` = (index, count), only rows [index * b, (index + 1) * b) of each, b = batch_size / count.

    Windows of seq_len + 1 tokens at stride seq_len (each target is predicted once per epoch);
    `num_windows` > 0 trains on a fixed seed-chosen subset of that many windows. Every epoch is
    a fresh shuffle. Batch k equals `batch_at(..., step=k)`, so a resumed run sees exactly the
    batches an uninterrupted one would. Batches are read ahead by `num_threads` threads; close the
    iterator (or drop it) to stop them.
    """
    dataset = _batch_dataset(tokens, seq_len=seq_len, batch_size=batch_size, seed=seed,
                             num_windows=num_windows, part=part)[start_step:]
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return _closing(iter(dataset.to_iter_dataset(options)))


def _eval_iter(val_tokens: np.ndarray, seq_len: int, batch_size: int,
               num_windows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for first in range(0, num_windows, batch_size):
        tokens_bt = np.zeros((batch_size, seq_len + 1), np.int32)
        mask_bt = np.zeros((batch_size, seq_len), np.float32)
        for row, window in enumerate(range(first, min(first + batch_size, num_windows))):
            chunk = val_tokens[window * seq_len:window * seq_len + seq_len + 1]
            tokens_bt[row, :len(chunk)] = chunk
            mask_bt[row, :len(chunk) - 1] = 1.0
        yield tokens_bt, mask_bt


def eval_batches(val_tokens: np.ndarray, *, seq_len: int, batch_size: int,
                 max_tokens: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens [B, seq_len + 1] int32, mask [B, seq_len] float32) over the val stream in order.

    Non-overlapping windows; the last one is padded and masked, and missing rows of the last batch
    are whole masked rows, so every batch has the same shape (one compiled eval step) and every val
    token but the first is a target exactly once. `max_tokens` > 0 stops after the first whole batches
    covering at least that many targets: a cheap, fixed subset for periodic evals.
    """
    if seq_len <= 0 or batch_size <= 0:
        raise DataError(f"seq_len={seq_len} and batch_size={batch_size} must be positive; fix the eval settings")
    num_windows = math.ceil(max(len(val_tokens) - 1, 0) / seq_len)
    if max_tokens > 0:
        num_windows = min(num_windows, math.ceil(max_tokens / (seq_len * batch_size)) * batch_size)
    return _eval_iter(val_tokens, seq_len, batch_size, num_windows)
