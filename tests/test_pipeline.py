"""Pipelines: finished stages are skipped, a config change reruns exactly its dependants, a failed or
interrupted stage is where the next run starts, and the report says what the stages measured."""

import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest import private_cache, story_text

from pipelines.command import build, main
from pufferfish_jax import session
from pipelines.runner import Context, StageFailed, fingerprints, load_manifest, run_stages
from pipelines.stages import STAGE_NAMES, STAGES, Interrupted, stage_names
from pufferfish_jax.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
CONFIG = '''
from pufferfish_jax.config import defaults


def get_config():
    cfg = defaults()
    cfg.train.steps = 12
    cfg.budget.planner = "none"
    cfg.data.corpus = "{corpus}"
    cfg.data.vocab_size = 300
    cfg.data.val_fraction = 0.1
    cfg.model.num_layers = 1
    cfg.model.d_model = 32
    cfg.model.num_heads = 2
    cfg.model.num_kv_heads = 1
    cfg.model.seq_len = 32
    cfg.train.batch_size = 4
    cfg.train.log_every = 2
    cfg.train.eval_every = 4
    cfg.eval.sets = "val,other={other}"
    cfg.sample.prompts = "The river|Children"
    cfg.sample.max_new_tokens = 8
    cfg.sample.min_new_tokens = 4
    return cfg
'''


@pytest.fixture(scope="module")
def config(tmp_path_factory, session_cache):
    tmp = tmp_path_factory.mktemp("pipeline")
    (tmp / "corpus.txt").write_text(story_text(1500))
    (tmp / "other.txt").write_text(story_text(300, offset=5000))
    path = tmp / "tiny.py"
    path.write_text(CONFIG.format(corpus=tmp / "corpus.txt", other=tmp / "other.txt"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PUFFERFISH_CACHE", str(private_cache(tmp / "cache", session_cache)))
        yield path


def _run(config, run_dir, *overrides, stages=STAGES):
    cfg, user_keys, run_dir = build([str(config), f"run_dir={run_dir}", *overrides])
    ctx = Context(cfg, user_keys, run_dir, time.time())
    actions = run_stages(stages, ctx, stage_names(cfg), log=lambda s: None)
    return {name for name, action in actions.items() if action == "ran"}


def _digest(train_dir):
    state = session.restore(train_dir).state
    return session.params_digest(state.params, state.moe_state)


@pytest.fixture(scope="module")
def first(config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "base"
    return run_dir, _run(config, run_dir)


@pytest.mark.slow
def test_first_run_runs_every_stage_and_a_rerun_skips_them_all(config, first):
    run_dir, ran = first
    assert ran == set(STAGE_NAMES)
    manifest = load_manifest(run_dir)["stages"]
    assert all(manifest[name]["status"] == "done" for name in STAGE_NAMES)
    report_mtime = (run_dir / "report.md").stat().st_mtime_ns
    started = time.time()
    assert _run(config, run_dir) == set()
    assert time.time() - started < 5
    assert (run_dir / "report.md").stat().st_mtime_ns == report_mtime
    # Keys that only say where and how often a run writes change nothing.
    assert _run(config, run_dir, "train.checkpoint_every_s=7", "train.keep_checkpoints=2") == set()


@pytest.mark.slow
def test_a_config_change_reruns_only_its_dependants(config, first):
    run_dir, _ = first
    _run(config, run_dir)  # back to the base config, whatever an earlier test left
    assert _run(config, run_dir, "sample.prompts=The old mill") == {"sample", "report"}
    samples = json.loads((run_dir / "samples.json").read_text())["samples"]
    assert [s["prompt"] for s in samples] == ["The old mill"]
    assert _run(config, run_dir, "sample.prompts=The old mill", "eval.sets=val") == {"evaluate", "report"}
    assert [r["name"] for r in json.loads((run_dir / "eval.json").read_text())] == ["val"]
    # Back to the base config: the same two stages rerun, training never does.
    assert _run(config, run_dir) == {"evaluate", "sample", "report"}


@pytest.mark.slow
def test_report_contents_match_what_the_stages_measured(config, first):
    run_dir, _ = first
    _run(config, run_dir)
    report = (run_dir / "report.md").read_text()
    for section in ("## Summary", "## Stages", "## Hardware", "## Data", "## Plan and outcome", "## Loss curves",
                    "## Evaluation", "## Samples", "## Config"):
        assert section in report, section
    png = run_dir / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] > (200, 400)
    assert "](loss_curves.png)" in report
    evals = json.loads((run_dir / "eval.json").read_text())
    assert [r["name"] for r in evals] == ["val", "other"]
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    for r in evals:
        cells = [c.strip() for c in rows[r["name"]].strip("|").split("|")]
        assert cells[2:6] == [f"{r['tokens']:,}", f"{r['val_loss']:.4f}", f"{r['val_bpb']:.4f} ± {r['val_bpb_se']:.4f}",
                              f"{r['unigram_bpb']:.4f}"]
        assert 0 < r["val_bpb_se"] < r["val_bpb"]
    # The evaluate stage's held-out score is the training run's own final eval, recomputed.
    outcome = json.loads((run_dir / "train" / "outcome.json").read_text())
    assert evals[0]["val_bpb"] == pytest.approx(outcome["val_bpb"], rel=1e-5)
    assert evals[0]["val_bpb_se"] == pytest.approx(outcome["val_bpb_se"], rel=1e-4)
    assert f"{outcome['steps']:,}" in rows["steps"]
    for s in json.loads((run_dir / "samples.json").read_text())["samples"]:
        assert s["new_tokens"] >= 4 and s["prompt"] + s["continuation"] in report
    assert "`data.vocab_size` | 300 | 8192" in report


@pytest.mark.parametrize("overrides, changed", [
    (["data.vocab_size=320"], set(STAGE_NAMES) - {"corpus"}),
    (["data.corpus={other}"], set(STAGE_NAMES)),
    (["model.d_model=64"], {"plan", "train", "evaluate", "sample", "report"}),
    (["eval.sets=val"], {"evaluate", "report"}),
    (["sample.temperature=0.5"], {"sample", "report"}),
    (["train.log_every=5", "train.checkpoint_every_s=9", "pipeline.stages=train"], set()),
])
def test_a_change_reaches_exactly_the_stages_that_depend_on_it(config, overrides, changed):
    other = str(config.parent / "other.txt")
    base = build([str(config)])
    new = build([str(config), *(o.format(other=other) for o in overrides)])
    before, after = (fingerprints(STAGES, cfg, user_keys) for cfg, user_keys, _ in (base, new))
    assert {name for name in STAGE_NAMES if before[name] != after[name]} == changed


def test_editing_a_data_file_reruns_from_the_corpus_stage(config, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(story_text(100))
    cfg, user_keys, _ = build([str(config), f"data.corpus={corpus}"])
    before = fingerprints(STAGES, cfg, user_keys)
    corpus.write_text(story_text(101))
    assert fingerprints(STAGES, cfg, user_keys)["corpus"] != before["corpus"]


@pytest.mark.slow
def test_a_failed_middle_stage_is_where_the_next_run_starts(config, first, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(first[0], run_dir)

    def broken(ctx):
        raise DataError("injected failure")

    stages = [dataclasses.replace(s, run=broken) if s.name == "train" else s for s in STAGES]
    with pytest.raises(StageFailed, match="train stage: injected failure"):
        _run(config, run_dir, "train.seed=1", stages=stages)
    manifest = load_manifest(run_dir)["stages"]
    assert manifest["plan"]["status"] == "done" and manifest["train"]["status"] == "running"
    # The data did not change and the plan finished: both are kept; training and what follows rerun.
    assert _run(config, run_dir, "train.seed=1") == {"train", "evaluate", "sample", "report"}
    assert json.loads((run_dir / "train" / "config.json").read_text())["train"]["seed"] == 1
    assert _digest(run_dir / "train") != _digest(first[0] / "train")


@pytest.mark.slow
def test_an_interrupted_train_stage_resumes_from_its_checkpoint(config, first, tmp_path, monkeypatch):
    import pufferfish_jax.loop as loop

    run_dir = tmp_path / "run"
    real, calls = loop.learning_rate, []

    def interrupt_at_step_5(progress, train_cfg, *warmdown):  # Ctrl-C in the middle of training
        calls.append(progress)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real(progress, train_cfg, *warmdown)

    monkeypatch.setattr(loop, "learning_rate", interrupt_at_step_5)
    with pytest.raises(StageFailed) as failure:
        _run(config, run_dir)
    assert isinstance(failure.value.error, Interrupted)
    assert load_manifest(run_dir)["stages"]["train"]["status"] == "running"
    assert any(p.name.isdigit() for p in (run_dir / "train" / "checkpoints").iterdir())
    monkeypatch.setattr(loop, "learning_rate", real)
    assert _run(config, run_dir) == {"train", "evaluate", "sample", "report"}
    assert json.loads((run_dir / "train" / "outcome.json").read_text())["steps"] == 12
    assert _digest(run_dir / "train") == _digest(first[0] / "train")  # as if never interrupted


def test_user_errors_are_one_line_naming_the_stage(config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [
        ([str(config), "pipeline.stages=train,deploy"], "pipeline.stages"),
        ([str(config), "sample.max_new_tokens=40"], "sample.max_new_tokens"),
        ([str(config), "eval.sets=a=val,a=val"], "eval.sets"),
        ([str(ROOT / "configs" / "tinystories.py")], "corpus stage: hf:roneneldan/TinyStories"),
        ([str(config), f"run_dir={tmp_path / 'foreign'}"], "not a pipeline's run dir"),
    ]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    for args, fragment in cases:
        assert main([f"run_dir={tmp_path / 'run'}", *args]) == 2, args
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
