"""Every batch the planner can choose trains.

The planner considers BATCH_SIZES per data-parallel device and keeps those with
batch % train.grad_accum == 0; batch 1 once crashed in the data layer before the first step.
The data layer yields every one of them (test_data.py). Here the edges train two steps through the
loop's own path (train_batches -> global_batch -> the jitted step) on a tiny model: batch 1, batch
2 and the largest at the planner's default train.grad_accum=1, and accumulation over 2
micro-batches, which a user can set, at the smallest and the largest batch it allows. Each pair is
a compile of its own, a few CPU-seconds; the batches between 2 and the largest give the same
program with another leading dimension, so compiling each of them again (12 CPU-s) added no case.
The smallest and largest batches also run the whole `session.train` (run dir, evals, checkpoint,
outcome), as `train steps=2` does.
"""

import io
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import private_cache, story_corpus
from rich.console import Console

from pufferfish_jax import config as config_lib
from pufferfish_jax import session, sharding
from pufferfish_jax.budget.planner import BATCH_SIZES
from pufferfish_jax.data.pipeline import train_batches
from pufferfish_jax.data.prepare import prepare_data
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.train.state import create_state, make_optimizer
from pufferfish_jax.train.step import make_train_step

SMALLEST, SECOND, LARGEST = sorted(BATCH_SIZES)[0], sorted(BATCH_SIZES)[1], max(BATCH_SIZES)
COMBOS = [(SMALLEST, 1), (SECOND, 1), (LARGEST, 1), (SECOND, 2), (LARGEST, 2)]
TINY = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1", "model.seq_len=16",
        "model.attention=xla", "model.dtype=float32"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, session_cache):
    tmp = tmp_path_factory.mktemp("batches")
    private_cache(tmp / "cache", session_cache)
    return tmp, story_corpus(tmp / "corpus.txt")


def _config(tmp, path, batch_size: int, grad_accum: int, run_dir):
    return config_lib.from_command_line([
        "steps=2", f"train.batch_size={batch_size}", f"train.grad_accum={grad_accum}", "train.log_every=1",
        f"data.corpus={path}", "data.vocab_size=260", "data.val_fraction=0.1", "data.val_min_tokens=0",
        f"data.cache_dir={tmp / 'cache'}", f"run_dir={run_dir}", *TINY])


@pytest.fixture(scope="module")
def tiny(corpus):
    """The data, spec, optimizer and one initial state every combination starts from."""
    tmp, path = corpus
    cfg, _ = _config(tmp, path, 1, 1, tmp / "unused")
    data = prepare_data(cfg.data, config_lib.cache_dir(cfg))
    cfg.model.vocab_size = data.vocab_size
    spec = ModelSpec.from_config(cfg.model, cfg.moe)
    mesh = sharding.single_device_mesh()
    optimizer = make_optimizer(cfg.train)
    return data, spec, mesh, optimizer, create_state(spec, optimizer, 0, mesh)


@pytest.mark.slow  # one compile per combination
@pytest.mark.parametrize("batch_size,grad_accum", COMBOS)
def test_the_edge_batches_train_two_steps(tiny, batch_size, grad_accum):
    data, spec, mesh, optimizer, initial = tiny
    state = jax.tree.map(jnp.copy, initial)  # the step donates its input state
    step = make_train_step(spec, optimizer, grad_accum, mesh)
    batches = train_batches(data.train_tokens, seq_len=spec.seq_len, batch_size=batch_size, seed=0)
    losses = []
    for _, rows in zip(range(2), batches):
        assert rows.shape == (batch_size, spec.seq_len + 1)
        state, metrics = step(state, sharding.global_batch(rows, mesh, batch_size), np.float32(1e-3))
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 2 and all(math.isfinite(x) for x in losses)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size,grad_accum", [(1, 1), (max(BATCH_SIZES), 2)])
def test_the_smallest_and_largest_batch_run_the_whole_command_path(corpus, batch_size, grad_accum):
    tmp, path = corpus
    run_dir = tmp / f"run-{batch_size}-{grad_accum}"
    cfg, user_keys = _config(tmp, path, batch_size, grad_accum, run_dir)
    result = session.train(cfg, user_keys, time.time(), session.start(cfg), display_console=Console(file=io.StringIO()))
    assert result.plan.batch_size == batch_size and not result.interrupted
    assert result.outcome.steps == 2 and result.outcome.tokens == 2 * batch_size * 16
    assert math.isfinite(result.outcome.final.loss) and result.outcome.final.tokens > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert json.loads((run_dir / "outcome.json").read_text())["steps"] == 2
