"""Evaluation: bits per byte and its standard error over eval windows, by hand on small known cases."""

import math

import jax
import ml_collections
import numpy as np
import pytest

from pufferfish_jax import sharding
from pufferfish_jax.model.moe import MOE_STATE
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.model.transformer import init_variables
from pufferfish_jax.train.evaluate import evaluate, window_loss
from pufferfish_jax.train.step import make_eval_step, token_nll


def test_window_loss_is_the_token_weighted_mean_and_its_ratio_standard_error():
    # windows of 2, 2 and 1 tokens, then a padding row (no tokens: not a sample)
    loss, se = window_loss(np.array([2.0, 4.0, 3.0, 0.0]), np.array([2.0, 2.0, 1.0, 0.0]))
    assert loss == pytest.approx(9 / 5)
    # residuals nll_w - loss * count_w: 2 - 3.6, 4 - 3.6, 3 - 1.8 -> squares 2.56 + 0.16 + 1.44 = 4.16
    assert se == pytest.approx(math.sqrt(3 / 2 * 4.16) / 5)

    per_window = np.array([1.0, 2.0, 4.0, 5.0])  # equal windows: the standard error of the mean
    loss, se = window_loss(per_window * 8, np.full(4, 8.0))
    assert loss == pytest.approx(3.0) and se == pytest.approx(per_window.std(ddof=1) / 2)

    loss, se = window_loss(np.array([3.0, 0.0]), np.array([2.0, 0.0]))  # one window: no spread
    assert loss == 1.5 and math.isnan(se)


def fake_eval_step(variables, window_BT1, mask_BT):
    """A 'model' whose nll for a target token is a tenth of its id: (per-row nll, per-row count)."""
    nll_BT = np.asarray(window_BT1)[:, 1:] * 0.1 * np.asarray(mask_BT)
    return nll_BT.sum(axis=1), np.asarray(mask_BT).sum(axis=1)


def test_evaluate_reports_bpb_and_its_standard_error():
    val = np.array([0, 3, 1, 4, 1, 5, 9, 2, 6], np.uint16)  # targets 3 1 4 | 1 5 9 | 2 6 (+ one padding row)
    result = evaluate(fake_eval_step, {}, val, 20, seq_len=3, batch_size=2, mesh=sharding.single_device_mesh())
    nll_w, count_w = [0.8, 1.5, 0.8], [3, 3, 2]
    loss = 3.1 / 8
    residuals = [n - loss * c for n, c in zip(nll_w, count_w)]  # -0.3625, 0.3375, 0.025
    loss_se = math.sqrt(3 / 2 * sum(r * r for r in residuals)) / 8
    assert result.tokens == 8 and result.loss == pytest.approx(loss)
    assert result.bpb == pytest.approx(3.1 / (20 * math.log(2)))  # all 20 bytes covered
    assert result.bpb_se == pytest.approx(loss_se * 8 / (20 * math.log(2)))
    assert 0 < result.bpb_se < result.bpb


def test_eval_step_returns_each_rows_masked_nll_and_count():
    spec = ModelSpec.from_config(ml_collections.ConfigDict(dict(
        vocab_size=64, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, head_dim=0, ffn_hidden=0, seq_len=8,
        rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, dtype="float32", remat="none", attention="xla",
        init_std=0.2)))
    params, moe_state = jax.jit(init_variables, static_argnums=0)(spec, jax.random.key(0))
    variables = {"params": params, MOE_STATE: moe_state}
    window = np.asarray(jax.random.randint(jax.random.key(1), (4, 9), 0, 64), np.int32)
    mask = np.ones((4, 8), np.float32)
    mask[2, 5:] = 0  # a padded last window
    mask[3] = 0  # a padding row
    mesh = sharding.single_device_mesh()
    nll_B, count_B = make_eval_step(spec, mesh)(variables, sharding.shard_batch(window, mesh),
                                               sharding.shard_batch(mask, mesh))
    expected_B = (np.asarray(jax.jit(token_nll, static_argnums=1)(variables, spec, window)) * mask).sum(axis=1)
    assert nll_B.shape == count_B.shape == (4,)
    np.testing.assert_allclose(np.asarray(nll_B), expected_B, rtol=1e-5)
    assert np.asarray(count_B).tolist() == [8, 8, 5, 0] and float(nll_B[3]) == 0 and float(nll_B[0]) > 0
