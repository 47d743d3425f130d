"""Preparing a big corpus while training runs: the held-out stream first, the train stream behind.

A budgeted run on a corpus of at least data.stream_min_bytes does not wait for all of it to be
tokenized. After the scan and the tokenizer (prepare.py, passes 1 and 2), the held-out documents
are encoded whole (every eval and the baseline need all of them), then a worker process
(tokenize_worker.py: measured to slow the training step less than a thread) encodes the training
documents in document order into a growing file (`tokens/<key>.train.bin.<pid>.growing`), flushing
after each chunk; a thread here publishes its length (growing.GrowingTokens). Training starts once
the first shard (data.stream_shard_tokens) is written; the
encoder's rate over that shard and the tokens per byte of the held-out text give the planner the
tokens that will exist and the schedule (growing.StreamSchedule) when each shard may be used.

When the worker finishes it renames the file to the entry's train stream and writes the meta file
last, so the cache entry is exactly the one `prepare_data` writes and a later run starts at once.
A run that ends earlier leaves the partial stream and its record (partial.py): the next run
continues it, without scanning the corpus again. A run that finds another one writing the entry
tokenizes into a private `.growing` file, which the next preparation deletes once its writer is gone.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import ml_collections
import numpy as np
from tokenizers import Tokenizer

from pufferfish_jax.data import cache, partial, tokenize_worker
from pufferfish_jax.data.cache import PreparedData, token_dtype
from pufferfish_jax.data.corpora import text_bytes_estimate
from pufferfish_jax.data.files import Log, atomic_write, no_log
from pufferfish_jax.data.growing import GrowingTokens, StreamSchedule, make_schedule
from pufferfish_jax.data.prepare import (Split, TokenStream, document_chunks, encode_into, prepare_data, read_ahead,
                                         sample_documents, scan_split, sided_documents, tokenizer_for)
from pufferfish_jax.data.tokenizer import eos_id
from pufferfish_jax.errors import DataError


def _one_side(sided: Iterator, held_out: bool) -> Iterator:
    return (item for item in sided if item[2] == held_out)


def _drop_stale(train_path: Path) -> None:
    """Deletes the growing files of writers that are gone (killed runs); a live one is kept."""
    for path in train_path.parent.glob(f"{train_path.name}.*.growing*"):  # and its job, pause, err files
        try:
            os.kill(int(path.name[len(train_path.name) + 1:].split(".")[0]), 0)
        except (ValueError, ProcessLookupError):
            path.unlink(missing_ok=True)
        except PermissionError:
            continue


_STASH_BYTES = 256 << 20  # held-out text kept in memory from the tokenizer's pass, when no bigger


def _encode_val(cfg: ml_collections.ConfigDict, split: Split, tok: Tokenizer, cache_dir: Path, val_path: Path,
                held: list[str]) -> TokenStream:
    """The held-out stream, whole, at its final name (trusted only once the meta file exists):
    from `held` when the tokenizer's pass collected every held-out document, else read again (a
    stream's are all in its head, which the sample's pass reads, and no further)."""
    dtype = token_dtype(tok.get_vocab_size())
    if split.head_bytes and not held:  # the tokenizer was cached, so its pass did not run
        collections.deque(sample_documents(cfg, cache_dir, split, held_out=held), maxlen=0)
    complete = held and (split.head_bytes or
                         sum(len(d.encode("utf-8")) + 1 for d in held) == split.total_bytes - split.train_bytes)
    sided = ((d, d.encode("utf-8"), True, 0.0) for d in held) if complete else sided_documents(cfg, split, cache_dir)
    with atomic_write(val_path) as f:
        val = TokenStream(f, dtype)
        val.append(np.array([eos_id(tok)]), 0, 0)
        encode_into(tok, read_ahead(document_chunks(_one_side(sided, True))), TokenStream(io.BytesIO(), dtype), val)
    if not val.docs:
        raise DataError(f"corpus '{cfg.corpus}' gave no held-out documents; add text, raise data.val_fraction, "
                        "or set data.val_source")
    return val


PAUSE_WAIT_S = 30.0  # at most this for the writer to finish its chunk before steps are timed
_LIVE: dict[tuple[Path, str], PreparedData] = {}  # streams this process is writing, by entry
WRITER = "process"  # or "thread" (the tests' choice: in-process, so they can hold the writer)


def _thread_writer(cfg: ml_collections.ConfigDict, split: Split, tok: Tokenizer, cache_dir: Path, key: str,
                   val_counts: dict, source: GrowingTokens, record: dict | None) -> None:
    def after_chunk(tokens: int) -> None:
        source.published(tokens)
        source.paused_here()

    try:
        tokens = tokenize_worker.write_train(cfg, split, tok, cache_dir, key, val_counts, source.path, after_chunk,
                                             record)
        source.finished(cache.paths(cache_dir, key)[1], tokens)
    except BaseException as e:  # noqa: BLE001 - handed to the readers, who raise it in the loop
        if record is None:  # a private file; a partial stream is kept for the next run
            with contextlib.suppress(OSError):
                source.path.unlink(missing_ok=True)
        source.failed(e)


def _follow(process: subprocess.Popen, source: GrowingTokens, meta_path: Path, train_path: Path, err_path: Path) -> None:
    """The parent's side of a worker process: its file's size as published tokens, its end."""
    while (code := process.poll()) is None:
        with contextlib.suppress(OSError):
            source.published(source.path.stat().st_size // source.dtype.itemsize)
        time.sleep(0.05)
    lines = err_path.read_text().strip().splitlines() if err_path.exists() else []
    for path in (err_path, *(Path(f"{source.path}.{end}") for end in ("job.json", "pause", "paused", "tokenizer.json"))):
        path.unlink(missing_ok=True)
    try:
        if code != 0:
            raise DataError(lines[-1] if code == 2 and lines else
                            f"tokenizing in the background stopped (exit status {code}); rerun to resume")
        source.finished(train_path, json.loads(meta_path.read_text())["train_tokens"])
    except (OSError, ValueError, KeyError) as e:
        source.failed(e if isinstance(e, DataError) else DataError(f"the token cache entry {meta_path} is unreadable "
                                                                   f"({e}); rerun to prepare it again"))


def _start_writer(cfg: ml_collections.ConfigDict, split: Split, tok: Tokenizer, cache_dir: Path, key: str,
                  val_counts: dict, source: GrowingTokens, record: dict | None, lock_fd: int | None) -> None:
    """The train stream's writer: a worker process (WRITER), or a thread of this one; with the
    entry's lock (`lock_fd`, handed to the worker too) it keeps the partial `record` current."""
    if WRITER == "thread":
        threading.Thread(target=_thread_writer, args=(cfg, split, tok, cache_dir, key, val_counts, source, record),
                         daemon=True, name="pufferfish-tokenize").start()
        return
    meta_path, train_path, _ = cache.paths(cache_dir, key)
    job_path, err_path = Path(f"{source.path}.job.json"), Path(f"{source.path}.err")
    tokenizer_path = Path(f"{source.path}.tokenizer.json")
    tokenizer_path.write_text(tok.to_str())
    job_path.write_text(json.dumps(tokenize_worker.job_record(cfg, split, tokenizer_path, cache_dir, key, val_counts,
                                                              source.path, record)))
    with open(err_path, "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "pufferfish_jax.data.tokenize_worker", str(job_path)],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                   pass_fds=() if lock_fd is None else (lock_fd,))
    source.on_stop = process.terminate
    threading.Thread(target=_follow, args=(process, source, meta_path, train_path, err_path), daemon=True,
                     name="pufferfish-tokenize-follow").start()


def prepare_growing(data_cfg: ml_collections.ConfigDict, cache_dir: Path, *, log: Log = no_log,
                    finish_by: float | None = None, force: bool = False) -> PreparedData:
    """`prepare_data`, except that a corpus of at least data.stream_min_bytes (any size with
    `force`: a resumed run that streamed) returns once its first shard of training tokens exists,
    with `growing` set and the rest encoding in the background. A cached entry, a Hugging Face
    stream (size unknown) and a small corpus take prepare_data's path and return complete."""
    start = time.perf_counter()
    cache_dir = Path(cache_dir)
    _, _, key = cache.keys(data_cfg)
    if cache.load_cached(cache_dir, key, start) is not None:
        return prepare_data(data_cfg, cache_dir, log=log)  # the same cached entry, with its log line
    if (live := _LIVE.get((cache_dir, key))) and live.growing.error is None and not live.growing.done:
        return live  # this process writes it already (a pipeline's plan stage, then its train stage)
    lock_fd = partial.try_lock(cache_dir, key)  # None: another run writes this entry; tokenize privately
    meta_path, train_path, val_path = cache.paths(cache_dir, key)
    _drop_stale(train_path)
    if lock_fd is not None:  # what a killed run's worker left beside the partial stream (a pause above all)
        for end in ("pause", "paused", "err", "job.json", "tokenizer.json"):
            Path(f"{partial.paths(cache_dir, key)[0]}.{end}").unlink(missing_ok=True)
    record = partial.peek(cache_dir, key) if lock_fd is not None else None
    if record is not None:  # a run before this one tokenized part of it: continue from there
        split = partial.split_of(record)
        tok = tokenizer_for(data_cfg, cache_dir, split, log=log)
        record = partial.read(cache_dir, key, token_dtype(tok.get_vocab_size()).itemsize, val_path)
    if record is not None:
        val_counts = record["val"]
        log(f"data: continuing the {record['train']['tokens']:,} train tokens an earlier run wrote")
    else:
        split = scan_split(data_cfg, cache_dir, log=log)
        # A corpus split by its head (size unknown, 0) counts as big; a stream cannot train as it
        # is read when every held-out document of it is held-out text (no head), since that text
        # must be complete first.
        unbounded = not split.total_bytes and not split.head_bytes
        small = not data_cfg.stream_min_bytes or 0 < split.total_bytes < data_cfg.stream_min_bytes
        if unbounded or (small and not force):
            if lock_fd is not None:
                os.close(lock_fd)
            return prepare_data(data_cfg, cache_dir, log=log, finish_by=finish_by, split=split)
        tok, val_counts = _tokenizer_and_val(data_cfg, split, cache_dir, val_path, log)
    dtype = token_dtype(tok.get_vocab_size())
    private = train_path.with_name(f"{train_path.name}.{os.getpid()}.growing")
    done = record["train"]["tokens"] if record else 0
    source = GrowingTokens(partial.paths(cache_dir, key)[0] if lock_fd is not None else private, dtype, written=done)
    if lock_fd is not None and record is None:
        record = partial.record_of(split, val_counts, 0.0)
    _start_writer(data_cfg, split, tok, cache_dir, key, val_counts, source, record, lock_fd)
    source.lock_fd = lock_fd  # held as long as this process lives
    first = data_cfg.stream_shard_tokens
    if record and done >= first and record["rate_tokens_s"] > 0:
        source.rate_tokens_s = record["rate_tokens_s"]  # as the worker saw it in the run before
    else:  # measured now, over a shard
        source.wait_for(first if done < first else done + first)
        source.rate_tokens_s = max(source.written - done, 1) / max(time.perf_counter() - source.started, 1e-9)
    if text_bytes := split.train_bytes or round(text_bytes_estimate(data_cfg.corpus) * (1 - data_cfg.val_fraction)):
        source.total_estimate = round(text_bytes * val_counts["val_tokens"] / max(val_counts["val_bytes"], 1))
        of_total = f"of about {source.total_estimate:,}"
    else:  # a stream, or compressed files split by their head: as many as the encoder writes in time
        source.total_estimate, of_total = 2**62, "of a stream of unknown length"
    log(f"data: training starts while tokenizing continues ({source.written:,} {of_total} train tokens, "
        f"{source.rate_tokens_s:,.0f} tokens/s)")
    _LIVE[(cache_dir, key)] = PreparedData(
        tokenizer=tok, tokenizer_json=tok.to_str(), train_tokens=source.prefix(first),
        val_tokens=np.memmap(val_path, dtype=dtype, mode="r"), train_bytes=split.train_bytes,
        val_bytes=val_counts["val_bytes"], vocab_size=tok.get_vocab_size(), fingerprint=key,
        prep_seconds=time.perf_counter() - start, growing=source)
    return _LIVE[(cache_dir, key)]


def _tokenizer_and_val(data_cfg: ml_collections.ConfigDict, split: Split, cache_dir: Path, val_path: Path,
                       log: Log) -> tuple[Tokenizer, dict]:
    """The tokenizer (its pass collecting the held-out documents), then the held-out stream."""
    held: list[str] = []
    tok = tokenizer_for(data_cfg, cache_dir, split, log=log,
                        held_out=held if split.total_bytes - split.train_bytes <= _STASH_BYTES else None)
    log("data: tokenizing the held-out documents")
    val = _encode_val(data_cfg, split, tok, cache_dir, val_path, held)
    return tok, dict(val_tokens=val.tokens, val_bytes=val.bytes, val_docs=val.docs)


def with_schedule(data: PreparedData, schedule: StreamSchedule) -> PreparedData:
    """`data` read by the schedule's rule: its train_tokens become those visible at step 0 (what
    the baseline counts, the same in every attempt of the run); a complete stream is wrapped."""
    source = data.growing or GrowingTokens.complete(data.train_tokens)
    source.wait_for(schedule.visible_tokens(0))
    return replace(data, growing=source, schedule=schedule, train_tokens=source.prefix(schedule.visible_tokens(0)))


def planned_train_tokens(data: PreparedData, deadline: float) -> int:
    """The training tokens a planner may count on: a complete stream's; a growing one's written
    tokens plus what its measured rate adds by `deadline`, at most its estimated total."""
    source = data.growing
    if source is None:
        return len(data.train_tokens)
    if source.done:
        return source.written
    return min(source.total_estimate, source.written + round(source.rate_tokens_s * max(deadline - time.time(), 0)))


def pause(data: PreparedData) -> None:
    """The encoder paused between chunks, once it says so (at most PAUSE_WAIT_S), so that what
    follows runs alone; no-op for a complete corpus."""
    if data.growing is not None:
        data.growing.pause(wait_s=PAUSE_WAIT_S)


@contextlib.contextmanager
def paused(data: PreparedData) -> Iterator[None]:
    """`pause` for the block (the peak probes time products alone), then the encoder as it was:
    running again only if it ran before."""
    was_paused = data.growing is None or data.growing.paused
    pause(data)
    try:
        yield
    finally:
        if not was_paused:
            data.growing.resume()


def scheduled(data: PreparedData, data_cfg: ml_collections.ConfigDict, *, step_s: float,
              agree=lambda record: record) -> PreparedData:
    """`data` ready for the loop: complete as it is, or with the schedule process 0 makes: the
    fixed one (data.stream_steps_per_shard: shard i from step i x that), else from the tokens
    written now, the encoder's measured rate and the planned step time (`agree` shares it)."""
    source, shard_tokens = data.growing, data_cfg.stream_shard_tokens
    if data_cfg.stream_steps_per_shard:  # the user's fixed rule, whether the stream is complete or not
        return with_schedule(data, StreamSchedule(shard_tokens, shard_tokens, float(data_cfg.stream_steps_per_shard)))
    if source is None:
        return data
    schedule = make_schedule(ready_tokens=source.written, rate_tokens_s=source.rate_tokens_s, step_s=step_s,
                             shard_tokens=shard_tokens, margin=data_cfg.stream_margin)
    record = agree({"schedule": None if source.done else schedule.to_dict()})
    if record["schedule"] is None:  # it finished first: an ordinary complete stream
        source.wait_for(2**62)
        return replace(data, growing=None, train_tokens=source.prefix(source.written))
    return with_schedule(data, StreamSchedule.from_dict(record["schedule"], "the stream schedule"))
