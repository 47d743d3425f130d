"""Streaming preparation: chunked reading and encoding, the tokenizer's sample, compressed and
parquet shards, hf: through `datasets` (offline, a local parquet dataset), corrupt shards.
Tiny corpora written to tmp_path; no network."""

from __future__ import annotations

import gzip
import json
import random
import threading
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from conftest import sentences

from pufferfish_jax.data import prepare, readers
from pufferfish_jax.data.corpora import load_documents, split_documents
from pufferfish_jax.data.prepare import encode_documents, prepare_data
from pufferfish_jax.data.tokenizer import eos_id, tokenizer_fingerprint, train_tokenizer
from pufferfish_jax.errors import DataError


def data_cfg(corpus: str, **overrides) -> ml_collections.ConfigDict:
    cfg = dict(corpus=corpus, val_source="", val_fraction=0.1, val_min_tokens=0, vocab_size=400, tokenizer="",
               max_chars=0, text_field="text", tokenizer_sample_bytes=0)
    return ml_collections.ConfigDict({**cfg, **overrides})


def docs_of(n: int, offset: int = 0) -> list[str]:
    return [f"Doc {i}. " + sentences(i, 3 + i % 5) for i in range(offset, offset + n)]


def write_jsonl(path: Path, texts: list[str], field: str = "text", opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts))
    return path


def stream_docs(tokens: np.ndarray, tok) -> list[str]:
    """The documents of an `EOS doc EOS doc ... EOS` stream."""
    eos, ids = eos_id(tok), np.asarray(tokens).tolist()
    cuts = [i for i, t in enumerate(ids) if t == eos]
    return [tok.decode(ids[a + 1:b]) for a, b in zip(cuts, cuts[1:])]


# ----------------------------------------------------------------------------- bounded reading
def test_streamed_txt_chunks_equal_whole_text_chunks_whatever_the_blocks():
    rng = random.Random(0)
    text = "".join(rng.choice(["word ", "long-word ", "\n", "\n\n", "x" * 50]) for _ in range(40_000))
    whole = readers.chunk_text(text)
    assert len(whole) > 10 and "".join(whole) == text
    for block in (1, 777, 8192, 100_000):
        blocks = iter([text[i:i + block] for i in range(0, len(text), block)]) if block > 1 else iter(text)
        assert list(readers.chunked_text(blocks)) == whole, block
    assert readers.chunk_text("short text") == ["short text"] and readers.chunk_text(" \n ") == []


def test_streaming_prep_gives_the_one_shot_tokens_in_chunks(tmp_path, monkeypatch):
    """Several files, chunks of 3 documents: the same tokenizer and streams as the whole-corpus path
    (load everything, split, train on the whole training list, encode in one array)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", docs_of(40))
    write_jsonl(folder / "b.jsonl.gz", docs_of(30, 40), opener=gzip.open)
    (folder / "c.txt").write_text("\n\n".join(sentences(i, 8) for i in range(200)))  # > 64 KB: chunked
    monkeypatch.setattr(prepare, "_CHUNK_DOCS", 3)
    cfg = data_cfg(str(folder), val_min_tokens=500)
    streamed = prepare_data(cfg, tmp_path / "cache")

    docs = load_documents(str(folder), tmp_path)
    train_docs, val_docs = split_documents(docs, 0.1, val_min_tokens=500)
    tok = train_tokenizer(train_docs, 400)
    assert tokenizer_fingerprint(streamed.tokenizer) == tokenizer_fingerprint(tok)
    for tokens, side in ((streamed.train_tokens, train_docs), (streamed.val_tokens, val_docs)):
        one_shot, num_bytes = encode_documents(tok, side)
        assert np.array_equal(np.asarray(tokens), one_shot) and tokens.dtype == np.uint16
    assert streamed.train_bytes == encode_documents(tok, train_docs)[1]
    assert streamed.val_bytes == encode_documents(tok, val_docs)[1]
    held_out = set(stream_docs(streamed.val_tokens, streamed.tokenizer))
    assert held_out == set(val_docs) and not held_out & set(stream_docs(streamed.train_tokens, streamed.tokenizer))


def test_tokenizer_trains_on_a_deterministic_sample_of_training_documents(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", docs_of(400))
    docs = load_documents(str(corpus), tmp_path)
    train_docs, val_docs = split_documents(docs, 0.1)
    train_bytes = sum(len(d.encode()) + 1 for d in train_docs)
    cfg = data_cfg(str(corpus), tokenizer_sample_bytes=train_bytes // 4)
    sample = list(prepare.sample_documents(cfg, tmp_path))
    assert sample == list(prepare.sample_documents(cfg, tmp_path))  # deterministic
    assert set(sample) < set(train_docs) and not set(sample) & set(val_docs)
    assert sample == [d for d in train_docs if d in set(sample)]  # corpus order kept
    assert 0.15 < sum(len(d.encode()) + 1 for d in sample) / train_bytes < 0.35  # about a quarter
    everything = list(prepare.sample_documents(data_cfg(str(corpus), tokenizer_sample_bytes=10**9), tmp_path))
    assert everything == train_docs == list(prepare.sample_documents(data_cfg(str(corpus)), tmp_path))

    sampled = prepare_data(cfg, tmp_path / "cache")
    full = prepare_data(data_cfg(str(corpus)), tmp_path / "cache")
    assert sampled.fingerprint != full.fingerprint  # the sample size is part of the key
    assert tokenizer_fingerprint(sampled.tokenizer) == tokenizer_fingerprint(train_tokenizer(sample, 400))
    assert sampled.train_bytes == full.train_bytes  # the same split, only the tokenizer differs


def test_an_interrupted_preparation_leaves_no_entry_and_a_rerun_reuses_the_tokenizer(tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", docs_of(60))
    cfg = data_cfg(str(corpus))
    real = prepare.encode_into

    def fail_midway(tok, chunks, train, val, log, **kwargs):
        real(tok, [next(iter(chunks))], train, val, log, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_CHUNK_DOCS", 5)
    monkeypatch.setattr(prepare, "encode_into", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "tokens").iterdir())  # no partial stream under any name
    monkeypatch.setattr(prepare, "encode_into", real)
    monkeypatch.setattr("pufferfish_jax.data.tokenizer.train_tokenizer", lambda *a: pytest.fail("tokenizer retrained"))
    again = prepare_data(cfg, tmp_path / "cache")
    assert again.val_tokens.size > 1 and again.train_tokens.size > again.val_tokens.size


# ----------------------------------------------------------------------------- sources at scale
def write_parquet(path: Path, texts: list[str], field: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({field: texts, "n": list(range(len(texts)))}), path, row_group_size=3)
    return path


def write_zst(path: Path, data: bytes) -> Path:
    import zstandard
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


def test_shards_of_every_format_with_a_text_field(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    a, b, c, d = docs_of(2), docs_of(3, 10), docs_of(7, 20), docs_of(2, 30)
    with gzip.open(folder / "a.txt.gz", "wt") as f:
        f.write(a[0])
    write_zst(folder / "b.jsonl.zst", "".join(json.dumps({"body": t}) + "\n" for t in b).encode())
    write_parquet(folder / "c.parquet", c, field="body")
    write_jsonl(folder / "d.jsonl.gz", d, field="body", opener=gzip.open)
    (folder / "e.md").write_text("not a corpus file")
    assert load_documents(str(folder), tmp_path, text_field="body") == [a[0]] + b + c + d
    assert load_documents(f"{folder}/*.parquet", tmp_path, text_field="body", max_chars=1) == c[:1]
    with pytest.raises(DataError) as excinfo:  # the default field is 'text'
        load_documents(str(folder / "c.parquet"), tmp_path)
    assert "set data.text_field" in str(excinfo.value) and "\n" not in str(excinfo.value)


def corrupt_shards(folder: Path) -> dict[str, Path]:
    """One broken file of each kind, each in its own folder beside a good shard."""
    good = docs_of(20)
    gz = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in good).encode())
    cases = {"bad.jsonl.gz": b"this is not gzip" * 10, "cut.jsonl.gz": gz[:len(gz) // 2],
             "bad.jsonl.zst": b"not zstd either" * 10, "bad.parquet": b"PAR1 not really a parquet file PAR1"}
    folders = {}
    for name, data in cases.items():
        case = folder / name.replace(".", "_")
        case.mkdir(parents=True)
        write_jsonl(case / "0_good.jsonl", good)
        (case / name).write_bytes(data)
        folders[name] = case
    line = folder / "bad_line"
    line.mkdir()
    write_jsonl(line / "0_good.jsonl", good)
    (line / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    folders["bad.jsonl:2"] = line
    return folders


def test_a_corrupt_shard_is_named_in_one_line_and_nothing_prepared_is_lost(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", docs_of(50))
    before = prepare_data(data_cfg(str(good)), tmp_path / "cache")
    entries = sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir())
    for needle, folder in corrupt_shards(tmp_path / "corrupt").items():
        with pytest.raises(DataError) as excinfo:
            prepare_data(data_cfg(str(folder)), tmp_path / "cache")
        message = str(excinfo.value)
        assert needle in message and "\n" not in message, message
    assert sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir()) == entries  # no partial entry
    after = prepare_data(data_cfg(str(good)), tmp_path / "cache")
    assert after.fingerprint == before.fingerprint and np.array_equal(after.train_tokens, before.train_tokens)


@pytest.fixture
def offline_datasets(monkeypatch):
    """`datasets` with the hub switched off, as on a machine without it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    return datasets


def test_hf_spec_parsing_and_load_arguments(tmp_path):
    from pufferfish_jax.data import hub
    assert hub.parse_hf("roneneldan/TinyStories") == ("roneneldan/TinyStories", "", "train")
    assert hub.parse_hf("HuggingFaceFW/fineweb-edu:sample-10BT@train") == (
        "HuggingFaceFW/fineweb-edu", "sample-10BT", "train")
    assert hub.parse_hf("wikitext:wikitext-2-raw-v1@validation") == ("wikitext", "wikitext-2-raw-v1", "validation")
    assert hub.load_args("wikitext", "wikitext-2-raw-v1", "test") == (
        ("wikitext", "wikitext-2-raw-v1"), {"split": "test", "streaming": True})
    write_parquet(tmp_path / "b.parquet", ["x"])
    write_parquet(tmp_path / "a.parquet", ["y"])
    args, kwargs = hub.load_args(str(tmp_path), "", "train")
    assert args == ("parquet",) and kwargs["data_files"] == {"train": [str(tmp_path / "a.parquet"),
                                                                        str(tmp_path / "b.parquet")]}
    with pytest.raises(DataError):
        hub.parse_hf(":config@train")


def test_hf_stream_through_datasets_parquet_builder_offline(tmp_path, offline_datasets):
    """hf:FOLDER runs the real `datasets.load_dataset(..., streaming=True)` path on local parquet
    shards; a stream is split by document hash alone and its held-out documents never train."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    docs = docs_of(120)
    write_parquet(folder / "part-0.parquet", docs[:70], field="story")
    write_parquet(folder / "part-1.parquet", docs[70:], field="story")
    spec = f"hf:{folder}@train"
    prepared = prepare_data(data_cfg(spec, text_field="story", val_min_tokens=10**6), tmp_path / "cache")
    held_out = stream_docs(prepared.val_tokens, prepared.tokenizer)
    trained = stream_docs(prepared.train_tokens, prepared.tokenizer)
    assert held_out == split_documents(docs, 0.1)[1]  # the hash rule alone: no floor for a stream
    assert sorted(trained + held_out) == sorted(docs)  # every row, once
    assert trained == [d for d in docs if d not in set(held_out)]  # in the dataset's order
    assert not set(held_out) & set(trained)


def test_a_budgeted_run_trains_on_an_hf_stream_as_it_is_read(tmp_path, offline_datasets, monkeypatch):
    """A stream of unknown length is not read whole first. Its held-out text is the held-out
    documents of its head (the tokenizer's sample), complete before training; training starts at
    the first shard (the writer held there proves it); held-out documents past the head are read
    past, on neither side; the finished entry is byte for byte the one-shot one, and the held-out
    text is the same when the tokenizer was cached (the head read again)."""
    from pufferfish_jax.data import background, cache, growing

    monkeypatch.setattr(prepare, "_CHUNK_DOCS", 4)
    monkeypatch.setattr(background, "WRITER", "thread")  # in this process, where it can be held
    gate, published = threading.Event(), growing.GrowingTokens.published

    def held(self, tokens):
        published(self, tokens)
        if tokens >= 300:
            gate.wait(30)

    monkeypatch.setattr(growing.GrowingTokens, "published", held)
    folder = tmp_path / "dataset"
    folder.mkdir()
    docs = docs_of(400)
    write_parquet(folder / "part-0.parquet", docs[:200])
    write_parquet(folder / "part-1.parquet", docs[200:])
    cfg = data_cfg(f"hf:{folder}", tokenizer_sample_bytes=20_000, stream_min_bytes=1, stream_shard_tokens=300,
                   stream_margin=2.0, stream_steps_per_shard=0.0)
    data = background.prepare_growing(cfg, tmp_path / "bg")
    source = data.growing
    assert source is not None and not source.done  # training may start: the stream is still being read
    gate.set()
    source.wait_for(2**62)
    held_out = stream_docs(data.val_tokens, data.tokenizer)
    trained = stream_docs(source.prefix(source.written), data.tokenizer)
    by_hash = split_documents(docs, 0.1)[1]
    assert 0 < len(held_out) < len(by_hash) and held_out == by_hash[:len(held_out)]  # the head's, in order
    assert trained == [d for d in docs if d not in set(by_hash)]  # no held-out document, head or not, trains

    one_shot = prepare_data(cfg, tmp_path / "whole")
    assert one_shot.fingerprint == data.fingerprint
    for name in ("train.bin", "val.bin", "json"):
        assert (tmp_path / "bg/tokens" / f"{data.fingerprint}.{name}").read_bytes() == \
               (tmp_path / "whole/tokens" / f"{data.fingerprint}.{name}").read_bytes(), name
    val_path = cache.paths(tmp_path / "bg", data.fingerprint)[2]
    val_bytes = val_path.read_bytes()
    for path in (tmp_path / "bg/tokens").iterdir():  # tokens gone, tokenizer cached
        path.unlink()
    background.prepare_growing(cfg, tmp_path / "bg").growing.wait_for(2**62)
    assert val_path.read_bytes() == val_bytes


@pytest.mark.parametrize("scan_max_bytes", [0, 2_000])
def test_files_bigger_than_scan_max_bytes_are_split_by_their_head_before_being_read_whole(
        tmp_path, monkeypatch, scan_max_bytes):
    """Local files of more than data.scan_max_bytes on disk are split as a stream is: when
    training may start (the writer held at its first shard) only the head and what follows it
    have been read, not the whole corpus; the held-out text is the head's held-out documents, and
    no held-out document trains. Below the limit (0: always) the corpus is scanned first: every
    document read, every held-out document held out."""
    from pufferfish_jax.data import background, growing

    monkeypatch.setattr(prepare, "_CHUNK_DOCS", 4)
    monkeypatch.setattr(background, "WRITER", "thread")
    gate, published, read = threading.Event(), growing.GrowingTokens.published, []

    def held(self, tokens):
        published(self, tokens)
        if tokens >= 300:
            gate.wait(30)

    def counted(*args, **kwargs):
        for doc in iter_documents(*args, **kwargs):
            read.append(doc)
            yield doc

    iter_documents = prepare.iter_documents
    monkeypatch.setattr(growing.GrowingTokens, "published", held)
    monkeypatch.setattr(prepare, "iter_documents", counted)
    docs = docs_of(400)
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", docs[:200])
    write_jsonl(folder / "b.jsonl", docs[200:])
    cfg = data_cfg(str(folder), tokenizer_sample_bytes=20_000, scan_max_bytes=scan_max_bytes, stream_min_bytes=1,
                   stream_shard_tokens=300, stream_margin=2.0, stream_steps_per_shard=0.0)
    data = background.prepare_growing(cfg, tmp_path / "cache")
    read_before_training = len(read)
    gate.set()
    data.growing.wait_for(2**62)
    held_out = stream_docs(data.val_tokens, data.tokenizer)
    trained = stream_docs(data.growing.prefix(data.growing.written), data.tokenizer)
    by_hash = split_documents(docs, 0.1)[1]
    assert trained == [d for d in docs if d not in set(by_hash)]
    if scan_max_bytes:
        assert read_before_training < len(docs) / 2
        assert 0 < len(held_out) < len(by_hash) and held_out == by_hash[:len(held_out)]
        assert data.growing.total_estimate < 2**62  # plain jsonl: sized from the files
    else:
        assert read_before_training >= len(docs) and held_out == by_hash


def test_the_pipelines_corpus_stage_counts_documents_past_the_head_on_neither_side(tmp_path):
    """The held-out documents after a head are read past: the pipeline's corpus stage counted
    them as training documents."""
    from pipelines.runner import Context
    from pipelines.stages import corpus as corpus_stage
    from pufferfish_jax.config import apply_overrides, defaults

    docs = docs_of(400)
    write_jsonl(tmp_path / "corpus.jsonl", docs)
    cfg = apply_overrides(defaults(), [f"data.corpus={tmp_path / 'corpus.jsonl'}", "data.val_fraction=0.1",
                                       "data.tokenizer_sample_bytes=20000", "data.scan_max_bytes=2000",
                                       f"data.cache_dir={tmp_path / 'cache'}"])
    record = corpus_stage(Context(cfg, set(), tmp_path, time.time()))
    held_out = split_documents(docs, 0.1)[1]
    assert record["train_documents"] == len(docs) - len(held_out)
    assert 0 < record["val_documents"] < len(held_out)


def test_a_corpus_too_slow_for_its_budget_stops_early_with_one_line(tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", docs_of(80))
    monkeypatch.setattr(prepare, "_CHUNK_DOCS", 10)
    monkeypatch.setattr(prepare, "PROJECT_AFTER_S", 0.0)  # project from the first chunk
    seen = []
    real = prepare._check_finish
    monkeypatch.setattr(prepare, "_check_finish", lambda *a: seen.append(a) or real(*a))
    with pytest.raises(DataError) as excinfo:
        prepare_data(data_cfg(str(corpus)), tmp_path / "cache", finish_by=time.time() - 1)
    assert "data.max_chars" in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert len(seen) == 1 and seen[0][0] < seen[0][1]  # stopped after the first chunk of several
    assert not list((tmp_path / "cache" / "tokens").iterdir())
    done = prepare_data(data_cfg(str(corpus)), tmp_path / "cache", finish_by=time.time() + 3600)
    assert done.train_tokens.size > 1


def test_runs_saved_before_the_new_keys_keep_their_data_fingerprint(tmp_path):
    """A saved config without data.text_field / data.tokenizer_sample_bytes reads as they did then
    (field 'text', the tokenizer on all training text), so the cache key is the one they hashed."""
    from pufferfish_jax import config as config_lib
    from pufferfish_jax.data import cache
    corpus = str(write_jsonl(tmp_path / "c.jsonl", docs_of(5)))
    saved = config_lib.to_json(config_lib.defaults())
    tree = json.loads(saved)
    tree["data"] |= {"corpus": corpus}
    for key in ("text_field", "tokenizer_sample_bytes"):
        del tree["data"][key]
    old = config_lib.from_saved(tree)
    assert old.data.tokenizer_sample_bytes == 0 and old.data.text_field == "text"
    before_keys = ml_collections.ConfigDict({k: v for k, v in old.data.to_dict().items()
                                             if k not in ("text_field", "tokenizer_sample_bytes")})
    assert cache.keys(old.data) == cache.keys(before_keys)
    new = config_lib.defaults()
    new.data.corpus = corpus
    assert new.data.tokenizer_sample_bytes > 0 and cache.keys(new.data)[2] != cache.keys(old.data)[2]
    assert cache.keys(new.data)[0] == cache.keys(old.data)[0]  # the same split either way


def test_the_benchmark_corpus_has_the_asked_size_in_shuffled_distinct_documents(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "tools"))
    import bench_data
    paragraphs = [f"Paragraph {i}: " + sentences(i, 2) for i in range(300)]
    written = bench_data.write_corpus(tmp_path / "corpus", 1, paragraphs)
    docs = load_documents(str(tmp_path / "corpus"), tmp_path)
    assert 1_000_000 <= written == sum(len(d.encode()) for d in docs) < 1_010_000
    assert len(set(docs)) > 0.99 * len(docs) and all(3 <= d.count("\n") + 1 <= 12 for d in docs)
