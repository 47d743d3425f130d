"""A run dir's own records read back as untrusted input: config.json and plan.json.

A run dir holds config.json (the resolved config), plan.json (what the planner chose),
tokenizer.json, metrics.jsonl, checkpoints/ and, once the run has finished, outcome.json.
A run dir may have been copied from another machine, edited by hand or damaged, so nothing in it
is used unchecked: each file must be a regular file inside the run dir (a symbolic link could make
us read anything on the disk), the config goes through the config schema, and the plan through
PLAN_FIELDS (kinds, ranges, no unknown keys) before it becomes a `Plan`. Every failure is one
line naming the file. The checkpoints' own records are checked in `train/checkpoint.py`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_collections

from pufferfish_jax import config as config_lib
from pufferfish_jax.budget.planner import Plan
from pufferfish_jax.errors import CheckpointError, ConfigError
from pufferfish_jax.schema import Field, check_record

_KINDS = {"str": str, "dict": dict, "list": list, "int": int, "float": float}
_RANGES = {"mode": Field(str, choices=("budget", "steps")), "steps": Field(int, low=1), "batch_size": Field(int, low=1),
           "seq_len": Field(int, low=1), "params": Field(int, low=1), "subset_fraction": Field(float, low=0, high=1)}


def _plan_fields() -> dict[str, Field]:
    """A Field per Plan attribute: its annotated kind, non-negative numbers, and _RANGES' tighter rules."""
    fields = {}
    for f in dataclasses.fields(Plan):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kind = _KINDS[f.type if isinstance(f.type, str) else f.type.__name__]
        rule = _RANGES.get(f.name) or Field(kind, low=0 if kind in (int, float) else None)
        fields[f.name] = dataclasses.replace(rule, required=required)
    return fields


PLAN_FIELDS = _plan_fields()


def regular_file(path: Path) -> Path:
    """`path` if it is a regular file, not a link; a missing or linked one is a one-line error."""
    if path.is_symlink():
        raise CheckpointError(f"{path} is a symbolic link; a run dir's files are read only when they are its own: "
                              "replace the link with a copy")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the run dir is incomplete or not a run dir")
    return path


def refuse_links(run_dir: Path, names: set[str]) -> None:
    """Refuses a run dir in which any of `names` (the files a run reads and writes) is a symbolic
    link: resuming would read it, or append to it, wherever it points."""
    for name in sorted(names):
        if (run_dir / name).is_symlink():
            raise CheckpointError(f"{run_dir / name} is a symbolic link; a run dir's files are read and written only "
                                  "when they are its own: replace the link with a copy")


def read_json(path: Path) -> Any:
    try:
        return json.loads(regular_file(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({type(e).__name__}); it is damaged: restore it or choose another run_dir") from None


def plan_from_dict(tree: Any, where: str) -> Plan:
    """A Plan from its saved JSON, once every field is checked; the model section goes through
    the config schema (it is written into the config by `apply_plan`)."""
    check_record(tree, PLAN_FIELDS, where, CheckpointError)
    try:
        config_lib.from_dict({"model": tree["model"]})
    except ConfigError as e:
        raise CheckpointError(f"{where} has an invalid model section: {e}") from None
    if len(tree.get("mesh", [1, 1, 1])) != 3 or not all(isinstance(n, int) and n >= 1 for n in tree.get("mesh", [1])):
        raise CheckpointError(f"{where}: mesh={tree['mesh']!r:.60} is not three positive integers")
    return Plan(**tree)


def read_plan(run_dir: Path) -> Plan:
    return plan_from_dict(read_json(run_dir / "plan.json"), str(run_dir / "plan.json"))


def read_config(run_dir: Path) -> ml_collections.ConfigDict:
    """The run's resolved config.json, checked like any config (kinds, keys, ranges)."""
    path = regular_file(run_dir / "config.json")
    try:
        return config_lib.validate(config_lib.load_file(path))
    except ConfigError as e:
        raise CheckpointError(f"run dir {run_dir} has an invalid config.json: {e}") from None
