"""Orbax checkpoints that carry their own config and tokenizer, restored only into explicit targets.

A checkpoint step holds four items: `state` (params, optimizer state, step), `config` (the full
resolved config as JSON), `tokenizer` (the tokenizer's JSON) and `progress` (wall time used, the
schedule's progress and the data fingerprint, which a resumed run needs). That makes any single checkpoint
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
from pufferfish_jax.errors import CheckpointError

ITEMS = ("state", "config", "tokenizer", "progress")
logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax narrates every save at INFO/WARNING.


def open_manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, state, cfg: ml_collections.ConfigDict, tokenizer_json: str,
         progress: dict) -> None:
    """Starts an async save of the state at its own step (finalized atomically by Orbax: a save cut
    short leaves only a temporary folder, which is never taken for a checkpoint)."""
    manager.save(
        int(state.step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(cfg.to_dict()),
            tokenizer=ocp.args.JsonSave(json.loads(tokenizer_json)),
            progress=ocp.args.JsonSave(progress),
        ),
    )


@dataclass(frozen=True)
class CheckpointRef:
    root: Path  # the folder holding numbered step folders
    step: int


def saved_steps(root: Path) -> list[int]:
    """Finalized checkpoint steps under `root`, oldest first (temporary folders are not digits)."""
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").is_dir())


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
    steps = saved_steps(path)
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
        cfg = config_lib.from_saved(got.config)
    except config_lib.ConfigError as e:
        raise CheckpointError(f"checkpoint {ref.root / str(ref.step)} has an invalid config: {e}") from None
    return cfg, json.dumps(got.tokenizer)


def load_progress(ref: CheckpointRef) -> dict:
    with _read_only_manager(ref) as manager:
        try:
            return dict(manager.restore(ref.step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())).progress)
        except Exception as e:
            raise CheckpointError(f"checkpoint {ref.root / str(ref.step)} has no readable progress record: {type(e).__name__}") from None


def restore_state(ref: CheckpointRef, abstract_state):
    """Restores the train state into an explicit abstract target (shapes from the saved config)."""
    with _read_only_manager(ref) as manager:
        try:
            got = manager.restore(ref.step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        except Exception as e:
            raise CheckpointError(f"checkpoint {ref.root / str(ref.step)} could not be restored into the shapes its config "
                                  f"describes (damaged, or edited): {type(e).__name__}: {e}".splitlines()[0][:300]) from None
    return got.state


def restore_newest(root: Path, abstract_state, *, at_most: int | None = None, warn=lambda s: None):
    """(state, ref) of the newest readable checkpoint at or below step `at_most`; an unreadable
    one is reported through `warn` and the previous one is tried, so one damaged save never
    costs the run."""
    steps = [s for s in saved_steps(root) if at_most is None or s <= at_most]
    for step in reversed(steps):
        ref = CheckpointRef(root, step)
        try:
            return restore_state(ref, abstract_state), ref
        except CheckpointError as e:
            warn(f"warning: {e}; trying the previous checkpoint")
    raise CheckpointError(f"no readable checkpoint in {root}" + (f" at or below step {at_most}" if at_most is not None else ""))
