"""Crash-proof training: SIGKILL (mid-preparation and mid-training) and resume gives bit-identical
parameters; SIGINT saves and exits; a budgeted run resumes within its budget."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_MODEL, TINY_STEPS, fitted_budget, private_cache
from test_data_stream import docs_of, write_jsonl

from pufferfish_jax.cli import main
from pufferfish_jax.train import checkpoint
from pufferfish_jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
# data.val_min_tokens=0: the held-out split is val_fraction of the documents, not the 50k-token
# floor, which would take half of this small corpus and make every eval cost more than the steps.
ARGS = ["steps=150", "data.corpus=shakespeare", "data.vocab_size=512", "data.val_min_tokens=0", "model.num_layers=2",
        "model.d_model=64", "model.seq_len=32", "train.batch_size=4", "train.checkpoint_every_s=0.3"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, command_env):
    # The built-in corpus is faked by a local file so that no download is needed.
    corpus = tmp_path_factory.mktemp("data") / "plays.txt"
    corpus.write_text("\n\n".join(f"Scene {i}. " + "To be, or not to be, that is the question. " * (5 + i % 7)
                                  + "Whether 'tis nobler in the mind to suffer. " * (i % 5) for i in range(400)))
    return command_env, str(corpus)


def _cmd(run_dir, corpus, *extra):
    args = [a if not a.startswith("data.corpus=") else f"data.corpus={corpus}" for a in ARGS]
    return [sys.executable, "-m", "pufferfish_jax", "train", *args, f"run_dir={run_dir}", *extra]


def _digest(run_dir, capsys) -> str:
    """`inspect --digest`, in this process: the parameters' SHA-256 (a fresh process adds nothing)."""
    capsys.readouterr()
    assert main(["inspect", str(run_dir), "--digest"]) == 0
    return capsys.readouterr().out.strip()


def _newest(run_dir) -> int:
    return max((int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()), default=-1)


def _start_and_wait_for_checkpoint(cmd, env, run_dir, min_step=1):
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if _newest(run_dir) >= min_step:
            return process
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint appeared: {process.communicate()[1][-2000:]}")


# The recipe options whose state a resume must carry: Muon's momentum, the WSD schedule.
RECIPE = ("train.optimizer=muon", "train.schedule=wsd", "model.qk_norm=true")


@pytest.mark.slow
def test_sigkill_twice_and_resume_is_bit_identical(tmp_path, command_env, session_cache, capsys):
    """Two SIGKILLs, then the same command: it ends with the parameters of an uninterrupted run.
    The first kill lands while the corpus is still being tokenized (proven: progress kept in a
    .partial.json and no cache entry), so the next attempt continues from the tokens the killed
    one wrote and follows the saved stream schedule; the second lands mid-training, in that
    resumed attempt, after a checkpoint newer than any before. Muon's momentum, the WSD schedule
    and QK-norm ride along: the recipe state a resume must carry."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    # 4 x 8 MB, tokenized in several seconds, longer than a start and the first checkpoint; the
    # run itself needs about 1.2 M tokens (shard 61 at step 240), so the first attempt stops long before.
    text = write_jsonl(folder / "a.jsonl", docs_of(30_000)).read_bytes()
    for name in "bcd":
        (folder / f"{name}.jsonl").write_bytes(text)
    # Unbuffered, so that what a killed attempt printed is not lost with it.
    env = {**command_env, "PUFFERFISH_CACHE": str(private_cache(tmp_path / "cache", session_cache)),
           "PYTHONUNBUFFERED": "1"}
    tokens_dir = tmp_path / "cache" / "tokens"
    final = 240
    # data.val_fraction: 1 % of these documents is 175k held-out tokens, whose final eval cost more
    # than the training; 0.2 % leaves the 50k-token floor.
    args = ["train", f"steps={final}", f"data.corpus={folder}", *TINY_MODEL, "data.tokenizer_sample_bytes=300000",
            "data.val_fraction=0.002", "data.stream_min_bytes=1", "data.stream_shard_tokens=20000",
            "data.stream_steps_per_shard=4", *RECIPE]
    chaos, reference = tmp_path / "chaos", tmp_path / "reference"
    cmd = [sys.executable, "-m", "pufferfish_jax", *args, f"run_dir={chaos}", "train.checkpoint_every_s=0.1"]

    process = _start_and_wait_for_checkpoint(cmd, env, chaos, min_step=1)
    record = json.loads(next(tokens_dir.glob("*.partial.json")).read_text())  # progress kept for the next run
    entries = [p for p in tokens_dir.glob("*.json") if ".partial" not in p.name]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and record["train"]["docs"] > 0 and not entries  # mid-preparation
    assert json.loads((chaos / "stream.json").read_text())["steps_per_shard"] == 4.0

    seen = _newest(chaos)
    process = _start_and_wait_for_checkpoint(cmd, env, chaos, min_step=seen + 1)
    time.sleep(0.1)
    assert process.poll() is None and seen < _newest(chaos) < final  # still training when killed
    process.send_signal(signal.SIGKILL)
    out, _ = process.communicate()
    assert process.returncode == -signal.SIGKILL and seen < _newest(chaos) < final
    assert "resuming" in out and "continuing the" in out  # from the checkpoint and the tokens the first wrote

    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "resuming" in result.stdout, result.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "pufferfish_jax", *args, f"run_dir={reference}"], cwd=ROOT,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (reference / "stream.json").read_text() == (chaos / "stream.json").read_text()
    assert _digest(chaos, capsys) == _digest(reference, capsys)


@pytest.mark.slow  # the shared trained run
def test_resume_refusals(trained_run_copy, corpus_file, session_cache, capsys, monkeypatch):
    monkeypatch.setenv("PUFFERFISH_CACHE", str(session_cache))
    same = ["train", f"steps={TINY_STEPS}", f"data.corpus={corpus_file}", *TINY_MODEL, f"run_dir={trained_run_copy}"]
    for extra, fragment in [(["resume=never"], "already has checkpoints"),
                            (["model.d_model=64"], "was trained with model.d_model=32")]:
        capsys.readouterr()
        assert main([*same, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_interrupted_budgeted_run_resumes_within_its_budget(env, tmp_path):
    """SIGINT mid-run: the run saves, says how to resume and exits 130 within seconds. After a
    pause, the same command: the two attempts together use at most the budget (the pause is not
    charged), and the run ends with a final eval, its WSD warmdown started by the clock and
    finished at zero."""
    env, corpus = env
    run_dir = tmp_path / "run"
    # Half as much again as the smallest budget the planner accepts on this machine (asked for with
    # a budget it must refuse), and at least 15 s: the second attempt starts up again and must still
    # train long enough for the warmdown to start and run. At a flat 12 s, on a loaded machine, the
    # first attempt's start-up left it time for no step at all.
    # budget.max_epochs=0: the tiny corpus would otherwise end the run early, and this test checks the clock
    fixed = ("steps=0", "budget.planner=none", "budget.max_epochs=0")
    budget = max(15, math.ceil(1.5 * fitted_budget(_cmd(run_dir, corpus, *fixed)[4:], 1, env)))
    args = _cmd(run_dir, corpus, f"budget={budget}s", *fixed, "train.schedule=wsd", "train.log_every=1")
    first_start = time.time()
    process = subprocess.Popen(args, cwd=ROOT, env={**env, "PUFFERFISH_T0": repr(first_start)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (run_dir / "metrics.jsonl").exists() or '"train"' not in (run_dir / "metrics.jsonl").read_text():
        time.sleep(0.1)
        assert process.poll() is None, process.communicate()[1][-2000:]
    interrupted = time.time()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    first_wall = time.time() - first_start
    assert process.returncode == 130, err[-2000:]
    assert time.time() - interrupted < 20 and "Resume with the same command" in out
    assert checkpoint.saved_steps(run_dir / "checkpoints")[-1] > 0
    time.sleep(1.0)  # the pause is not part of the budget
    second_start = time.time()
    result = subprocess.run(args, cwd=ROOT, env={**env, "PUFFERFISH_T0": repr(second_start)},
                            capture_output=True, text=True, timeout=120)
    second_wall = time.time() - second_start
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming" in result.stdout and "final:" in result.stdout
    # the first attempt's exit after its save (about a second) is the only time charged twice
    assert first_wall + second_wall <= budget + 3.0, (first_wall, second_wall)
    lrs = [r["lr"] for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "train"]
    assert len(lrs) >= 20, lrs  # enough steps for a schedule to be seen
    # held at the peak, then well down: on a machine busy with other work (the suite's other worker),
    # a slow-down late in the run re-fits the total down and ends it some steps before the floor.
    # test_deadline.py checks the floor itself under a simulated slow-down.
    assert lrs[-1] < 0.25 * max(lrs) and lrs.count(max(lrs)) > 1
    record = checkpoint.load_progress(checkpoint.locate(run_dir))
    assert 0 < record["warmdown_from"] < 1 and record["train_began_s"] > 0


@pytest.mark.slow  # trains
def test_attempt_killed_before_its_first_checkpoint_starts_over(corpus_file, session_cache, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setenv("PUFFERFISH_CACHE", str(session_cache))
    args = ["train", "steps=3", f"data.corpus={corpus_file}", *TINY_MODEL]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)  # a save cut short
    (run_dir / "config.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text('{"event": "eval"}\n')
    stale_events = run_dir / "tensorboard" / "events.out.tfevents.1.killed"
    stale_events.parent.mkdir()
    stale_events.write_bytes(b"")
    assert main([*args, f"run_dir={run_dir}"]) == 0, capsys.readouterr().err[-2000:]
    assert '"final": true' in (run_dir / "metrics.jsonl").read_text()
    assert not stale_events.exists() and any((run_dir / "tensorboard").iterdir())  # the new attempt's curves only
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main([*args, f"run_dir={foreign}"]) == 2 and "not an empty folder" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
