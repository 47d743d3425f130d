"""Orbax checkpoints that carry their own config and tokenizer, restored only into explicit targets.

A checkpoint step holds three items: `state` (params, optimizer state, step), `config` (the full
resolved config as JSON) and `tokenizer` (the tokenizer's JSON). That makes any single checkpoint
folder self-describing: restore reads and validates the config, builds the abstract state with
`jax.eval_shape`, and restores into that target. Nothing is unpickled, and a target-less restore
(which could follow paths outside the checkpoint) never happens.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import ml_collections
import orbax.checkpoint as ocp

from pufferfish_jax import config as config_lib

ITEMS = ("state", "config", "tokenizer")
logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax narrates every save at INFO/WARNING.


class CheckpointError(ValueError):
    """A path that is not a readable checkpoint; the message is one line."""


def open_manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, state, cfg: ml_collections.ConfigDict, tokenizer_json: str) -> None:
    """Starts an async save of the state at its own step (finalized atomically by Orbax)."""
    manager.save(
        int(state.step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(cfg.to_dict()),
            tokenizer=ocp.args.JsonSave(json.loads(tokenizer_json)),
        ),
    )


@dataclass(frozen=True)
class CheckpointRef:
    root: Path  # the folder holding numbered step folders
    step: int


def locate(path: str | Path) -> CheckpointRef:
    """Accepts a run dir, its `checkpoints` folder, or one step folder; picks the newest step."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"no such run dir or checkpoint: {path}")
    path = path.resolve()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name.isdigit() and (path / "state").is_dir():
        return CheckpointRef(path.parent, int(path.name))
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "state").is_dir()) if path.is_dir() else []
    if not steps:
        raise CheckpointError(f"{path} holds no checkpoint (expected a run dir, its checkpoints/ folder or a step folder)")
    return CheckpointRef(path, steps[-1])


def _read_only_manager(ref: CheckpointRef) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    return ocp.CheckpointManager(ref.root, options=options, item_names=ITEMS)


def load_metadata(ref: CheckpointRef) -> tuple[ml_collections.ConfigDict, str]:
    """The saved config (validated against the schema) and the tokenizer JSON."""
    with _read_only_manager(ref) as manager:
        try:
            got = manager.restore(ref.step, args=ocp.args.Composite(
                config=ocp.args.JsonRestore(), tokenizer=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax raises many types for a damaged folder.
            raise CheckpointError(f"checkpoint {ref.root / str(ref.step)} is unreadable: {type(e).__name__}: {e}".splitlines()[0]) from None
    try:
        cfg = config_lib.from_dict(got.config)
    except config_lib.ConfigError as e:
        raise CheckpointError(f"checkpoint {ref.root / str(ref.step)} has an invalid config: {e}") from None
    return cfg, json.dumps(got.tokenizer)


def restore_state(ref: CheckpointRef, abstract_state):
    """Restores the train state into an explicit abstract target (shapes from the saved config)."""
    with _read_only_manager(ref) as manager:
        try:
            got = manager.restore(ref.step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        except Exception as e:
            raise CheckpointError(f"checkpoint {ref.root / str(ref.step)} does not match its config: {e}".splitlines()[0]) from None
    return got.state
