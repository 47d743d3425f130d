"""Append-only JSONL metrics: one object per event, flushed at once so a crash loses nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsWriter:
    """`enabled=False` (every process but 0 of a multi-host run) writes nothing."""

    def __init__(self, path: Path, enabled: bool = True):
        self._file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, event: str, **fields) -> None:
        if self._file is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
