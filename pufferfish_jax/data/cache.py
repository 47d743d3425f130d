"""The token cache: what names an entry, and reading one back.

An entry is `tokens/<key>.train.bin` and `<key>.val.bin` (raw uint16/uint32 token streams, read
as memmaps) and `<key>.json` (sizes, dtype, the tokenizer), written last: its presence marks a
complete entry, so an interrupted preparation leaves nothing a later run would trust. The key
covers everything that determines the tokens, computed from cheap fingerprints (archive pins, file
sizes and mtimes), so a warm start costs a JSON read and two mmaps.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ml_collections
import numpy as np
import tokenizers
from tokenizers import Tokenizer

from pufferfish_jax.data.corpora import corpus_fingerprint, head_bytes
from pufferfish_jax.data.files import atomic_write
from pufferfish_jax.errors import DataError

if TYPE_CHECKING:
    from pufferfish_jax.data.growing import GrowingTokens, StreamSchedule

CACHE_VERSION = 1  # bump when the stream layout or the meta fields change


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
    # Set while the train stream is still being written (background.py), and for a run that reads
    # it by a visibility schedule (growing.py); then train_tokens is what step 0 may use.
    growing: GrowingTokens | None = None
    schedule: StreamSchedule | None = None


def write_meta(meta_path: Path, tok: Tokenizer, dtype: np.dtype, *, train_tokens: int, train_bytes: int,
               train_docs: int, val_tokens: int, val_bytes: int, val_docs: int) -> None:
    """An entry's meta file, written after both streams (by a one-shot or a background
    preparation): its presence marks a complete entry, which `load_cached` reads."""
    meta = dict(version=CACHE_VERSION, dtype=np.dtype(dtype).name, train_tokens=train_tokens, val_tokens=val_tokens,
                train_bytes=train_bytes, val_bytes=val_bytes, train_docs=train_docs, val_docs=val_docs,
                tokenizer=tok.to_str())
    with atomic_write(meta_path) as f:
        f.write(json.dumps(meta).encode())


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


def _reading_keys(cfg: ml_collections.ConfigDict) -> list:
    """Settings that change what is read or sampled, named only when they differ from how every
    run before they existed read (text field 'text', the tokenizer trained on all training text),
    so the caches and data fingerprints of those runs stay valid."""
    extra = []
    if cfg.get("text_field", "text") != "text":
        extra.append(["text_field", cfg.text_field])
    if cfg.get("tokenizer_sample_bytes", 0):
        extra.append(["tokenizer_sample_bytes", cfg.tokenizer_sample_bytes])
    return extra


def keys(cfg: ml_collections.ConfigDict) -> tuple[str, str, str]:
    """(split key, tokenizer-training key, cache key): what fixes the train/val documents; that
    plus what the tokenizer trains on; and the split plus the tokenizer itself."""
    head = head_bytes(cfg)  # named only where there is one, so that other keys stay as they were
    split_key = _digest(CACHE_VERSION, corpus_fingerprint(cfg.corpus),
                        corpus_fingerprint(cfg.val_source) if cfg.val_source else "",
                        cfg.val_fraction, cfg.val_min_tokens, cfg.max_chars, *([["stream_head", head]] if head else []))
    extra = _reading_keys(cfg)
    sample_key = _digest(split_key, *extra) if extra else split_key
    tokenizer_key = _file_digest(cfg.tokenizer) if cfg.tokenizer else [cfg.vocab_size, tokenizers.__version__]
    return split_key, sample_key, _digest(sample_key, tokenizer_key)


def paths(cache_dir: Path, key: str) -> tuple[Path, Path, Path]:
    """(meta, train stream, val stream) of the entry `key`."""
    folder = Path(cache_dir) / "tokens"
    return folder / f"{key}.json", folder / f"{key}.train.bin", folder / f"{key}.val.bin"


def load_cached(cache_dir: Path, key: str, start: float) -> PreparedData | None:
    """The cached streams for `key`, or None if absent or inconsistent (then they are rebuilt)."""
    meta_path, train_path, val_path = paths(cache_dir, key)
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
