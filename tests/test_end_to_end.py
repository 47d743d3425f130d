"""The real commands, run as a user would: a budgeted train, then generate and eval on its run dir."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, budget_hint, run_command, story_corpus

from pufferfish_jax.budget.planner import MIN_STEPS
from pufferfish_jax.cli import main

# Short, but not below what the planner needs here for data, compile, 20 steps, evals and the save;
# a slower machine gets the budget the planner asks for instead (see `budget_run`). The runs hold
# out no more than val_fraction of this small corpus: the 50k-token floor would take half of it,
# and they may repeat it past budget.max_epochs, which would end them early: these tests check the clock.
BUDGET_S = 20
SMALL_CORPUS = ("data.vocab_size=512", "data.val_min_tokens=0", "budget.max_epochs=0")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """One corpus for the module's training runs, so they share its tokenizer and token cache."""
    return story_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", sentences=1500)


def budgeted_train(args, budget: int, env) -> tuple:
    """`train budget=Ns ARGS` from a fresh process, its clock started here; where this CPU cannot
    fit the smallest plan in that budget, the planner refuses with `try budget=Ns`, and the run is
    repeated once with N. Returns (result, wall seconds, the budget it ran with)."""
    for _ in range(2):
        started = time.time()
        result = run_command(["train", f"budget={budget}s", *args], {**env, "PUFFERFISH_T0": repr(started)})
        wall = time.time() - started
        if result.returncode == 0 or (need := budget_hint(result.stderr)) is None:
            break
        budget = need
    return result, wall, budget


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory, command_env, corpus):
    """`train budget=20s` (or what this CPU needs, see `budgeted_train`). Where the machine slowed
    down after planning (the suite's other worker, CPU steal), the run still ends on time but
    trains fewer than the plan's minimum steps, too few to show a falling loss; it is repeated
    once with twice the budget. So the test checks the budget on any machine instead of failing
    on a slow or busy one."""
    tmp = tmp_path_factory.mktemp("e2e")
    budget = BUDGET_S
    for attempt in (1, 2):
        run_dir = tmp / f"run{attempt}"
        result, wall, budget = budgeted_train([f"data.corpus={corpus}", *SMALL_CORPUS, f"run_dir={run_dir}",
                                               "model.seq_len=32", "train.batch_size=8", "train.log_every=5"],
                                              budget, command_env)
        if result.returncode != 0 or json.loads((run_dir / "outcome.json").read_text())["steps"] >= MIN_STEPS:
            break
        budget *= 2
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, wall, budget, result.stdout


@pytest.mark.slow
def test_budgeted_train_ends_inside_budget_with_falling_loss(budget_run):
    run_dir, wall, budget, stdout = budget_run
    # the run's last lines in the message: a run over its budget or ended early says which phase took the time
    assert 0.85 * budget <= wall <= budget, f"wall {wall:.1f}s for a {budget:.0f}s budget:\n{stdout[-1500:]}"
    for name in ("config.json", "plan.json", "metrics.jsonl", "tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert any(p.name.isdigit() for p in (run_dir / "checkpoints").iterdir())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    assert len(train) >= 2 and train[-1] < train[0]
    final = evals[-1]
    assert final["final"] and final["val_loss"] < evals[0]["val_loss"]
    assert final["val_bpb"] < final["unigram_bpb"]
    assert "val bpb" in stdout and "plan" in stdout
    plan, outcome = (json.loads((run_dir / name).read_text()) for name in ("plan.json", "outcome.json"))
    assert outcome["steps"] > 0 and plan["mode"] == "budget" and "outcome" not in plan
    assert 0 < outcome["val_bpb_se"] < outcome["val_bpb"] and final["val_bpb_se"] == outcome["val_bpb_se"]


@pytest.mark.slow
def test_generate_from_run_dir_is_seeded(budget_run, command_env, capsys, monkeypatch):
    """The shell script a user runs, then the same arguments again in this process: one seed, one text."""
    run_dir = budget_run[0]
    args = ["generate", str(run_dir), "The river", "--max-new-tokens", "24", "--seed", "3"]
    first = subprocess.run([str(ROOT / "tools" / "generate.sh"), *args[1:]], cwd=ROOT, env=command_env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("The river") and len(first.stdout) > len("The river") + 10
    monkeypatch.setenv("PUFFERFISH_CACHE", command_env["PUFFERFISH_CACHE"])
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out == first.stdout


@pytest.mark.slow
def test_eval_reports_bpb_on_any_text(budget_run, command_env, tmp_path, capsys, monkeypatch):
    run_dir = budget_run[0]
    text = story_corpus(tmp_path / "other.txt", sentences=200)
    result = run_command(["eval", str(run_dir), "--data", str(text), "--json"], command_env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["tokens"] > 0 and 0 < report["val_bpb"] < report["unigram_bpb"]
    assert 0 < report["val_bpb_se"] < report["val_bpb"]
    monkeypatch.setenv("PUFFERFISH_CACHE", command_env["PUFFERFISH_CACHE"])  # the human form, in this process
    assert main(["eval", str(run_dir), "--data", str(text)]) == 0
    plain = capsys.readouterr().out
    assert f"{report['val_bpb']:.4f} ± {report['val_bpb_se']:.4f} (SE) bits/byte" in plain, plain


@pytest.mark.slow  # fresh processes of the real command; the many other bad inputs: test_bad_inputs.py, in-process
def test_user_errors_are_one_line(command_env, tmp_path):
    """A user error in a real process: one line on stderr, exit 2, no traceback, before (a typo in a
    key) and after (a missing corpus, found while preparing data) the heavy imports."""
    cases = [
        (["train", "model.num_layer=3", "steps=2"], "model.num_layers"),
        (["train", "steps=2", f"data.corpus={tmp_path / 'missing.txt'}"], "missing.txt"),
    ]
    for args, fragment in cases:
        result = run_command(args, command_env, timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        assert fragment in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _scale_step_times(calibration: Path, factor: float) -> dict:
    """Multiplies every measured step time in calibration.json by `factor`: a cache carried over
    from a faster machine. Returns the new values by (machine, family, shape)."""
    table = json.loads(calibration.read_text())
    scaled = {}
    for machine, sections in table.items():
        for family, shapes in sections.items():
            if family.startswith("["):  # step-time families are JSON lists; matmul rates are not
                for shape, entry in shapes.items():
                    entry["measurement"]["step_s"] *= factor
                    scaled[machine, family, shape] = entry["measurement"]["step_s"]
    calibration.write_text(json.dumps(table))
    return scaled


@pytest.mark.slow
def test_a_cache_from_a_faster_machine_is_noticed_and_the_run_still_ends_on_time(budget_run, command_env, corpus,
                                                                                 tmp_path):
    """calibration.json's step times cut to a third, as if measured on a 3x faster machine: the plan
    promises 3x the steps, the loop re-fits them to the clock, and the run scales every cached step
    time by the ratio it saw."""
    first_dir, _, budget, _ = budget_run
    cache = tmp_path / "cache"
    shutil.copytree(command_env["PUFFERFISH_CACHE"], cache)
    stale_times = _scale_step_times(cache / "calibration.json", 1 / 3)
    assert stale_times  # the fault happened
    plan = json.loads((first_dir / "plan.json").read_text())
    m = plan["model"]
    pinned = [f"model.{k}={m[k]}" for k in ("num_layers", "d_model", "num_heads", "num_kv_heads", "dtype")]
    run_dir = tmp_path / "run"
    # Shorter than the first run's: the shape is pinned and measured, so planning is quick, and the
    # re-fit to the clock is the same at any length; not much shorter, as the seconds kept after
    # training (exit, save, the jitter floor) are fixed, and 85 % of the budget must still be used.
    result, wall, budget = budgeted_train([f"data.corpus={corpus}", *SMALL_CORPUS, f"run_dir={run_dir}",
                                           "model.seq_len=32", f"train.batch_size={plan['batch_size']}", *pinned],
                                          round(0.75 * budget), {**command_env, "PUFFERFISH_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert 0.85 * budget <= wall <= budget, f"wall {wall:.1f}s for a {budget:.0f}s budget"
    stale = json.loads((run_dir / "plan.json").read_text())
    outcome = json.loads((run_dir / "outcome.json").read_text())
    assert stale["steps"] > 1.5 * outcome["steps"]  # the plan believed the cache; the loop did not
    assert "every step time cached for this machine is now scaled by" in result.stdout
    corrected = _scale_step_times(cache / "calibration.json", 1.0)
    ratios = {key: corrected[key] / value for key, value in stale_times.items()}
    assert min(ratios.values()) > 1.5 and max(ratios.values()) == pytest.approx(min(ratios.values()))  # all alike
