"""Config schema, overrides, validation and budget syntax."""

import json

import pytest

from pufferfish_jax import config as config_lib
from pufferfish_jax.config import apply_overrides, defaults, parse_duration, validate
from pufferfish_jax.errors import ConfigError


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("5m", 300), ("1h", 3600), ("1.5h", 5400), ("1h30m", 5400), ("0.25h", 900), ("2m30s", 150),
])
def test_budget_syntax(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "m5", "5 minutes", "30m1h", "1h1h", "0s", "-5m"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_every_key_has_default_and_help():
    flat = config_lib.flatten(defaults())
    assert set(flat) == set(config_lib.HELP)
    assert all(config_lib.HELP[k].strip() for k in flat)


def test_overrides_are_typed():
    cfg = apply_overrides(defaults(), ["model.num_layers=6", "train.lr=1e-3", "model.tie_embeddings=false",
                                       "budget=5m", "steps=7", "run_dir=out"])
    assert cfg.model.num_layers == 6 and isinstance(cfg.model.num_layers, int)
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.tie_embeddings is False
    assert (cfg.budget.time, cfg.train.steps, cfg.train.run_dir) == ("5m", 7, "out")
    assert defaults().model.num_layers == 4  # the input is not mutated


@pytest.mark.parametrize("override", ["model.num_layers=four", "model.num_layers=1.5", "model.tie_embeddings=maybe"])
def test_wrongly_typed_override(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        apply_overrides(defaults(), [override])


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match="model.num_layers"):
        apply_overrides(defaults(), ["model.num_layer=3"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        apply_overrides(defaults(), ["batch_size=3"])


@pytest.mark.parametrize("overrides, fragment", [
    (["model.num_heads=6"], "divide model.d_model"),
    (["model.num_kv_heads=3"], "must divide model.num_heads"),
    (["train.grad_accum=3"], "must divide train.batch_size"),
    (["model.dtype=float16"], "float32 | bfloat16"),
    (["model.remat=some"], "none | full | save_dots"),
    (["steps=0"], "budget"),
    (["data.val_min_tokens=-1"], "data.val_min_tokens=-1 must not be negative"),
])
def test_validation(overrides, fragment):
    cfg = apply_overrides(defaults(), ["steps=10", *overrides])
    with pytest.raises(ConfigError, match=fragment):
        validate(cfg)


def test_json_round_trip_and_unknown_saved_key(tmp_path):
    cfg = apply_overrides(defaults(), ["model.d_model=128", "steps=3"])
    path = tmp_path / "config.json"
    path.write_text(config_lib.to_json(cfg))
    assert config_lib.load_file(path).to_dict() == cfg.to_dict()
    tree = json.loads(path.read_text())
    tree["model"]["evil"] = 1
    path.write_text(json.dumps(tree))
    with pytest.raises(ConfigError, match="unknown config key 'model.evil'"):
        config_lib.load_file(path)


def test_python_config_files_load():
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.py")):
        cfg = config_lib.load_file(path)
        assert set(config_lib.flatten(cfg)) == set(config_lib.HELP)


def test_a_config_saved_before_a_key_existed_keeps_its_old_behaviour(tmp_path):
    """A run dir saved before data.val_min_tokens split its data without a floor; resuming or
    evaluating it must rebuild that split (and its tokenizer), not today's default."""
    cfg = apply_overrides(defaults(), ["steps=3", "data.val_min_tokens=1234"])
    tree = json.loads(config_lib.to_json(cfg))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tree))
    assert config_lib.load_file(path).data.val_min_tokens == 1234
    del tree["data"]["val_min_tokens"]
    path.write_text(json.dumps(tree))
    assert config_lib.load_file(path).data.val_min_tokens == 0
    assert config_lib.from_dict(tree).data.val_min_tokens == defaults().data.val_min_tokens == 50_000
