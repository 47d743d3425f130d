"""The pure parts of tools/bench_recipe.py: medians and spreads over seeds, and which changes make `best`."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import load_tool

load_tool("bench_planner_core")
tool = load_tool("bench_recipe")


def _rows(variant, vals, seconds, status="ok"):
    return [dict(budget="2m", variant=variant, seed=i, status=status, val_bpb=v, second_bpb=s, wall=114.0)
            for i, (v, s) in enumerate(zip(vals, seconds))]


def test_medians_and_spread_over_the_seeds_that_finished():
    rows = _rows("muon", [1.5, 1.7, 1.6], [2.1, 2.0, 2.4]) + _rows("muon", [9.0], [9.0], status="failed")
    m = tool.medians(rows, "2m", "muon")
    assert (m["n"], m["failed"]) == (3, 1)
    assert m["val_bpb"] == pytest.approx(1.6) and m["val_bpb_spread"] == pytest.approx(0.2)
    assert m["second_bpb"] == pytest.approx(2.1) and m["second_bpb_spread"] == pytest.approx(0.4)
    assert m["wall_fraction"] == pytest.approx(0.95)


def test_best_takes_changes_that_win_on_both_texts_and_one_of_each_key():
    rows = (_rows("baseline", [1.8, 1.8], [2.5, 2.5]) + _rows("muon", [1.6, 1.7], [2.3, 2.4])
            + _rows("wsd", [1.7, 1.7], [2.6, 2.6])  # wins on the held-out split only: left out
            + _rows("vocab2048", [1.75, 1.75], [2.4, 2.4]) + _rows("vocab4096", [1.7, 1.7], [2.45, 2.45])
            + _rows("relu2", [1.9, 1.9], [2.4, 2.4]))
    assert tool.winners(rows, "2m", ["baseline", "muon", "wsd", "vocab2048", "vocab4096", "relu2"]) == ["muon", "vocab4096"]
    assert tool.winners(_rows("baseline", [1.8], [2.5]), "2m", ["baseline"]) == []


def test_unknown_variants_are_refused_and_default_always_runs():
    assert tool.parse_args(["--variants", "muon,best"]).variants == ["baseline", "muon", "best"]
    with pytest.raises(SystemExit):
        tool.parse_args(["--variants", "muon,adam"])


def test_an_ad_hoc_variant_is_its_overrides_and_excludes_others_setting_its_key():
    name = "model.init_std=0.05+train.schedule=wsd"
    assert tool.parse_args(["--variants", name]).variants == ["baseline", name]
    assert tool.variant(name) == (["model.init_std=0.05", "train.schedule=wsd"], "model.init_std")
    rows = (_rows("baseline", [1.8, 1.8], [2.5, 2.5]) + _rows("model.init_std=0.05", [1.7, 1.7], [2.4, 2.4])
            + _rows("model.init_std=0.1", [1.75, 1.75], [2.45, 2.45]))
    assert tool.winners(rows, "2m", ["baseline", "model.init_std=0.05", "model.init_std=0.1"]) == ["model.init_std=0.05"]


def test_variants_run_seed_by_seed_so_drift_hits_every_arm_alike(monkeypatch):
    calls = []
    monkeypatch.setattr(tool, "run_seed", lambda args, out, budget, name, overrides, pin, seed:
                        calls.append((seed, name, overrides, pin)) or {"variant": name, "seed": seed})
    rows = tool.interleaved(SimpleNamespace(seeds=2), Path("out"), "2m",
                            {"baseline": [], "wsd": ["train.schedule=wsd"]}, {"baseline": ["pin"], "wsd": ["pin"]})
    assert calls == [(0, "baseline", [], ["pin"]), (0, "wsd", ["train.schedule=wsd"], ["pin"]),
                     (1, "baseline", [], ["pin"]), (1, "wsd", ["train.schedule=wsd"], ["pin"])]
    assert [(r["seed"], r["variant"]) for r in rows] == [(0, "baseline"), (0, "wsd"), (1, "baseline"), (1, "wsd")]


def test_every_variant_runs_on_the_baseline_recipe_whatever_the_defaults(monkeypatch):
    """The defaults are WSD and Muon now; the reference stays the issue's starting recipe (AdamW at
    3e-3, cosine), every single change is that recipe plus the change, and `default` is today's."""
    from pufferfish_jax import config as config_lib

    seen = {}
    monkeypatch.setattr(tool, "warm_data", lambda corpus, variants: None)
    monkeypatch.setattr(tool.core, "machine", lambda: dict(model="cpu", usable_cores=2, flags=[], jax="-", backend="cpu"))
    monkeypatch.setattr(tool, "interleaved", lambda args, out, budget, variants, pin: seen.update(variants) or [])
    monkeypatch.setattr(tool, "print_table", lambda *args: None)
    assert tool.bench(tool.parse_args(["--budgets", "2m", "--variants", "wsd,muon,default",
                                       "--pin", "model.d_model=64"])) == 0
    resolved = {name: config_lib.from_command_line(["steps=1", *overrides])[0].train for name, overrides in seen.items()}
    assert {name: (t.schedule, t.optimizer, config_lib.peak_lr(t), t.muon_lr) for name, t in resolved.items()} == {
        "baseline": ("cosine", "adamw", 0.003, 0.01), "wsd": ("wsd", "adamw", 0.003, 0.01),
        "muon": ("cosine", "muon", 0.006, 0.01), "default": ("wsd", "muon", 0.006, 0.01)}
    today = config_lib.defaults().train
    assert (today.schedule, today.optimizer, config_lib.peak_lr(today)) == ("wsd", "muon", 0.006)


def test_the_shape_is_the_baselines_plan_and_todays_default_plans_for_itself(monkeypatch):
    """Single changes share the shape the planner picks for the issue's recipe; `default` runs as
    `just train` would, planning its own (Muon's larger critical batch included), on a calibration
    cache that planning it once beforehand has filled."""
    planned, pins = [], {}
    monkeypatch.setattr(tool, "warm_data", lambda corpus, variants: None)
    monkeypatch.setattr(tool.core, "machine", lambda: dict(model="cpu", usable_cores=2, flags=[], jax="-", backend="cpu"))
    monkeypatch.setattr(tool, "plan_shape", lambda budget, corpus, recipe: planned.append(recipe) or ["shape"])
    monkeypatch.setattr(tool, "interleaved", lambda args, out, budget, variants, pin: pins.update(pin) or [])
    monkeypatch.setattr(tool, "print_table", lambda *args: None)
    assert tool.bench(tool.parse_args(["--budgets", "2m", "--variants", "wsd,default"])) == 0
    assert planned == [tool.BASELINE_KEYS, []]
    assert pins == {"baseline": ["shape"], "wsd": ["shape"], "default": []}
