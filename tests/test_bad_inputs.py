"""Every user mistake: a one-line error naming the problem and the fix, a non-zero exit, no traceback,
and nothing already saved is lost."""

import json
import random

import pytest
from conftest import TINY_MODEL, random_corpus

from pufferfish_jax.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    rng = random.Random(0)
    random_corpus(root / "ok.txt")
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(rng.randrange(256) for _ in range(5000)) + b"\x00")
    (root / "latin1.txt").write_bytes("café naïve ".encode("latin-1") * 100)
    (root / "few.jsonl").write_text("\n".join(json.dumps({"text": f"a tiny document {i}"}) for i in range(4)))
    (root / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    return root


@pytest.fixture(autouse=True)
def cache(session_cache, monkeypatch):
    monkeypatch.setenv("PUFFERFISH_CACHE", str(session_cache))


def _fails(capsys, argv, fragment, code=2):
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert fragment in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("name, fragment", [
    ("missing.txt", "missing.txt"),
    ("empty.txt", "contains no text"),
    ("binary.txt", "looks binary"),
    ("latin1.txt", "not UTF-8"),
    pytest.param("few.jsonl", "windows", marks=pytest.mark.slow),  # gets as far as training
    ("bad.jsonl", "bad.jsonl"),
])
def test_bad_data(capsys, files, tmp_path, name, fragment):
    _fails(capsys, ["train", "steps=2", f"data.corpus={files / name}", "data.vocab_size=300", "data.val_fraction=0.5",
                    f"run_dir={tmp_path / 'run'}"], fragment)


@pytest.mark.parametrize("overrides, fragment", [
    (["model.vocab_size=100"], "model.vocab_size=0"),
    pytest.param(["budget=5s"], "too small", marks=pytest.mark.slow),  # measures training steps to say so
    (["budget=tomorrow"], "not a duration"),
    (["model.num_kv_heads=3"], "must divide model.num_heads"),
    (["train.batch_size=many"], "expected int"),
    (["run_dir=/proc/nope/run"], "cannot write run dir"),
    (["model.attention=splash"], "model.attention=splash needs a TPU"),
])
def test_bad_settings(capsys, files, overrides, fragment):
    argv = ["train", f"data.corpus={files / 'ok.txt'}", "data.vocab_size=300", *overrides]
    _fails(capsys, argv if any(o.startswith("budget=") for o in overrides) else [*argv, "steps=2"], fragment)


@pytest.mark.slow  # the shared trained run
def test_bad_checkpoints(capsys, trained_run_copy, tmp_path):
    trained = trained_run_copy  # a copy: this test damages it
    _fails(capsys, ["generate", str(tmp_path), "hi"], "holds no checkpoint")
    _fails(capsys, ["generate", str(trained), "hi " * 40, "--max-new-tokens", "8"], "shorten the prompt")
    # a checkpoint whose config was edited to another model: restoring into that target fails cleanly
    step_dir = next(p for p in (trained / "checkpoints").iterdir() if p.name.isdigit())
    config_file = step_dir / "config" / "metadata"
    original = config_file.read_text()
    saved = json.loads(original)
    saved["model"]["d_model"] = 64
    config_file.write_text(json.dumps(saved))
    _fails(capsys, ["generate", str(trained), "hi"], "could not be restored")
    config_file.write_text(original)
    for path in (step_dir / "state").rglob("*"):  # now damage the arrays themselves
        if path.is_file() and "manifest" in path.name:
            path.write_bytes(b"garbage")
    _fails(capsys, ["generate", str(trained), "hi"], "could not be restored")
    assert (trained / "metrics.jsonl").is_file() and (trained / "plan.json").is_file()  # nothing was removed


@pytest.mark.slow  # trains
def test_diverging_loss_keeps_the_last_good_checkpoint(capsys, files, tmp_path):
    _fails(capsys, ["train", "steps=40", f"data.corpus={files / 'ok.txt'}", *TINY_MODEL, "train.lr=1e6",
                    "train.grad_clip=0", f"run_dir={tmp_path / 'run'}"], "loss became", code=1)


@pytest.mark.slow  # trains
def test_failed_save_is_reported_and_keeps_the_previous_checkpoint(capsys, files, tmp_path, monkeypatch):
    from pufferfish_jax.train import checkpoint

    real_save, calls = checkpoint.save, []

    def flaky_save(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # the first save works, then the disk is full
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", flaky_save)
    run_dir = tmp_path / "run"
    _fails(capsys, ["train", "steps=6", f"data.corpus={files / 'ok.txt'}", *TINY_MODEL, "train.checkpoint_every_s=0",
                    f"run_dir={run_dir}"], "could not be saved")
    assert checkpoint.saved_steps(run_dir / "checkpoints") == [1]  # the good one survives
