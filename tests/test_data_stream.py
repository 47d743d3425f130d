"""Streaming preparation: chunked reading and encoding, the tokenizer's sample, compressed and
parquet shards, hf: through `datasets` (offline, a local parquet dataset), corrupt shards.
Tiny corpora written to tmp_path; no network."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from conftest import sentences

from pufferfish_jax.data import prepare, readers
from pufferfish_jax.data.corpora import load_documents, split_documents
from pufferfish_jax.data.pipeline import encode_documents, prepare_data
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

    def fail_midway(tok, chunks, train, val, log):
        real(tok, [next(iter(chunks))], train, val, log)
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
