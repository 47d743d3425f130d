"""Every batch the planner can choose trains through the real path (session.train, as `train` runs it).

The planner considers BATCH_SIZES per data-parallel device and keeps those with
batch % train.grad_accum == 0; batch 1 once crashed in the data layer before the first step.
A tiny model keeps each run to compiling one train and one eval step (slow: about 17 compiles).
"""

import io
import json
import math
import time

import pytest
from rich.console import Console

from pufferfish_jax import config as config_lib
from pufferfish_jax import session
from pufferfish_jax.budget.planner import BATCH_SIZES

WORDS = "the river ran past the old mill and the miller sang of bread and stone while children played".split()
COMBOS = [(batch, accum) for accum in (1, 2) for batch in BATCH_SIZES if batch % accum == 0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small JSONL corpus and one cache (tokenizer, token streams, compiled init) for every run."""
    tmp = tmp_path_factory.mktemp("batches")
    texts = [" ".join(WORDS[i % 7:] + WORDS[:i % 7]) + f" {i}." for i in range(300)]
    path = tmp / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return tmp, path


@pytest.mark.slow
@pytest.mark.parametrize("batch_size,grad_accum", COMBOS)
def test_every_planner_batch_trains_two_steps(corpus, batch_size, grad_accum):
    tmp, path = corpus
    run_dir = tmp / f"run-{batch_size}-{grad_accum}"
    cfg, user_keys = config_lib.from_command_line([
        "steps=2", f"train.batch_size={batch_size}", f"train.grad_accum={grad_accum}", "train.log_every=1",
        f"data.corpus={path}", "data.vocab_size=260", "data.val_fraction=0.1", f"data.cache_dir={tmp / 'cache'}",
        "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1", "model.seq_len=16",
        "model.attention=xla", "model.dtype=float32", f"run_dir={run_dir}"])
    result = session.train(cfg, user_keys, time.time(), session.start(cfg),
                           display_console=Console(file=io.StringIO()))
    assert result.plan.batch_size == batch_size and not result.interrupted
    assert result.outcome.steps == 2 and result.outcome.tokens == 2 * batch_size * 16
    assert math.isfinite(result.outcome.final.loss) and result.outcome.final.tokens > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert json.loads((run_dir / "outcome.json").read_text())["steps"] == 2
