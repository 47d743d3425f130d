"""Where the text comes from: built-in corpora (builtin.py), local files, Hugging Face datasets.

Every source ends as a list of documents in a deterministic order. Documents are the unit of the
train/val split, so each source is cut into pieces that are neither trivially small nor so large
that holding out a fraction of them becomes all-or-nothing (articles, scenes, chapters, ~4-8 KB
slices of a big text file).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pufferfish_jax.data import builtin
from pufferfish_jax.data.files import Log, no_log
from pufferfish_jax.errors import DataError


_HELP = ("use a built-in corpus (wiki, shakespeare, kjv), a .txt/.jsonl/.parquet file, a folder, "
         "a glob or hf:NAME")


# ----------------------------------------------------------------------------- local files
_SUFFIXES = (".txt", ".jsonl", ".parquet")
_WHOLE_FILE_CHARS = 64 * 1024
_CHUNK_MIN, _CHUNK_MAX = 4 * 1024, 8 * 1024


def chunk_text(text: str) -> list[str]:
    """A .txt file as documents: whole when small, else ~4-8 KB pieces.

    Pieces end at a paragraph break, else a line break, else a space, so that a one-file corpus can
    still hold out a fair validation fraction by document. They concatenate back to `text` exactly.
    """
    if len(text) <= _WHOLE_FILE_CHARS:
        return [text] if text.strip() else []
    chunks, start = [], 0
    while len(text) - start > _CHUNK_MAX:
        lo, hi = start + _CHUNK_MIN, start + _CHUNK_MAX
        cut = next((i + len(sep) for sep in ("\n\n", "\n", " ") if (i := text.rfind(sep, lo, hi)) >= 0), hi)
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return [c for c in chunks if c.strip()]


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                raise DataError(f"{path}:{n} is not a JSON object with a string field 'text'; fix that line")
            if text.strip():
                docs.append(text)
    return docs


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow (pip install pyarrow), or convert it to .jsonl") from None
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise DataError(f"{path} has no 'text' column (it has {', '.join(table.column_names)}); rename the text column")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str) and t.strip()]


def _read_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        raw = path.read_bytes()
        if b"\x00" in raw[:65536]:
            raise DataError(f"{path} looks binary (it has NUL bytes), not text; pass a UTF-8 text file")
        try:
            return chunk_text(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                            f"convert it, e.g. iconv -f latin1 -t utf-8 {path.name}") from None
    if suffix == ".jsonl":
        return _read_jsonl(path)
    return _read_parquet(path)


def _expand_path(item: str) -> list[Path]:
    """A file, a folder (recursive) or a glob as a sorted list of supported files."""
    path = Path(item).expanduser()
    if path.is_file():
        if path.suffix.lower() not in _SUFFIXES:
            raise DataError(f"{item}: unsupported file type '{path.suffix}'; use .txt, .jsonl (field 'text') "
                            "or .parquet (column 'text')")
        return [path]
    if path.is_dir():
        candidates = path.rglob("*")
    elif any(c in item for c in "*?["):
        candidates = (Path(p) for p in glob.glob(str(path), recursive=True))
    else:
        raise DataError(f"unknown corpus '{item}' (no such built-in, file or folder); {_HELP}")
    files = sorted(p for p in candidates if p.is_file() and p.suffix.lower() in _SUFFIXES)
    if not files:
        raise DataError(f"'{item}' matches no .txt, .jsonl or .parquet files; {_HELP}")
    return files


# ----------------------------------------------------------------------------- Hugging Face
def _read_hf(name_split: str, log: Log) -> list[str]:
    """`hf:NAME` or `hf:NAME:split` (default split 'train'), column 'text'."""
    name, _, split = name_split.partition(":")
    fallback = "or use a local file or a built-in corpus: wiki, shakespeare, kjv"
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{name} needs the `datasets` package and access to the Hugging Face hub "
                        f"(pip install datasets; {fallback})") from None
    log(f"corpus hf:{name}: loading split {split or 'train'}")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # datasets raises many types for offline / unknown name / bad split
        raise DataError(f"hf:{name_split} could not be loaded ({type(e).__name__}); check the name, split "
                        f"and hub access, {fallback}") from None
    if "text" not in ds.column_names:
        raise DataError(f"hf:{name_split} has no 'text' column (it has {', '.join(ds.column_names)}); "
                        "pick a dataset with a 'text' column")
    return [t for t in ds["text"] if isinstance(t, str) and t.strip()]


# ----------------------------------------------------------------------------- specs
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
            if not item[3:].partition(":")[0]:
                raise DataError(f"'{item}' names no dataset; write hf:NAME or hf:NAME:split")
            sources.append(("hf", item[3:]))
        else:
            sources.extend(("file", str(p)) for p in _expand_path(item))
    return sources


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


def load_documents(spec: str, cache_dir: Path, *, max_chars: int = 0, log: Log = no_log) -> list[str]:
    """All documents `spec` names, in spec order then file order; the first ~max_chars if > 0.

    Spec items: a built-in name (wiki, shakespeare, kjv), a .txt/.jsonl/.parquet file, a folder,
    a glob, or hf:NAME[:split]; separated by commas.
    """
    docs: list[str] = []
    chars = 0
    for kind, value in _resolve(spec):
        if kind == "builtin":
            new = _read_jsonl(builtin.fetch(value, Path(cache_dir), log))
        elif kind == "file":
            new = _read_file(Path(value))
        else:
            new = _read_hf(value, log)
        for doc in new:
            if max_chars and chars >= max_chars:
                break
            docs.append(doc)
            chars += len(doc)
    if not docs:
        raise DataError(f"corpus '{spec}' contains no text; check the files or pick another corpus")
    log(f"corpus {spec}: {len(docs):,} documents, {chars:,} characters")
    return docs


# Held-out text is counted in tokens but split as documents, before any tokenizer exists: a
# byte-level BPE of a few thousand tokens averages about 4 UTF-8 bytes per token on English text.
BYTES_PER_TOKEN = 4
# The floor on held-out text never takes more than this share of the corpus's bytes: training keeps its text.
MAX_VAL_SHARE = 0.5


def _unit_hash(data: bytes) -> float:
    """sha256 of the bytes mapped to [0, 1)."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2**64


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


def split_documents(docs: Sequence[str], val_fraction: float,
                    val_min_tokens: int = 0) -> tuple[list[str], list[str]]:
    """(train, val) split by document content hash; both non-empty; input order kept within each.

    A document is held out when its hash is below val_fraction, or below the threshold that
    holds out about `val_min_tokens` tokens (BYTES_PER_TOKEN bytes each, counting one byte per
    document for its end-of-text token) but at most MAX_VAL_SHARE of the corpus. Without the
    floor a document's side depends only on its own text; with it, also on the corpus (the
    threshold), but never on order or seed, and duplicates never straddle the split.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be between 0 and 1 (e.g. data.val_fraction=0.01)")
    if len(docs) < 2:
        raise DataError(f"need at least 2 documents to hold out validation text, got {len(docs)}; "
                        "add text or set data.val_source")
    encoded = [d.encode("utf-8") for d in docs]
    u = np.array([_unit_hash(e) for e in encoded])
    is_val = u < val_fraction
    if val_min_tokens > 0:
        size = np.array([len(e) + 1 for e in encoded], np.float64)
        is_val |= u <= _floor_threshold(u, size, val_min_tokens * BYTES_PER_TOKEN)
    if not is_val.any():  # small corpus: hold out the document(s) closest to the threshold
        is_val = u == u.min()
    if is_val.all():
        is_val = u < u.max()
    if not is_val.any():
        raise DataError("all documents are identical, so no text can be held out; add text or set data.val_source")
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    return train, val
