"""From a data config to a cached token stream, in memory that does not grow with the corpus.

Three passes over the documents, each streamed (readers.py, hub.py), none holding more than a
chunk of them:

1. scan: each document's split hash and size, 24 bytes a document, give the held-out rule
   (`corpora.split_rule`, the same split a whole-corpus split makes) and the training bytes.
   A Hugging Face stream, and local files bigger than data.scan_max_bytes, are not scanned ahead:
   their documents are split one by one by hash alone (held out when the hash is below
   data.val_fraction), and only those of the head are held-out text (`Split.head_bytes`,
   `corpora.head_bytes`).
2. sample: the BPE tokenizer trains on a deterministic sample of the training documents of
   about data.tokenizer_sample_bytes (those whose second hash is below sample / training bytes;
   the head's training documents when there is one); all of them when the corpus is smaller or it is 0.
3. encode: chunks of documents go through the `tokenizers` batch encoder (parallel in Rust, while
   a thread reads the next chunk) and are appended to the train and val files of the cache entry.

Token stream layout: `EOS doc_1 EOS doc_2 EOS ... doc_n EOS`. Every document token has context
starting at a document boundary, and the predicted tokens of a stream (all but the first) are
exactly the documents' tokens plus one EOS per document; so bits per byte counts each document's
UTF-8 bytes plus one byte per EOS, the separator the EOS stands for.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import ml_collections
import numpy as np
from tokenizers import Tokenizer

from pufferfish_jax.data import cache
from pufferfish_jax.data.cache import PreparedData, token_dtype
from pufferfish_jax.data.corpora import HashSplit, document_hashes, head_bytes, is_stream, iter_documents, split_rule
from pufferfish_jax.data.files import Log, atomic_write, no_log
from pufferfish_jax.data.tokenizer import eos_id, load_or_train_tokenizer
from pufferfish_jax.errors import DataError

_CHUNK_DOCS, _CHUNK_BYTES = 1024, 4 << 20  # documents per encode_batch call: parallel enough, bounded memory
_LOG_EVERY_BYTES = 256 << 20
NEVER, ALWAYS = HashSplit(-1.0), HashSplit(2.0)  # nothing held out / everything held out


@dataclass(frozen=True)
class Split:
    """Which documents train and which are held out: (spec, rule) parts read in order, and the
    training text's size when known ahead (0 for a corpus split by its head), which sizes the
    tokenizer's sample."""

    parts: tuple[tuple[str, HashSplit], ...]
    train_bytes: int
    total_bytes: int = 0  # train and val; 0 for a corpus split by its head
    # The head: the documents read until the training ones hold this many bytes (the tokenizer's
    # sample). Its held-out documents are the held-out text; those after it are read past, on
    # neither side, so the held-out text is complete before training starts and the corpus need
    # never be read whole. 0: the corpus was scanned; every held-out document is held-out text.
    head_bytes: int = 0


def _documents(cfg: ml_collections.ConfigDict, spec: str, cache_dir: Path, log: Log) -> Iterator[str]:
    return iter_documents(spec, cache_dir, max_chars=cfg.max_chars, text_field=cfg.get("text_field", "text"),
                          log=log)


def _hashes(cfg: ml_collections.ConfigDict, spec: str, cache_dir: Path, log: Log) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1: (split hash, UTF-8 bytes + 1) of every document of `spec`."""
    u, size = array("d"), array("q")
    for doc in _documents(cfg, spec, cache_dir, log):
        data = doc.encode("utf-8")
        u.append(document_hashes(data)[0])
        size.append(len(data) + 1)
    if not u:
        raise DataError(f"corpus '{spec}' contains no text; check the files or pick another corpus")
    return np.frombuffer(u, np.float64), np.frombuffer(size, np.int64)


def scan_split(cfg: ml_collections.ConfigDict, cache_dir: Path, *, log: Log = no_log) -> Split:
    """The split of `cfg` (pass 1): the corpus split by content hash, or the corpus and
    data.val_source; no pass for a stream or a corpus split by its head."""
    if is_stream(cfg.corpus) and cfg.val_source:
        return Split(((cfg.corpus, NEVER), (cfg.val_source, ALWAYS)), 0)
    if (head := head_bytes(cfg)) or is_stream(cfg.corpus):
        return Split(((cfg.corpus, HashSplit(cfg.val_fraction)),), 0, head_bytes=head)
    u, size = _hashes(cfg, cfg.corpus, cache_dir, log)
    if cfg.val_source:
        val_bytes = 0 if is_stream(cfg.val_source) else int(_hashes(cfg, cfg.val_source, cache_dir, log)[1].sum())
        return Split(((cfg.corpus, NEVER), (cfg.val_source, ALWAYS)), int(size.sum()), int(size.sum()) + val_bytes)
    rule = split_rule(u, size.astype(np.float64), cfg.val_fraction, cfg.val_min_tokens)
    is_val = rule.is_val(u)
    log(f"corpus {cfg.corpus}: {len(u):,} documents, {int(size.sum()):,} bytes; {int(is_val.sum()):,} held out")
    return Split(((cfg.corpus, rule),), int(size[~is_val].sum()), int(size.sum()))


def sided_documents(cfg: ml_collections.ConfigDict, split: Split, cache_dir: Path,
                    log: Log = no_log) -> Iterator[tuple[str, bytes, bool | None, float]]:
    """(document, its UTF-8 bytes, held out?, sample hash) for every document of the split, in
    order; held out is None for a stream's held-out document past its head (`Split.head_bytes`),
    which is on neither side."""
    train_bytes = 0
    for spec, rule in split.parts:
        for doc in _documents(cfg, spec, cache_dir, log):
            data = doc.encode("utf-8")
            u, v = document_hashes(data)
            held_out = bool(rule.is_val(u))
            if not held_out:
                train_bytes += len(data) + 1
            elif split.head_bytes and train_bytes >= split.head_bytes:
                held_out = None
            yield doc, data, held_out, v


def sample_documents(cfg: ml_collections.ConfigDict, cache_dir: Path, split: Split | None = None, *,
                     log: Log = no_log, held_out: list[str] | None = None) -> Iterator[str]:
    """Pass 2: the training documents the tokenizer learns from (see the module doc); lazy, so a
    cached tokenizer costs no scan. The held-out documents it passes are appended to `held_out`
    (background.py encodes them without reading the corpus again)."""
    split = split or scan_split(cfg, cache_dir, log=log)
    budget = cfg.get("tokenizer_sample_bytes", 0)
    rate = budget / split.train_bytes if budget and split.train_bytes else 1.0
    taken = 0
    for doc, data, is_val, v in sided_documents(cfg, split, cache_dir, log):
        if is_val and held_out is not None:
            held_out.append(doc)
        if is_val is not False or (rate < 1 and v >= rate):
            continue
        if budget and not split.train_bytes and taken >= budget:
            return  # a stream: its first `budget` bytes of training text
        taken += len(data) + 1
        yield doc


def tokenizer_for(data_cfg: ml_collections.ConfigDict, cache_dir: Path, split: Split | None = None, *,
                  log: Log = no_log, held_out: list[str] | None = None) -> Tokenizer:
    """The one place a run's tokenizer comes from: data.tokenizer, or the BPE trained on the
    sample of the training split (cached, so a pipeline's tokenizer stage and a later
    prepare_data share one training)."""
    _, sample_key, _ = cache.keys(data_cfg)
    return load_or_train_tokenizer(sample_documents(data_cfg, cache_dir, split, log=log, held_out=held_out),
                                   data_cfg.vocab_size,
                                   cache_dir, path=data_cfg.tokenizer, corpus_fingerprint=sample_key, log=log)


def read_ahead(items: Iterator, depth: int = 2) -> Iterator:
    """`items`, produced by a thread up to `depth` ahead: reading and parsing (Python) overlap
    encoding (Rust, which releases the GIL). An error in the thread is raised here; closing this
    generator stops the thread."""
    slots: queue.Queue = queue.Queue(depth)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    threading.Thread(target=produce, daemon=True).start()
    try:
        while (item := slots.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def document_chunks(sided: Iterable[tuple[str, bytes, bool | None, float]]) -> Iterator[list[tuple[str, int, bool]]]:
    """(document, bytes, held out?) in lists of at most _CHUNK_DOCS documents or ~_CHUNK_BYTES;
    documents on neither side are left out."""
    chunk, size = [], 0
    for doc, data, held_out, _ in sided:
        if held_out is None:
            continue
        chunk.append((doc, len(data), held_out))
        size += len(data)
        if len(chunk) >= _CHUNK_DOCS or size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


@dataclass
class TokenStream:
    """One token file being appended to, and what it holds so far."""

    file: BinaryIO
    dtype: np.dtype
    tokens: int = 0
    bytes: int = 0
    docs: int = 0

    def append(self, ids: np.ndarray, num_bytes: int, docs: int) -> None:
        self.file.write(ids.astype(self.dtype).tobytes())
        self.tokens, self.bytes, self.docs = self.tokens + ids.size, self.bytes + num_bytes, self.docs + docs


def _ids(encodings: list, eos: int, vocab_size: int) -> np.ndarray:
    ids = np.fromiter(itertools.chain.from_iterable(e.ids + [eos] for e in encodings), np.int64)
    if ids.size and ids.max() >= vocab_size:
        raise DataError(f"the tokenizer produced id {ids.max()} >= its vocab size {vocab_size}; "
                        "the tokenizer.json is inconsistent: fix it or set data.tokenizer='' to train one")
    return ids


PROJECT_AFTER_S = 3.0  # encoding time after which the finish of preparation is projected


def _check_finish(done: int, total: int, elapsed: float, finish_by: float | None) -> None:
    """Raises when encoding at the rate so far would end after `finish_by` (a time.time())."""
    if finish_by is None or not total or elapsed < PROJECT_AFTER_S or not done:
        return
    left_s = (total - done) * elapsed / done
    if (late_s := time.time() + left_s - finish_by) > 0:
        raise DataError(f"tokenizing this corpus ({total / 1e6:,.0f} MB at {done / 1e6 / elapsed:.1f} MB/s here) needs "
                        f"about {left_s:.0f}s more, {late_s:.0f}s past the time the budget leaves for preparing data; "
                        "give a bigger budget once (the tokens are cached, later runs start at once), "
                        "run without one (steps=N), or set data.max_chars")


def encode_into(tok: Tokenizer, chunks: Iterable[list[tuple[str, int, bool]]], train: TokenStream, val: TokenStream,
                log: Log = no_log, *, total_bytes: int = 0, finish_by: float | None = None) -> None:
    """Pass 3: every chunk batch-encoded and appended, document by document, to its side's stream.
    With `finish_by`, stops with a DataError as soon as the rate seen projects past it."""
    eos, vocab_size = eos_id(tok), tok.get_vocab_size()
    start, reported = time.perf_counter(), 0
    for chunk in chunks:
        encodings = tok.encode_batch_fast([doc for doc, _, _ in chunk], add_special_tokens=False)
        for stream, side in ((train, False), (val, True)):
            mine = [(e, n) for e, (_, n, held_out) in zip(encodings, chunk, strict=True) if held_out == side]
            if mine:
                stream.append(_ids([e for e, _ in mine], eos, vocab_size), sum(n + 1 for _, n in mine), len(mine))
        done, elapsed = train.bytes + val.bytes, time.perf_counter() - start
        _check_finish(done, total_bytes, elapsed, finish_by)
        if done - reported >= _LOG_EVERY_BYTES:
            reported = done
            of_total = f" of {total_bytes / 1e6:,.0f}" if total_bytes else ""
            log(f"data: tokenized {done / 1e6:,.0f}{of_total} MB ({done / 1e6 / elapsed:.1f} MB/s)")


def encode_documents(tok: Tokenizer, docs: Sequence[str]) -> tuple[np.ndarray, int]:
    """`EOS doc EOS doc ... EOS` as one array, and the UTF-8 bytes its predicted tokens encode
    (for texts that fit in memory: eval sets)."""
    eos, vocab_size = eos_id(tok), tok.get_vocab_size()
    parts = [np.array([eos], np.int64)]
    for i in range(0, len(docs), _CHUNK_DOCS):
        parts.append(_ids(tok.encode_batch_fast(list(docs[i:i + _CHUNK_DOCS]), add_special_tokens=False),
                          eos, vocab_size))
    num_bytes = sum(len(d.encode("utf-8")) + 1 for d in docs)
    return np.concatenate(parts).astype(token_dtype(vocab_size)), num_bytes


def _write_entry(cfg: ml_collections.ConfigDict, split: Split, tok: Tokenizer, cache_dir: Path, key: str,
                 log: Log, finish_by: float | None) -> None:
    """Encodes the split into the cache entry `key`: the two streams, then the meta file."""
    meta_path, train_path, val_path = cache.paths(cache_dir, key)
    dtype, eos = token_dtype(tok.get_vocab_size()), np.array([eos_id(tok)])
    with atomic_write(train_path) as train_file, atomic_write(val_path) as val_file:
        train, val = TokenStream(train_file, dtype), TokenStream(val_file, dtype)
        train.append(eos, 0, 0)
        val.append(eos, 0, 0)
        encode_into(tok, read_ahead(document_chunks(sided_documents(cfg, split, cache_dir, log))), train, val, log,
                    total_bytes=split.total_bytes, finish_by=finish_by)
        if not train.docs or not val.docs:
            side = "training" if not train.docs else "held-out"
            raise DataError(f"corpus '{cfg.corpus}' gave no {side} documents; add text, raise or lower "
                            "data.val_fraction, or set data.val_source")
    cache.write_meta(meta_path, tok, dtype, train_tokens=train.tokens, train_bytes=train.bytes, train_docs=train.docs,
                     val_tokens=val.tokens, val_bytes=val.bytes, val_docs=val.docs)


def prepare_data(data_cfg: ml_collections.ConfigDict, cache_dir: Path, *, log: Log = no_log,
                 finish_by: float | None = None, split: Split | None = None) -> PreparedData:
    """Corpus -> split -> tokenizer -> token streams, cached under `cache_dir`, in bounded memory.

    `finish_by` (a time.time(), e.g. part of a budget): a corpus whose encoding, at the rate
    measured over its first seconds, would end later stops then with a one-line DataError, instead
    of spending the budget; a stream (size unknown) is not checked.

    A warm call (same corpus files, split and tokenizer settings) reads only the cache: the corpus is
    identified by cheap fingerprints (archive pins, file sizes and mtimes), never re-read. A `split`
    already scanned (background.py) is not scanned again.
    """
    start = time.perf_counter()
    cache_dir = Path(cache_dir)
    _, _, key = cache.keys(data_cfg)
    if (cached := cache.load_cached(cache_dir, key, start)) is not None:
        log(f"data: cached token streams {key} ({cached.train_tokens.size:,} train / "
            f"{cached.val_tokens.size:,} val tokens)")
        return cached
    split = split or scan_split(data_cfg, cache_dir, log=log)
    tok = tokenizer_for(data_cfg, cache_dir, split, log=log)
    log("data: tokenizing")
    _write_entry(data_cfg, split, tok, cache_dir, key, log, finish_by)
    prepared = cache.load_cached(cache_dir, key, start)
    assert prepared is not None, "token cache unreadable right after writing it"
    log(f"data: {prepared.train_tokens.size:,} train / {prepared.val_tokens.size:,} val tokens "
        f"in {prepared.prep_seconds:.1f}s")
    return prepared
