"""Append-only JSONL metrics: one object per event, flushed at once so a crash loses nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsWriter:
    def __init__(self, path: Path):
        self._file = open(path, "a", encoding="utf-8")

    def write(self, event: str, **fields) -> None:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
