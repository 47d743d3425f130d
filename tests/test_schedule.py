"""Learning-rate schedule and weight-decay mask."""

import json
import math

import jax.numpy as jnp
import pytest

from pufferfish_jax.config import apply_overrides, defaults
from pufferfish_jax.train.state import _decay_mask, learning_rate


def test_warmup_then_cosine_to_floor():
    cfg = apply_overrides(defaults(), ["train.schedule=cosine", "train.lr=1e-3", "train.min_lr_ratio=0.1",
                                           "train.warmup_fraction=0.1"]).train
    lrs = [learning_rate((s + 1) / 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then decays monotonically
    assert lrs[-1] == pytest.approx(1e-4)  # to the floor at the last step
    assert max(lrs) == pytest.approx(1e-3)
    assert learning_rate(1.5, cfg) == pytest.approx(1e-4) and learning_rate(-1, cfg) == 0.0


def test_decay_mask_skips_vectors_and_embedding():
    params = {"embed": {"embedding": jnp.ones((8, 4))}, "block": {"norm": {"scale": jnp.ones(4)},
                                                               "mlp": {"kernel": jnp.ones((4, 4))}}}
    mask = _decay_mask(params)
    assert mask == {"embed": {"embedding": False}, "block": {"norm": {"scale": False}, "mlp": {"kernel": True}}}


def test_wsd_by_steps_holds_the_peak_then_decays_linearly_to_zero():
    cfg = apply_overrides(defaults(), ["train.lr=1e-3", "train.schedule=wsd", "train.warmup_fraction=0.1",
                                       "train.warmdown_fraction=0.2"]).train
    lrs = [learning_rate((s + 1) / 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # the same warmup as cosine
    assert lrs[9:80] == [pytest.approx(1e-3)] * 71  # constant until 20 % of the steps are left
    assert lrs[80:] == [pytest.approx(1e-3 * (20 - k) / 20) for k in range(1, 21)]  # then linear, to zero
    assert lrs[-1] == 0.0
    # A budgeted run says where its warmdown began; math.inf: not yet (the peak, whatever the progress).
    assert learning_rate(0.95, cfg, math.inf) == pytest.approx(1e-3)
    assert learning_rate(0.75, cfg, 0.5) == pytest.approx(0.5e-3) and learning_rate(1.0, cfg, 1.0) == 0.0


def test_lr_zero_is_the_optimizers_measured_rate_and_the_resolved_config_records_it():
    from pufferfish_jax.budget.planner import apply_plan, fixed_steps_plan
    from pufferfish_jax.config import peak_lr

    adamw = apply_overrides(defaults(), ["train.optimizer=adamw", "train.schedule=wsd"]).train
    muon = apply_overrides(defaults(), ["train.optimizer=muon", "train.schedule=wsd"]).train
    assert defaults().train.lr == 0 and (peak_lr(adamw), peak_lr(muon)) == (3e-3, 6e-3)
    assert learning_rate(0.5, adamw) == pytest.approx(3e-3) and learning_rate(0.5, muon) == pytest.approx(6e-3)
    assert peak_lr(apply_overrides(defaults(), ["train.lr=1e-3"]).train) == 1e-3  # a rate the user gives wins
    cfg = apply_overrides(defaults(), ["train.optimizer=muon", "model.num_layers=1", "model.d_model=32",
                                       "model.num_heads=2", "model.num_kv_heads=1", "model.vocab_size=64", "steps=10"])
    resolved = apply_plan(cfg, fixed_steps_plan(cfg, train_tokens=10_000))
    assert resolved.train.lr == 6e-3  # so config.json says what the run used


def test_a_run_saved_before_the_optimizer_key_resumes_on_adamw():
    from pufferfish_jax import config as config_lib

    tree = json.loads(config_lib.to_json(config_lib.defaults()))
    del tree["train"]["optimizer"]
    assert config_lib.from_saved(tree).train.optimizer == "adamw"
    assert config_lib.defaults().train.optimizer == "muon"
