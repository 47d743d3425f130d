"""A train stream tokenized in part, kept across runs, so the next run continues it.

A run that ends before its corpus is tokenized leaves, in the cache's `tokens/` folder:
`<key>.train.partial` (the tokens so far) and `<key>.partial.json` (what they cover: the split,
the held-out stream's counts, the training documents, tokens and bytes written, the encoder's
rate). The record is rewritten after each flushed chunk, so the stream may hold more tokens than
it says (a chunk written, the record not yet) but never fewer; the next run cuts the stream back
to the record and skips the documents it covers. `<key>.lock` (flock) keeps one writer per entry:
the run holds it and hands it to its worker, so it is free only once both are gone. A run that
finds it held tokenizes into a private file instead, from the start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from pufferfish_jax.data.corpora import HashSplit
from pufferfish_jax.data.prepare import Split

VERSION = 1


def paths(cache_dir: Path, key: str) -> tuple[Path, Path, Path]:
    """(partial stream, its record, the entry's lock file)."""
    folder = Path(cache_dir) / "tokens"
    return folder / f"{key}.train.partial", folder / f"{key}.partial.json", folder / f"{key}.lock"


def try_lock(cache_dir: Path, key: str) -> int | None:
    """An open file descriptor holding the entry's lock, or None when another run holds it."""
    lock_path = paths(cache_dir, key)[2]
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def split_fields(split: Split) -> dict:
    """The split as JSON fields (in a record, and in the worker's job), read back by `split_of`."""
    parts = [[spec, {"below": rule.below, "at_most": rule.at_most}] for spec, rule in split.parts]
    return dict(parts=parts, train_bytes=split.train_bytes, total_bytes=split.total_bytes, head_bytes=split.head_bytes)


def record_of(split: Split, val_counts: dict, rate_tokens_s: float) -> dict:
    """The part of the record fixed before the first chunk."""
    return dict(version=VERSION, **split_fields(split), val=val_counts, rate_tokens_s=rate_tokens_s,
                train={"tokens": 0, "bytes": 0, "docs": 0})


def split_of(fields: dict) -> Split:
    # head_bytes is missing from the records of runs before streams had heads: files only, 0
    return Split(tuple((spec, HashSplit(**rule)) for spec, rule in fields["parts"]), fields["train_bytes"],
                 fields["total_bytes"], fields.get("head_bytes", 0))


def write(record_path: Path, record: dict) -> None:
    """Replaces the record in one rename, so a reader sees the old one or the new one."""
    tmp = record_path.with_name(f".{record_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, record_path)


def peek(cache_dir: Path, key: str) -> dict | None:
    """The record as saved, if it is one (its files are checked by `read`)."""
    try:
        record = json.loads(paths(cache_dir, key)[1].read_text())
        split_of(record)
        return record if record.get("version") == VERSION else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def read(cache_dir: Path, key: str, itemsize: int, val_path: Path) -> dict | None:
    """The record of a partial stream this run can continue (the lock held), its stream cut back to
    what the record covers; None when there is none or it does not fit its files."""
    stream_path, record_path, _ = paths(cache_dir, key)
    try:
        record = json.loads(record_path.read_text())
        tokens = int(record["train"]["tokens"])
        split_of(record)
        fits = (record["version"] == VERSION and tokens > 0 and stream_path.stat().st_size >= tokens * itemsize
                and val_path.stat().st_size == int(record["val"]["val_tokens"]) * itemsize)
    except (OSError, ValueError, KeyError, TypeError):
        fits = False
    if not fits:
        for path in (stream_path, record_path):
            with contextlib.suppress(OSError):
                path.unlink()
        return None
    os.truncate(stream_path, tokens * itemsize)
    return record
