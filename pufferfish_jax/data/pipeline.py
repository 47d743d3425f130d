"""From a data config to a cached token stream, and from a token stream to batches.

Token stream layout: `EOS doc_1 EOS doc_2 EOS ... doc_n EOS`. Every document token has context
starting at a document boundary, and the predicted tokens of a stream (all but the first) are
exactly the documents' tokens plus one EOS per document; so bits per byte counts each document's
UTF-8 bytes plus one byte per EOS, the separator the EOS stands for.

The streams are cached as raw memmaps keyed by everything that determines them, so a warm start
costs a JSON read and two mmaps. Training batches are a pure function of (seed, step): resuming at
step k needs no replay and no saved iterator state.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grain
import ml_collections
import numpy as np
import tokenizers
from tokenizers import Tokenizer

from pufferfish_jax.data.corpora import corpus_fingerprint, load_documents, split_documents
from pufferfish_jax.data.files import Log, atomic_write, no_log
from pufferfish_jax.data.tokenizer import eos_id, load_or_train_tokenizer
from pufferfish_jax.errors import DataError

_CACHE_VERSION = 1  # bump when the stream layout or the meta fields change
_ENCODE_CHUNK = 1024  # documents per encode_batch call: parallel enough, bounded memory


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class PreparedData:
    """Everything training needs from the data side, ready to use."""

    tokenizer: Tokenizer
    tokenizer_json: str
    train_tokens: np.ndarray  # [train_len] uint16/uint32 memmap
    val_tokens: np.ndarray  # [val_len]
    train_bytes: int
    val_bytes: int  # UTF-8 bytes the predicted val tokens encode (one per EOS included)
    vocab_size: int
    fingerprint: str  # corpus + split + tokenizer: names the cache and identifies the data in runs
    prep_seconds: float


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every id: halves the cache and mmap reads for <= 64K."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _file_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
    except OSError:
        raise DataError(f"tokenizer file {path} cannot be read; fix data.tokenizer or set it to '' "
                        "to train one") from None


def _keys(cfg: ml_collections.ConfigDict) -> tuple[str, str]:
    """(split key, cache key): what fixes the train/val documents, and that plus the tokenizer."""
    split_key = _digest(_CACHE_VERSION, corpus_fingerprint(cfg.corpus),
                        corpus_fingerprint(cfg.val_source) if cfg.val_source else "",
                        cfg.val_fraction, cfg.val_min_tokens, cfg.max_chars)
    tokenizer_key = _file_digest(cfg.tokenizer) if cfg.tokenizer else [cfg.vocab_size, tokenizers.__version__]
    return split_key, _digest(split_key, tokenizer_key)


def encode_documents(tok: Tokenizer, docs: Sequence[str]) -> tuple[np.ndarray, int]:
    """`EOS doc EOS doc ... EOS` as one array, and the UTF-8 bytes its predicted tokens encode."""
    vocab_size = tok.get_vocab_size()
    eos = eos_id(tok)
    parts, num_bytes = [np.array([eos], np.int64)], 0
    for i in range(0, len(docs), _ENCODE_CHUNK):
        chunk = docs[i:i + _ENCODE_CHUNK]
        encodings = tok.encode_batch_fast(chunk, add_special_tokens=False)
        ids = np.fromiter(itertools.chain.from_iterable(e.ids + [eos] for e in encodings), np.int64)
        if ids.size and ids.max() >= vocab_size:
            raise DataError(f"the tokenizer produced id {ids.max()} >= its vocab size {vocab_size}; "
                            "the tokenizer.json is inconsistent: fix it or set data.tokenizer='' to train one")
        parts.append(ids)
        num_bytes += sum(len(d.encode("utf-8")) for d in chunk) + len(chunk)
    return np.concatenate(parts).astype(token_dtype(vocab_size)), num_bytes


def _write_stream(docs: Sequence[str], tok: Tokenizer, path: Path) -> tuple[int, int]:
    """Encodes `docs` into the memmap file `path`; returns (tokens, bytes)."""
    tokens, num_bytes = encode_documents(tok, docs)
    with atomic_write(path) as f:
        f.write(tokens.tobytes())
    return tokens.size, num_bytes


def _paths(cache_dir: Path, key: str) -> tuple[Path, Path, Path]:
    folder = Path(cache_dir) / "tokens"
    return folder / f"{key}.json", folder / f"{key}.train.bin", folder / f"{key}.val.bin"


def _load_cached(cache_dir: Path, key: str, start: float) -> PreparedData | None:
    """The cached streams for `key`, or None if absent or inconsistent (then they are rebuilt)."""
    meta_path, train_path, val_path = _paths(cache_dir, key)
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        train = np.memmap(train_path, dtype=dtype, mode="r")
        val = np.memmap(val_path, dtype=dtype, mode="r")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (train.size, val.size) != (meta["train_tokens"], meta["val_tokens"]):
        return None
    tok = Tokenizer.from_str(meta["tokenizer"])
    return PreparedData(tokenizer=tok, tokenizer_json=meta["tokenizer"], train_tokens=train,
                        val_tokens=val, train_bytes=meta["train_bytes"], val_bytes=meta["val_bytes"],
                        vocab_size=tok.get_vocab_size(), fingerprint=key,
                        prep_seconds=time.perf_counter() - start)


def load_split(data_cfg: ml_collections.ConfigDict, cache_dir: Path, *,
               log: Log = no_log) -> tuple[list[str], list[str]]:
    """(train, val) documents: the corpus split by content hash (at least about data.val_min_tokens
    held out, `split_documents`), or the corpus and data.val_source."""
    docs = load_documents(data_cfg.corpus, cache_dir, max_chars=data_cfg.max_chars, log=log)
    if data_cfg.val_source:
        return docs, load_documents(data_cfg.val_source, cache_dir, max_chars=data_cfg.max_chars, log=log)
    return split_documents(docs, data_cfg.val_fraction, data_cfg.val_min_tokens)


def tokenizer_for(data_cfg: ml_collections.ConfigDict, train_docs: Sequence[str], cache_dir: Path, *,
                  log: Log = no_log) -> Tokenizer:
    """The tokenizer `prepare_data` uses for these settings: data.tokenizer, or the BPE trained on
    `train_docs` (cached under the split's key, so a pipeline's tokenizer stage and a later
    prepare_data share one training)."""
    split_key, _ = _keys(data_cfg)
    return load_or_train_tokenizer(train_docs, data_cfg.vocab_size, cache_dir, path=data_cfg.tokenizer,
                                   corpus_fingerprint=split_key, log=log)


def prepare_data(data_cfg: ml_collections.ConfigDict, cache_dir: Path, *, log: Log = no_log) -> PreparedData:
    """Corpus -> documents -> split -> tokenizer -> token streams, cached under `cache_dir`.

    A warm call (same corpus files, split and tokenizer settings) reads only the cache: the corpus is
    identified by cheap fingerprints (archive pins, file sizes and mtimes), never re-read.
    """
    start = time.perf_counter()
    cache_dir = Path(cache_dir)
    _, key = _keys(data_cfg)
    if (cached := _load_cached(cache_dir, key, start)) is not None:
        log(f"data: cached token streams {key} ({cached.train_tokens.size:,} train / "
            f"{cached.val_tokens.size:,} val tokens)")
        return cached

    train_docs, val_docs = load_split(data_cfg, cache_dir, log=log)
    log(f"split: {len(train_docs):,} train / {len(val_docs):,} val documents")
    tok = tokenizer_for(data_cfg, train_docs, cache_dir, log=log)

    meta_path, train_path, val_path = _paths(cache_dir, key)
    log("data: tokenizing")
    train_tokens, train_bytes = _write_stream(train_docs, tok, train_path)
    val_tokens, val_bytes = _write_stream(val_docs, tok, val_path)
    meta = dict(version=_CACHE_VERSION, dtype=token_dtype(tok.get_vocab_size()).name,
                train_tokens=train_tokens, val_tokens=val_tokens, train_bytes=train_bytes,
                val_bytes=val_bytes, train_docs=len(train_docs), val_docs=len(val_docs),
                tokenizer=tok.to_str())
    with atomic_write(meta_path) as f:  # written last: its presence marks a complete cache
        f.write(json.dumps(meta).encode())
    prepared = _load_cached(cache_dir, key, start)
    assert prepared is not None, "token cache unreadable right after writing it"
    log(f"data: {train_tokens:,} train / {val_tokens:,} val tokens in {prepared.prep_seconds:.1f}s")
    return prepared


def unigram_bpb(train_tokens: np.ndarray, val_tokens: np.ndarray, val_bytes: int, vocab_size: int) -> float:
    """Bits per byte on val of a model that knows only train token frequencies (add-one smoothed).

    The floor any LM must beat; scored on the same predicted tokens as `eval_batches`
    (val_tokens[1:]), so it compares directly with the model's bits per byte.
    """
    counts_v = np.bincount(train_tokens, minlength=vocab_size) + 1
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
