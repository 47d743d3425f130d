"""The background train-stream writer, and the process that runs it:
`python -m pufferfish_jax.data.tokenize_worker JOB.json`.

Why a process and not a thread: the writer's Python (reading, parsing, turning each chunk's
encodings into ids) competes with the training loop for the GIL in a thread. Measured with
tools/bench_encode_overlap.py (docs/data.md#training-while-tokenizing): a small model's step took
longer beside a thread than beside a process doing the same encoding.

The job file names the data config, the split, the tokenizer file, the cache entry, the held-out
stream's counts (for the meta file), the growing file and the parent's pid. The worker writes the
train stream into the growing file, flushing after each chunk (readers follow its size); then it
renames the file to the entry's train stream and writes the meta file last (its presence means
done). While `<growing>.pause` exists it waits between chunks (the parent is timing steps), and it
exits as soon as its parent is gone. A DataError is one line on stderr and exit status 2.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ml_collections
import numpy as np
from tokenizers import Tokenizer

from pufferfish_jax.data import cache, partial
from pufferfish_jax.data.prepare import Split, TokenStream, document_chunks, encode_into, read_ahead, sided_documents
from pufferfish_jax.data.tokenizer import eos_id
from pufferfish_jax.errors import DataError


_SKIP_CHECK_DOCS = 4096  # documents read past between checks for a pause or a gone parent


class _Followed(TokenStream):
    """A train stream that readers follow: flushed, then `after_chunk(tokens)`, after every append."""

    def __init__(self, file, dtype, after_chunk: Callable[[int], None]):
        super().__init__(file, dtype)
        self.after_chunk = after_chunk

    def append(self, ids: np.ndarray, num_bytes: int, docs: int) -> None:
        super().append(ids, num_bytes, docs)
        self.file.flush()
        self.after_chunk(self.tokens)


def write_train(cfg: ml_collections.ConfigDict, split: Split, tok: Tokenizer, cache_dir: Path, key: str,
                val_counts: dict, path: Path, after_chunk: Callable[[int], None], record: dict | None = None) -> int:
    """The training documents' stream into `path`, then the entry's final names; returns its tokens.
    With a partial `record` (partial.py), `path` is the entry's partial stream: continued from the
    documents the record covers, and the record rewritten after every chunk."""
    meta_path, train_path, _ = cache.paths(cache_dir, key)
    record_path = partial.paths(cache_dir, key)[1]
    dtype = cache.token_dtype(tok.get_vocab_size())
    done = record["train"] if record else {"tokens": 0, "bytes": 0, "docs": 0}
    started = time.perf_counter()

    def chunk_written(tokens: int) -> None:
        if record is not None:
            record["train"] = {"tokens": train.tokens, "bytes": train.bytes, "docs": train.docs}
            if train.tokens > done["tokens"] + 1:  # the rate seen, for a next run that need not measure it
                record["rate_tokens_s"] = (train.tokens - done["tokens"]) / (time.perf_counter() - started)
            partial.write(record_path, record)
        after_chunk(tokens)

    sided = (item for item in sided_documents(cfg, split, cache_dir) if item[2] is False)
    with open(path, "r+b" if done["tokens"] else "wb") as f:
        f.seek(0, os.SEEK_END)
        train = _Followed(f, dtype, chunk_written)
        train.tokens, train.bytes, train.docs = done["tokens"], done["bytes"], done["docs"]
        if not done["tokens"]:
            train.append(np.array([eos_id(tok)]), 0, 0)
        for skipped, _ in enumerate(itertools.islice(sided, done["docs"])):  # read past what is done,
            if skipped % _SKIP_CHECK_DOCS == 0:                               # answering a pause meanwhile
                chunk_written(train.tokens)
        encode_into(tok, read_ahead(document_chunks(sided)), train, TokenStream(io.BytesIO(), dtype))
    if not train.docs:
        raise DataError(f"corpus '{cfg.corpus}' gave no training documents; add text or lower data.val_fraction")
    os.replace(path, train_path)
    cache.write_meta(meta_path, tok, dtype, train_tokens=train.tokens, train_bytes=train.bytes, train_docs=train.docs,
                     **val_counts)
    if record is not None:
        record_path.unlink(missing_ok=True)
    return train.tokens


def job_record(cfg: ml_collections.ConfigDict, split: Split, tokenizer_path: Path, cache_dir: Path, key: str,
               val_counts: dict, path: Path, record: dict | None) -> dict:
    """What the worker needs, as JSON."""
    return dict(data=cfg.to_dict(), **partial.split_fields(split), tokenizer=str(tokenizer_path),
                cache_dir=str(cache_dir), key=key, val_counts=val_counts, path=str(path), parent=os.getpid(),
                record=record)


def _between_chunks(path: Path, parent: int) -> Callable[[int], None]:
    pause, paused = Path(f"{path}.pause"), Path(f"{path}.paused")

    def check(tokens: int) -> None:
        while True:
            if os.getppid() != parent:
                os._exit(0)  # the run is gone: the next one continues the partial stream, or drops a private one
            if not pause.exists():
                paused.unlink(missing_ok=True)
                return
            paused.touch()  # the parent waits for this before it times anything
            time.sleep(0.05)

    return check


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    cfg = ml_collections.ConfigDict(job["data"])
    split = partial.split_of(job)
    path = Path(job["path"])
    try:
        write_train(cfg, split, Tokenizer.from_file(job["tokenizer"]), Path(job["cache_dir"]), job["key"],
                    job["val_counts"], path, _between_chunks(path, job["parent"]), job["record"])
    except DataError as e:
        if job["record"] is None:  # a private file; a partial stream is kept for the next run
            path.unlink(missing_ok=True)
        print(str(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
