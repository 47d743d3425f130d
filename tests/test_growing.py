"""Training while the corpus is tokenized: the background writer gives the one-shot cache entry,
batches follow the visibility schedule (a late shard is waited for, never reordered), held-out
documents stay out, and the schedule read back from a run dir is checked. (A SIGKILL while the
corpus is still tokenized, then resume: test_resume.py's chaos test.)"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_data_stream import data_cfg, docs_of, stream_docs, write_jsonl

from pufferfish_jax.data import background, cache, growing, prepare
from pufferfish_jax.data import partial as partial_lib
from pufferfish_jax.data.prepare import prepare_data
from pufferfish_jax.errors import CheckpointError

STREAM_KEYS = dict(stream_min_bytes=1, stream_shard_tokens=300, stream_margin=2.0, stream_steps_per_shard=0.0)


def corpus(tmp_path, n=240):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", docs_of(n // 2))
    write_jsonl(folder / "b.jsonl", docs_of(n - n // 2, n // 2))
    return str(folder)


def test_background_prep_writes_the_one_shot_entry_and_keeps_held_out_text_out(tmp_path, monkeypatch):
    """Held at its first shard (the writer blocked), the run sees a growing stream; released, the
    finished entry is byte for byte the one prepare_data writes, and no held-out document is in it."""
    monkeypatch.setattr(prepare, "_CHUNK_DOCS", 4)  # many chunks, so many publications
    monkeypatch.setattr(background, "WRITER", "thread")  # in this process, where it can be held
    gate, published = threading.Event(), growing.GrowingTokens.published

    def held(self, tokens):
        published(self, tokens)
        if tokens >= STREAM_KEYS["stream_shard_tokens"]:
            gate.wait(30)

    monkeypatch.setattr(growing.GrowingTokens, "published", held)
    cfg = data_cfg(corpus(tmp_path), **STREAM_KEYS)
    data = background.prepare_growing(cfg, tmp_path / "bg")
    source = data.growing
    assert source is not None and not source.done and source.written < 2_000  # proven mid-preparation
    assert background.prepare_growing(cfg, tmp_path / "bg") is data  # asked again in this process: the same writer
    assert not cache.paths(tmp_path / "bg", data.fingerprint)[0].exists()  # no entry a later run would trust yet
    assert len(data.train_tokens) == STREAM_KEYS["stream_shard_tokens"]
    gate.set()
    source.wait_for(2**62)
    assert source.done and source.path.name.endswith(".train.bin")

    one_shot = prepare_data(cfg, tmp_path / "whole")
    assert one_shot.fingerprint == data.fingerprint
    for name in ("train.bin", "val.bin", "json"):
        assert (tmp_path / "bg/tokens" / f"{data.fingerprint}.{name}").read_bytes() == \
               (tmp_path / "whole/tokens" / f"{data.fingerprint}.{name}").read_bytes(), name
    assert not list((tmp_path / "bg/tokens").glob("*.growing"))
    held_out = set(stream_docs(one_shot.val_tokens, one_shot.tokenizer))
    trained = set(stream_docs(source.prefix(source.written), one_shot.tokenizer))
    assert held_out and trained and not held_out & trained
    again = background.prepare_growing(cfg, tmp_path / "bg")  # a second run: the complete entry, at once
    assert again.growing is None and len(again.train_tokens) == source.written
    val_bytes = (tmp_path / "bg/tokens" / f"{data.fingerprint}.val.bin").read_bytes()
    for path in (tmp_path / "bg/tokens").iterdir():  # tokens gone, tokenizer cached: held-out text read again
        path.unlink()
    gate.set()
    background.prepare_growing(cfg, tmp_path / "bg").growing.wait_for(2**62)
    assert (tmp_path / "bg/tokens" / f"{data.fingerprint}.val.bin").read_bytes() == val_bytes


def test_the_worker_process_writes_the_one_shot_entry_and_waits_while_paused(tmp_path):
    cfg = data_cfg(corpus(tmp_path, 1200), **{**STREAM_KEYS, "stream_shard_tokens": 2})
    data = background.prepare_growing(cfg, tmp_path / "bg")
    source = data.growing
    assert source is not None and background.WRITER == "process"
    source.pause(wait_s=20)
    assert source.done or Path(f"{source.path}.paused").exists()  # the worker says it waits (or had finished)
    paused_at = source.written
    time.sleep(0.3)
    assert paused_at == source.written or source.done  # nothing written while paused
    source.resume()
    source.wait_for(2**62)
    assert source.done and not list((tmp_path / "bg/tokens").glob("*.growing*"))
    prepare_data(cfg, tmp_path / "whole")  # the one-shot preparation of the same corpus
    for name in ("train.bin", "val.bin", "json"):
        assert (tmp_path / "bg/tokens" / f"{data.fingerprint}.{name}").read_bytes() == \
               (tmp_path / "whole/tokens" / f"{data.fingerprint}.{name}").read_bytes(), name


def test_a_run_that_stops_mid_preparation_leaves_a_partial_stream_the_next_run_continues(tmp_path, monkeypatch):
    """The writer dies after a few chunks (its run ended); the next preparation continues from the
    record and the finished entry is still byte for byte the one-shot one."""
    monkeypatch.setattr(prepare, "_CHUNK_DOCS", 4)
    monkeypatch.setattr(background, "WRITER", "thread")
    published = growing.GrowingTokens.published

    def dies(self, tokens):
        published(self, tokens)
        if tokens >= 700:
            raise SystemExit("the run ended")

    monkeypatch.setattr(growing.GrowingTokens, "published", dies)
    cfg = data_cfg(corpus(tmp_path), **STREAM_KEYS)
    first = background.prepare_growing(cfg, tmp_path / "bg")
    with pytest.raises(SystemExit):
        first.growing.wait_for(2**62)
    os.close(first.growing.lock_fd)  # what the run's exit does
    stream, record_path, _ = partial_lib.paths(tmp_path / "bg", first.fingerprint)
    kept = json.loads(record_path.read_text())["train"]
    assert 700 <= kept["tokens"] < 2_000 and kept["docs"] > 0
    monkeypatch.setattr(growing.GrowingTokens, "published", published)
    logs = []
    second = background.prepare_growing(cfg, tmp_path / "bg", log=logs.append)
    assert any(f"continuing the {kept['tokens']:,}" in line for line in logs)
    second.growing.wait_for(2**62)
    assert second.growing.done and not stream.exists() and not record_path.exists()
    prepare_data(cfg, tmp_path / "whole")  # the one-shot preparation of the same corpus
    for name in ("train.bin", "val.bin", "json"):
        assert (tmp_path / "bg/tokens" / f"{first.fingerprint}.{name}").read_bytes() == \
               (tmp_path / "whole/tokens" / f"{first.fingerprint}.{name}").read_bytes(), name


def test_a_small_corpus_keeps_the_whole_preparation(tmp_path):
    cfg = data_cfg(corpus(tmp_path, 60), **{**STREAM_KEYS, "stream_min_bytes": 10**9})
    data = background.prepare_growing(cfg, tmp_path / "c")
    assert data.growing is None and data.schedule is None
    assert np.array_equal(data.train_tokens, prepare_data(cfg, tmp_path / "c").train_tokens)


def write_tokens(path, tokens):
    with open(path, "ab") as f:
        f.write(np.asarray(tokens, np.uint16).tobytes())


def test_a_late_shard_makes_the_reader_wait_and_never_changes_the_batch(tmp_path):
    """The writer is behind the schedule at step 3: the batch comes only once the shard exists, and
    every batch equals the one read from the complete stream by the same rule."""
    tokens = np.arange(1, 4001, dtype=np.uint16) % 5000
    schedule = growing.StreamSchedule(shard_tokens=1000, ready_tokens=1000, steps_per_shard=1.5)
    assert [schedule.visible_shards(k) for k in range(6)] == [1, 1, 2, 3, 3, 4]
    path = tmp_path / "stream.bin"
    write_tokens(path, tokens[:2000])
    source = growing.GrowingTokens(path, np.uint16, written=2000)
    complete = growing.GrowingTokens.complete(tokens)
    waits = []
    late = growing.train_batches(source, schedule, seq_len=16, batch_size=8, seed=3,
                                 on_wait=lambda step, s: waits.append((step, s)))
    reference = growing.train_batches(complete, schedule, seq_len=16, batch_size=8, seed=3)
    got = [next(late) for _ in range(3)]  # steps 0-2 need 2000 tokens: no wait

    def write_later():
        time.sleep(0.4)
        write_tokens(path, tokens[2000:])
        source.published(4000)
        source.finished(path, 4000)

    threading.Thread(target=write_later).start()
    got += [next(late) for _ in range(4)]
    assert [step for step, _ in waits] == [3] and waits[0][1] >= 0.3  # the wait happened, at the late step
    for k, batch in enumerate(got):
        assert np.array_equal(batch, next(reference)), k
        visible = schedule.visible_tokens(k)
        assert batch.shape == (8, 17) and batch.max() <= visible  # token t sits at index t - 1: all visible
    assert not np.array_equal(got[0], growing.batch_at(tokens[:1000], seq_len=16, batch_size=8, seed=3, step=1))


def test_a_fixed_step_run_pauses_the_writer_once_its_last_step_can_see_all_it_will(tmp_path):
    """Steps 0-5 see at most 3 of the stream's 4 shards: the writer is paused as soon as those 3
    are written (the rest would only serve a later run, at this run's expense), not before, and
    the batches are the ones read without the pause."""
    tokens = np.arange(1, 4001, dtype=np.uint16)
    schedule = growing.StreamSchedule(shard_tokens=1000, ready_tokens=1000, steps_per_shard=2.0)
    assert schedule.visible_tokens(5) == 3000
    path = tmp_path / "stream.bin"
    write_tokens(path, tokens[:2000])
    source = growing.GrowingTokens(path, np.uint16, written=2000)
    batches = growing.train_batches(source, schedule, seq_len=16, batch_size=8, seed=3, last_step=5)
    reference = growing.train_batches(growing.GrowingTokens.complete(tokens), schedule, seq_len=16, batch_size=8,
                                      seed=3)
    pause = Path(f"{path}.pause")
    got = [next(batches)]
    assert not pause.exists()  # shard 3 is not written yet: the writer must go on
    write_tokens(path, tokens[2000:3000])
    source.published(3000)
    got += [next(batches) for _ in range(5)]
    assert pause.exists() and not source.done  # asked to wait before its next chunk
    for k, batch in enumerate(got):
        assert np.array_equal(batch, next(reference)), k


def test_batches_are_a_function_of_seed_step_and_visible_windows_and_split_into_parts():
    tokens = np.arange(10_000, dtype=np.uint16)
    one = growing.batch_at(tokens, seq_len=32, batch_size=8, seed=0, step=5)
    assert np.array_equal(one, growing.batch_at(tokens, seq_len=32, batch_size=8, seed=0, step=5))
    assert not np.array_equal(one, growing.batch_at(tokens, seq_len=32, batch_size=8, seed=0, step=6))
    assert not np.array_equal(one, growing.batch_at(tokens, seq_len=32, batch_size=8, seed=1, step=5))
    parts = [growing.batch_at(tokens, seq_len=32, batch_size=8, seed=0, step=5, part=(i, 2)) for i in range(2)]
    assert np.array_equal(np.concatenate(parts), one)
    assert np.all(one[:, 0] % 32 == 0) and np.array_equal(one[:, 1:] - one[:, :-1], np.ones((8, 32)))


def test_the_schedule_from_the_measured_rate_and_read_back_from_a_run_dir(tmp_path):
    # 1000 tokens/s, 0.1 s steps: a shard of 500 tokens takes 5 steps; margin 2 makes it 10.
    schedule = growing.make_schedule(ready_tokens=1234, rate_tokens_s=1000, step_s=0.1, shard_tokens=500, margin=2)
    assert schedule == growing.StreamSchedule(500, 1000, 10.0)
    assert [schedule.visible_shards(k) for k in (0, 9, 10, 25)] == [2, 2, 3, 4]
    path = tmp_path / "stream.json"
    assert growing.read_schedule(path) is None
    path.write_text(json.dumps(schedule.to_dict()))
    assert growing.read_schedule(path) == schedule
    for bad in ({"shard_tokens": 500}, {**schedule.to_dict(), "ready_tokens": 0},
                {**schedule.to_dict(), "steps_per_shard": "x"}, [1, 2]):
        path.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="stream schedule"):
            growing.read_schedule(path)


def test_a_writer_error_stops_the_reader_with_its_message(tmp_path):
    source = growing.GrowingTokens(tmp_path / "x.bin", np.uint16)
    threading.Timer(0.1, source.failed, args=(ValueError("shard b.jsonl line 3 is not JSON"),)).start()
    with pytest.raises(ValueError, match="line 3"):
        source.wait_for(100)


def test_a_reader_mapping_while_the_writer_renames_waits_for_the_final_name(tmp_path):
    final = tmp_path / "x.train.bin"
    write_tokens(final, np.arange(100))
    source = growing.GrowingTokens(tmp_path / "x.train.bin.1.growing", np.uint16, written=100)  # renamed away
    threading.Timer(0.2, source.finished, args=(final, 100)).start()
    assert np.array_equal(source.prefix(60), np.arange(60)) and source.done


def test_the_planner_counts_the_tokens_that_will_exist_and_a_fixed_schedule_holds_on_a_complete_cache(tmp_path):
    cfg = data_cfg(corpus(tmp_path, 60), **STREAM_KEYS)
    data = prepare_data(cfg, tmp_path / "c")
    assert background.planned_train_tokens(data, time.time() + 60) == len(data.train_tokens)
    source = growing.GrowingTokens(tmp_path / "g.bin", np.uint16, written=1000)
    source.rate_tokens_s, source.total_estimate = 100.0, 5000
    streaming = dataclasses.replace(data, growing=source)
    assert abs(background.planned_train_tokens(streaming, time.time() + 10) - 2000) <= 2  # 1000 + 10 s x 100/s
    assert background.planned_train_tokens(streaming, time.time() + 1000) == 5000  # never past the corpus
    assert background.scheduled(data, cfg, step_s=0.1) is data  # a complete stream, no fixed rule: as before
    fixed = background.scheduled(data, data_cfg(cfg.corpus, **{**STREAM_KEYS, "stream_steps_per_shard": 3.0}),
                                 step_s=0.1)
    assert fixed.schedule == growing.StreamSchedule(300, 300, 3.0) and len(fixed.train_tokens) == 300


class _FirstSteps(Exception):
    """Ends a run at its first step: what the test looks at has happened by then."""


def test_a_budgeted_run_pauses_the_encoder_from_planning_to_the_end_of_its_first_eval(tmp_path, monkeypatch):
    """Planning times steps, and then the run compiles (XLA's codegen takes every core) and times its
    first eval, which sizes the time kept for the final one: the encoder writes nothing from the
    start of planning to the end of that eval, and runs again for the steps. (Beside the encoder, a
    cold 1 GB run's state init compiled in 6.3 s instead of 3.4.)"""
    from rich.console import Console

    from pufferfish_jax import config as config_lib
    from pufferfish_jax import loop, session
    from pufferfish_jax.budget import calibrate, planner

    monkeypatch.setattr(prepare, "_CHUNK_DOCS", 4)
    monkeypatch.setattr(background, "WRITER", "thread")  # in this process, where it can be watched
    monkeypatch.setattr(calibrate, "measure", lambda *a, **k: calibrate.Measurement(compile_s=0.1, step_s=0.01))
    seen, sources, fingerprints = {}, [], []

    def watch(name, fn):
        def watched(*args, **kwargs):
            if sources:
                seen[name] = (sources[0].paused, sources[0].written)
            return fn(*args, **kwargs)
        return watched

    def first_steps(self):
        seen["steps"] = (sources[0].paused, sources[0].written)
        raise _FirstSteps

    prepared = background.prepare_growing

    def prepare_growing(*args, **kwargs):
        data = prepared(*args, **kwargs)
        sources.append(data.growing)
        fingerprints.append(data.fingerprint)
        return data

    monkeypatch.setattr(background, "prepare_growing", prepare_growing)
    monkeypatch.setattr(session, "budget_plan", watch("plan", planner.budget_plan))
    monkeypatch.setattr(loop, "create_state", watch("init", loop.create_state))
    monkeypatch.setattr(loop._Run, "first_eval", watch("first eval", loop._Run.first_eval))
    monkeypatch.setattr(loop._Run, "loop", first_steps)
    folder = corpus(tmp_path, 3000)
    cfg, user_keys = config_lib.from_command_line([
        "budget=10m", f"data.corpus={folder}", f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}",
        "data.vocab_size=300", "data.val_fraction=0.1", *(f"data.{k}={v}" for k, v in STREAM_KEYS.items()),
        "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1", "model.seq_len=32",
        "train.batch_size=4"])
    with pytest.raises(_FirstSteps):
        session.train(cfg, user_keys, time.time(), session.start(cfg), display_console=Console(file=io.StringIO()))
    source = sources[0]
    assert not source.done, "the corpus was encoded whole before the run began: the test saw no stream"
    paused_at = seen["plan"][1]
    assert seen["plan"][0] and seen["init"] == (True, paused_at) and seen["first eval"] == (True, paused_at)
    assert not seen["steps"][0]  # running again once the first eval is done
    source.wait_for(paused_at + 1, timeout_s=30)
    assert source.written > paused_at or source.done  # and it does write again
    # the planner was charged the start-up this corpus cost, and the machine's cache keeps it for reruns
    assert calibrate.CalibrationCache(tmp_path / "cache").startup_s(fingerprints[0], 0.0) > 0
