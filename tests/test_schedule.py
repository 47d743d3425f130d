"""Learning-rate schedule and weight-decay mask."""

import jax.numpy as jnp
import pytest

from pufferfish_jax.config import apply_overrides, defaults
from pufferfish_jax.train.state import _decay_mask, learning_rate


def test_warmup_then_cosine_to_floor():
    cfg = apply_overrides(defaults(), ["train.lr=1e-3", "train.min_lr_ratio=0.1", "train.warmup_fraction=0.1"]).train
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
