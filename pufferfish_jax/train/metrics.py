"""Append-only metrics: one JSON object per event in metrics.jsonl, and the same numbers as
TensorBoard scalars in the run dir's tensorboard/ folder, both flushed at once so a crash loses
nothing. One writer feeds both, so the two never disagree."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from pufferfish_jax.train.tensorboard import EventWriter

TENSORBOARD_DIR = "tensorboard"
NOT_SCALARS = ("time", "step")  # the x axis and the wall time, not curves


def scalar_tags(event: str, fields: dict) -> dict[str, float]:
    """A record's numbers as TensorBoard tags: `train/loss`, `eval/val_bpb`, `train/moe/load_max`
    (flags, strings and missing values are left out)."""
    return {f"{event}/{name.replace('.', '/')}": float(value) for name, value in fields.items()
            if name not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


class MetricsWriter:
    """`enabled=False` (every process but 0 of a multi-host run) writes nothing."""

    def __init__(self, path: Path, enabled: bool = True):
        self._file = open(path, "a", encoding="utf-8") if enabled else None
        self._events = EventWriter(path.parent / TENSORBOARD_DIR) if enabled else None

    def write(self, event: str, **fields) -> None:
        if self._file is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._events.scalars(int(fields.get("step", 0)), scalar_tags(event, fields), wall_time=record["time"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._events.close()


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
