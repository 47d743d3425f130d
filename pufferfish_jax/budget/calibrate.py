"""Measured step times: compile and run the real train step for a shape, cached per machine.

The planner's promise rests on these numbers, so they come from the same jitted function the loop
will run (same shapes, same optimizer constants). A side effect is deliberate: calibrating the
chosen shape fills JAX's persistent compilation cache, so the run's own compile is a cache hit.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np

from pufferfish_jax.model.transformer import ModelSpec
from pufferfish_jax.train.state import init_state, make_optimizer
from pufferfish_jax.train.step import make_train_step


@dataclass(frozen=True)
class Measurement:
    compile_s: float
    step_s: float  # median seconds per optimizer step, after the first


def _key(spec: ModelSpec, train_cfg: ml_collections.ConfigDict) -> str:
    device = jax.devices()[0]
    parts = {
        "device": f"{device.platform}:{device.device_kind}:{jax.device_count()}:{os.cpu_count()}",
        "versions": f"jax{jax.__version__}:jaxlib{jaxlib.__version__}",
        "spec": asdict(spec),
        "batch": [train_cfg.batch_size, train_cfg.grad_accum],
    }
    return json.dumps(parts, sort_keys=True)


def measure(spec: ModelSpec, train_cfg: ml_collections.ConfigDict, steps: int = 3) -> Measurement:
    """Compiles the train step for this shape and times `steps` runs after a warm-up run."""
    optimizer = make_optimizer(train_cfg)
    state = jax.jit(init_state, static_argnums=(0, 1))(spec, optimizer, jax.random.key(0))
    window = jnp.asarray(np.random.default_rng(0).integers(0, spec.vocab_size, (train_cfg.batch_size, spec.seq_len + 1)), jnp.int32)
    lr = jnp.float32(0.0)  # no update: measurement must not depend on what the weights do
    step = make_train_step(spec, optimizer, train_cfg.grad_accum)
    start = time.perf_counter()
    compiled = step.lower(state, window, lr).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, window, lr)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, window, lr)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return Measurement(compile_s=compile_s, step_s=float(np.median(times)))


class CalibrationCache:
    """measurements.json in the cache dir: key -> Measurement; written atomically."""

    def __init__(self, cache_dir: Path):
        self._path = cache_dir / "calibration.json"
        self._table = json.loads(self._path.read_text()) if self._path.is_file() else {}

    def get(self, spec: ModelSpec, train_cfg: ml_collections.ConfigDict,
            log: Callable[[str], None] = lambda s: None) -> tuple[Measurement, bool]:
        """The measurement for this shape and whether it came from the cache."""
        key = _key(spec, train_cfg)
        if key in self._table:
            return Measurement(**self._table[key]), True
        log(f"timing {spec.num_layers} layers x d{spec.d_model} on this machine")
        found = measure(spec, train_cfg)
        self._table[key] = asdict(found)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self._table, indent=1))
        os.replace(tmp, self._path)
        return found, False
