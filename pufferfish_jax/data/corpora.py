"""Where the text comes from: built-in corpora (builtin.py), local files (readers.py), Hugging Face
datasets (hub.py); and which documents are held out.

Every source is a stream of documents in a deterministic order, read in bounded memory. Documents
are the unit of the train/val split, so each source is cut into pieces that are neither trivially
small nor so large that holding out a fraction of them becomes all-or-nothing (articles, scenes,
chapters, ~4-8 KB slices of a big text file).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_collections
import numpy as np

from pufferfish_jax.data import builtin, readers
from pufferfish_jax.data.files import Log, no_log
from pufferfish_jax.data.hub import parse_hf, read_hf
from pufferfish_jax.errors import DataError


_HELP = ("use a built-in corpus (wiki, shakespeare, kjv), a .txt/.jsonl/.parquet/.gz/.zst file, a folder, "
         "a glob or hf:NAME")


def _expand_path(item: str) -> list[Path]:
    """A file, a folder (recursive) or a glob as a sorted list of supported files."""
    path = Path(item).expanduser()
    if path.is_file():
        if not readers.is_supported(path):
            raise DataError(f"{item}: unsupported file type '{path.suffix}'; use .txt, .jsonl (field 'text'), "
                            ".parquet (column 'text'), or .gz/.zst of .txt or .jsonl")
        return [path]
    if path.is_dir():
        candidates = path.rglob("*")
    elif any(c in item for c in "*?["):
        candidates = (Path(p) for p in glob.glob(str(path), recursive=True))
    else:
        raise DataError(f"unknown corpus '{item}' (no such built-in, file or folder); {_HELP}")
    files = sorted(p for p in candidates if p.is_file() and readers.is_supported(p))
    if not files:
        raise DataError(f"'{item}' matches no .txt, .jsonl, .parquet, .gz or .zst files; {_HELP}")
    return files


def _resolve(spec: str) -> list[tuple[str, str]]:
    """A comma-separated spec as (kind, value) sources: ('builtin', name), ('file', path), ('hf', name)."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise DataError(f"corpus spec '{spec}' is empty; {_HELP}")
    sources: list[tuple[str, str]] = []
    for item in items:
        if item in builtin.BUILTIN:
            sources.append(("builtin", item))
        elif item.startswith("hf:"):
            parse_hf(item[3:])
            sources.append(("hf", item[3:]))
        else:
            sources.extend(("file", str(p)) for p in _expand_path(item))
    return sources


def _has_stream(sources: list[tuple[str, str]]) -> bool:
    return any(kind == "hf" for kind, _ in sources)


def is_stream(spec: str) -> bool:
    """Whether `spec` names a Hugging Face stream: read once, never scanned ahead, split per document."""
    return _has_stream(_resolve(spec))


def _file_bytes(sources: list[tuple[str, str]]) -> tuple[int, bool]:
    """(bytes on disk of the local files among `sources`, whether all are plain text: .txt or
    .jsonl); a stat each. Built-ins and streams count 0."""
    paths = [Path(value) for kind, value in sources if kind == "file"]
    return sum(os.stat(p).st_size for p in paths), all(p.suffix.lower() in (".txt", ".jsonl") for p in paths)


def head_bytes(cfg: ml_collections.ConfigDict) -> int:
    """The head of a corpus split by hash alone (`prepare.Split.head_bytes`): its first
    data.tokenizer_sample_bytes of training text, whose held-out documents are the held-out text.

    A Hugging Face stream cannot be scanned ahead, and local files of more than
    data.scan_max_bytes on disk are not: the scan and a sample drawn from all of the corpus each
    read it whole before the first step (about 15 s a GB), so a corpus of gigabytes would keep
    training waiting for minutes. 0 (scan the corpus) for smaller files, beside data.val_source,
    or when the tokenizer learns from all of the text."""
    sample = cfg.get("tokenizer_sample_bytes", 0)
    if not sample or cfg.val_source:
        return 0
    sources = _resolve(cfg.corpus)
    if _has_stream(sources):
        return sample
    limit = cfg.get("scan_max_bytes", 0)
    return sample if limit and _file_bytes(sources)[0] > limit else 0


def text_bytes_estimate(spec: str) -> int:
    """About the text bytes of a corpus split by its head, from its files' sizes (what the planner
    may count on before the stream is read); 0, unknown, for a stream or when any file is
    compressed or parquet."""
    sources = _resolve(spec)
    size, plain = _file_bytes(sources)
    return size if plain and not _has_stream(sources) else 0


def corpus_fingerprint(spec: str) -> str:
    """Identifies the text `spec` names without reading it.

    Built-ins by their pinned archive hash, files by path, size and mtime, datasets by name: cheap,
    so a warm start finds its token cache before touching the corpus.
    """
    parts: list[list[object]] = []
    for kind, value in _resolve(spec):
        if kind == "builtin":
            parts.append([kind, value, builtin.BUILTIN[value].sha256])
        elif kind == "file":
            stat = os.stat(value)
            parts.append([kind, str(Path(value).resolve()), stat.st_size, stat.st_mtime_ns])
        else:
            parts.append([kind, value])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def iter_documents(spec: str, cache_dir: Path, *, max_chars: int = 0, text_field: str = "text",
                   log: Log = no_log) -> Iterator[str]:
    """Every document `spec` names, streamed in spec order then file order; the first ~max_chars if > 0.

    Spec items: a built-in name (wiki, shakespeare, kjv), a .txt/.jsonl/.parquet file or a .gz/.zst
    of a .txt or .jsonl, a folder, a glob, or hf:NAME[:config][@split]; separated by commas.
    `text_field` names the jsonl field / parquet or dataset column (built-ins always use 'text').
    """
    chars = 0
    for kind, value in _resolve(spec):
        if kind == "builtin":
            docs = readers.read_file(builtin.fetch(value, Path(cache_dir), log), "text")
        elif kind == "file":
            docs = readers.read_file(Path(value), text_field)
        else:
            docs = read_hf(value, text_field, log)
        for doc in docs:
            if max_chars and chars >= max_chars:
                return
            chars += len(doc)
            yield doc


def load_documents(spec: str, cache_dir: Path, *, max_chars: int = 0, text_field: str = "text",
                   log: Log = no_log) -> list[str]:
    """`iter_documents` as a list, for texts that fit in memory (eval sets, tests); never empty."""
    docs = list(iter_documents(spec, cache_dir, max_chars=max_chars, text_field=text_field, log=log))
    if not docs:
        raise DataError(f"corpus '{spec}' contains no text; check the files or pick another corpus")
    log(f"corpus {spec}: {len(docs):,} documents, {sum(map(len, docs)):,} characters")
    return docs


# Held-out text is counted in tokens but split as documents, before any tokenizer exists: a
# byte-level BPE of a few thousand tokens averages about 4 UTF-8 bytes per token on English text.
BYTES_PER_TOKEN = 4
# The floor on held-out text never takes more than this share of the corpus's bytes: training keeps its text.
MAX_VAL_SHARE = 0.5


def document_hashes(data: bytes) -> tuple[float, float]:
    """Two independent uniforms in [0, 1) from the sha256 of a document's UTF-8 bytes: the first
    decides its side of the split, the second whether it is in the tokenizer's sample."""
    digest = hashlib.sha256(data).digest()
    return int.from_bytes(digest[:8], "big") / 2**64, int.from_bytes(digest[8:16], "big") / 2**64


@dataclass(frozen=True)
class HashSplit:
    """The held-out rule as a pure function of a document's split hash u: held out when
    u < below or u <= at_most (-1 disables either). A document's side depends on its text and
    these two numbers only, so a stream can be split one document at a time."""

    below: float
    at_most: float = -1.0

    def is_val(self, u: float | np.ndarray):
        return (u < self.below) | (u <= self.at_most)


def _floor_threshold(u: np.ndarray, size: np.ndarray, min_bytes: float) -> float:
    """The smallest hash threshold t whose documents (u <= t) hold at least `min_bytes`, or as
    many as fit in MAX_VAL_SHARE of all bytes; -1 when not even one document fits.

    Taking documents in hash order keeps the floor deterministic and order independent: the
    held-out set is always a prefix of one fixed order, so a grown corpus moves only its edge."""
    order = np.argsort(u, kind="stable")
    cumulative = np.cumsum(size[order])
    reaching = int(np.searchsorted(cumulative, min_bytes)) + 1  # documents to reach min_bytes
    fitting = int(np.searchsorted(cumulative, MAX_VAL_SHARE * cumulative[-1], side="right"))
    count = min(reaching, fitting, len(u))
    return float(u[order[count - 1]]) if count else -1.0


def split_rule(u: np.ndarray, size: np.ndarray, val_fraction: float, val_min_tokens: int = 0) -> HashSplit:
    """The HashSplit of a corpus whose documents have split hashes `u` and UTF-8 sizes `size`
    (one byte added per document for its end-of-text token).

    A document is held out when its hash is below val_fraction, or below the threshold that
    holds out about `val_min_tokens` tokens (BYTES_PER_TOKEN bytes each) but at most MAX_VAL_SHARE
    of the corpus. Both sides are kept non-empty: a corpus too small for the fraction holds out
    the document(s) with the lowest hash, one all held out keeps the highest for training.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be between 0 and 1 (e.g. data.val_fraction=0.01)")
    if len(u) < 2:
        raise DataError(f"need at least 2 documents to hold out validation text, got {len(u)}; "
                        "add text or set data.val_source")
    floor = _floor_threshold(u, size, val_min_tokens * BYTES_PER_TOKEN) if val_min_tokens > 0 else -1.0
    rule = HashSplit(val_fraction, floor)
    if not rule.is_val(u).any():  # small corpus: hold out the document(s) closest to the threshold
        rule = HashSplit(-1.0, float(u.min()))
    if rule.is_val(u).all():
        rule = HashSplit(float(u.max()))
    if not rule.is_val(u).any():
        raise DataError("all documents are identical, so no text can be held out; add text or set data.val_source")
    return rule


def split_documents(docs: Sequence[str], val_fraction: float,
                    val_min_tokens: int = 0) -> tuple[list[str], list[str]]:
    """(train, val) split by document content hash (`split_rule`); both non-empty; input order
    kept within each. Without the floor a document's side depends only on its own text; with it,
    also on the corpus (the threshold), but never on order or seed, and duplicates never straddle
    the split.
    """
    encoded = [d.encode("utf-8") for d in docs]
    u = np.array([document_hashes(e)[0] for e in encoded])
    size = np.array([len(e) + 1 for e in encoded], np.float64)
    is_val = split_rule(u, size, val_fraction, val_min_tokens).is_val(u)
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    return train, val
