"""The training stream while it is still being tokenized: which tokens step k may use, and its batch.

A big corpus is tokenized in the background while training runs (background.py writes the
train stream, in document order, into a file that only grows). The stream is cut into logical
shards of `shard_tokens` tokens, and a run fixes, before its first step, when each becomes usable:
the visibility schedule, saved in the run dir (`stream.json`) so a resumed run uses the same one.

The rule (docs/data.md#training-while-tokenizing):
- shard i (tokens [i S, (i + 1) S)) is visible from step 0 when it was written before training
  began (`ready_tokens`), else from step ceil((i + 1 - ready_tokens / S) * steps_per_shard);
  `steps_per_shard` is the planned steps the encoder needs for one shard, times a margin;
- batch k draws its batch_size windows (seq_len + 1 tokens at stride seq_len) uniformly, with
  replacement, from the windows inside the shards visible at step k, with a generator seeded by
  (seed, k): a pure function of (seed, k, visible shards), and of (seed, k) once all are visible;
- a shard that is late (the encoder slower than planned) makes the loop wait for it; the order
  never depends on how fast the encoder actually ran.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pufferfish_jax.errors import CheckpointError, DataError

_POLL_S = 0.05


@dataclass(frozen=True)
class StreamSchedule:
    """When each shard of a growing train stream becomes usable (see the module doc)."""

    shard_tokens: int
    ready_tokens: int  # tokens written before the first step
    steps_per_shard: float

    def visible_shards(self, step: int) -> int:
        """Shards usable at `step` (may exceed the stream's shards: then all of it is)."""
        ready = self.ready_tokens // self.shard_tokens
        if self.steps_per_shard <= 0:
            return ready
        return max(ready, math.floor(self.ready_tokens / self.shard_tokens + step / self.steps_per_shard))

    def visible_tokens(self, step: int) -> int:
        """Tokens usable at `step`, before clipping to the stream's final length."""
        return self.visible_shards(step) * self.shard_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: object, where: str) -> StreamSchedule:
        """A saved schedule, checked: a run dir is untrusted input."""
        fields = {"shard_tokens": int, "ready_tokens": int, "steps_per_shard": (int, float)}
        if not isinstance(record, dict) or set(record) != set(fields) or any(
                not isinstance(record[k], kind) or isinstance(record[k], bool) for k, kind in fields.items()):
            raise CheckpointError(f"{where} is not a stream schedule (keys {sorted(fields)}); "
                                  "restore it from the run's copy or choose another run_dir")
        schedule = cls(record["shard_tokens"], record["ready_tokens"], float(record["steps_per_shard"]))
        if schedule.shard_tokens < 2 or schedule.ready_tokens < schedule.shard_tokens or not (
                math.isfinite(schedule.steps_per_shard) and schedule.steps_per_shard >= 0):
            raise CheckpointError(f"{where} holds an impossible stream schedule {record}; "
                                  "restore it from the run's copy or choose another run_dir")
        return schedule


def make_schedule(*, ready_tokens: int, rate_tokens_s: float, step_s: float, shard_tokens: int,
                  margin: float) -> StreamSchedule:
    """The schedule of a run whose encoder has written `ready_tokens` and writes `rate_tokens_s`
    while steps take `step_s`: a shard every `margin` times the steps it takes to encode."""
    ready = ready_tokens // shard_tokens * shard_tokens
    if rate_tokens_s <= 0 or step_s <= 0:
        return StreamSchedule(shard_tokens, ready, 0.0)  # no rate: only what exists now, for good
    return StreamSchedule(shard_tokens, ready, margin * shard_tokens / rate_tokens_s / step_s)


class GrowingTokens:
    """A token file one writer appends to and readers map as it grows.

    The writer's side (a thread, or the thread following a worker process) calls
    `published(tokens)` after each flushed append and `finished(path, tokens)` (the file's final
    name) or `failed(error)` once; readers call `wait_for` and `prefix`. `pause`/`resume` ask the
    writer to wait between appends (planning times steps alone): a thread writer calls
    `paused_here`, a worker process checks the file `<path>.pause`; both say so in `<path>.paused`.
    """

    def __init__(self, path: Path, dtype: np.dtype, *, written: int = 0, done: bool = False):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.written, self.done, self.error = written, done, None
        self.started = time.perf_counter()
        self._changed = threading.Condition()
        self._running = threading.Event()
        self._running.set()
        self._map: np.ndarray | None = None
        self.on_stop: Callable[[], None] | None = None  # set by a writer that can be ended at once

    @classmethod
    def complete(cls, tokens: np.ndarray) -> GrowingTokens:
        """An already complete stream (a cached entry), read through the same interface."""
        source = cls(Path(getattr(tokens, "filename", "") or "."), tokens.dtype, written=len(tokens), done=True)
        source._map = tokens
        return source

    # -- the writer's side -----------------------------------------------------------------
    def published(self, tokens: int) -> None:
        with self._changed:
            self.written = max(self.written, tokens)
            self._changed.notify_all()

    def finished(self, path: Path, tokens: int) -> None:
        with self._changed:
            self.path, self.written, self.done, self._map = Path(path), tokens, True, None
            self._changed.notify_all()

    def failed(self, error: BaseException) -> None:
        with self._changed:
            self.error = error
            self._changed.notify_all()

    @property
    def paused(self) -> bool:
        """Whether a pause was asked for and not resumed (the writer may still finish its chunk)."""
        return not self._running.is_set()

    def pause(self, wait_s: float = 0.0) -> None:
        """Asks the writer to wait before its next chunk; with `wait_s`, waits (that long at most)
        until it does (`<path>.paused` exists) or has finished, so what follows runs alone."""
        self._running.clear()
        Path(f"{self.path}.pause").touch()
        start = time.perf_counter()
        while (time.perf_counter() - start < wait_s and not self.done and self.error is None
               and not Path(f"{self.path}.paused").exists()):
            time.sleep(_POLL_S)

    def stop(self) -> None:
        """No step reads more: a worker process is ended at once (its partial record is whole after
        every chunk, so nothing is lost), a thread paused."""
        if self.on_stop is not None:
            self.on_stop()
        else:
            self.pause()

    def paused_here(self) -> None:
        """A thread writer, between chunks: waits while paused, saying so like a worker does."""
        if self._running.is_set():
            return
        ack = Path(f"{self.path}.paused")
        ack.touch()
        self._running.wait()
        ack.unlink(missing_ok=True)

    def resume(self) -> None:
        self._running.set()
        Path(f"{self.path}.pause").unlink(missing_ok=True)

    # -- the readers' side -----------------------------------------------------------------
    def wait_for(self, tokens: int, timeout_s: float | None = None) -> float:
        """Blocks until `tokens` are written or the stream is complete; returns the seconds waited.
        An error of the writer is raised here, so the run stops with the writer's message."""
        start = time.perf_counter()
        with self._changed:
            while self.error is None and not self.done and self.written < tokens:
                if timeout_s is not None and time.perf_counter() - start > timeout_s:
                    break
                self._changed.wait(_POLL_S)
            if self.error is not None:
                raise self.error
        return time.perf_counter() - start

    def prefix(self, tokens: int) -> np.ndarray:
        """The first min(tokens, written) tokens, as a read-only map of the file."""
        with self._changed:
            while True:
                n = min(tokens, self.written)
                if self._map is not None and len(self._map) >= n:
                    return self._map[:n]
                try:
                    self._map = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.written,))
                except FileNotFoundError:  # just renamed to its final name: finished() follows
                    if self.done or self.error is not None:
                        raise self.error or DataError(f"the token stream {self.path} is gone; rerun to prepare it") from None
                    self._changed.wait(_POLL_S)


def batch_at(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int, step: int,
             part: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Batch `step` drawn from the windows of `tokens` (the stream visible at that step):
    [batch_size / part count, seq_len + 1] int32; rows of `part` as in pipeline.train_batches."""
    windows = (len(tokens) - 1) // seq_len
    if windows < 1:
        raise DataError(f"the visible training text has {len(tokens):,} tokens, less than one window of {seq_len + 1}; "
                        "raise data.stream_shard_tokens or use a shorter model.seq_len")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step])))
    ids = rng.integers(0, windows, batch_size)
    index, count = part
    rows = batch_size // count
    starts = ids[index * rows:(index + 1) * rows] * seq_len
    return np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int32) for s in starts])


def visible_stream(source: GrowingTokens, schedule: StreamSchedule, step: int) -> tuple[np.ndarray, float]:
    """The tokens visible at `step` (waiting for them if the writer is behind) and the wait."""
    needed = schedule.visible_tokens(step)
    waited = source.wait_for(needed)
    return source.prefix(needed), waited


def train_batches(source: GrowingTokens, schedule: StreamSchedule, *, seq_len: int, batch_size: int, seed: int,
                  start_step: int = 0, part: tuple[int, int] = (0, 1), last_step: int | None = None,
                  on_wait: Callable[[int, float], None] = lambda step, s: None) -> Iterator[np.ndarray]:
    """Endless batches from `start_step` on, by the schedule's rule; a wait for a late shard is
    reported to `on_wait(step, seconds)` (the loop counts it as data wait). With `last_step` (a
    run whose steps are fixed), the writer is paused once the stream holds every token that step
    can see: what it would write after that serves only later runs (they continue the partial
    stream), and on a machine with few cores it would slow every remaining step. (Paused, not
    stopped: a worker process ended early reads as a failed one.)"""
    step, needed_last = start_step, None if last_step is None else schedule.visible_tokens(last_step)
    while True:
        tokens, waited = visible_stream(source, schedule, step)
        if waited > 0.01:
            on_wait(step, waited)
        if needed_last is not None and (source.done or source.written >= needed_last):
            if not source.done:
                source.pause()
            needed_last = None
        yield batch_at(tokens, seq_len=seq_len, batch_size=batch_size, seed=seed, step=step, part=part)
        step += 1


def read_schedule(path: Path) -> StreamSchedule | None:
    """The schedule saved in a run dir, or None when the run trained on a complete stream."""
    if not path.exists():
        return None
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(f"{path} is not a regular file; replace it with the run's copy")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON; restore it from the run's copy or choose another run_dir") from None
    return StreamSchedule.from_dict(record, str(path))
