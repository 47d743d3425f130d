"""What the stages leave in a pipeline's run dir, and the names the report reads them by.

Shared by the stages that write these records and the report that reads them, so neither
module imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path

STAGE_NAMES = ("corpus", "tokenizer", "tokens", "plan", "train", "evaluate", "sample", "report")
HELD_OUT = "val"  # the eval set name for the training corpus's own held-out split


def write_json(path: Path, record) -> None:
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def read_json(run_dir: Path, name: str):
    return json.loads((run_dir / name).read_text())
