"""Orbax checkpoints that carry their own config and tokenizer, restored only into explicit targets.

A checkpoint step holds four items: `state` (params, optimizer state, step), `config` (the full
resolved config as JSON), `tokenizer` (the tokenizer's JSON) and `progress` (wall time used, the
schedule's progress and the data fingerprint, which a resumed run needs). That makes any single checkpoint
folder self-describing: restore reads and validates the config, builds the abstract state with
`jax.eval_shape`, and restores into that target. Nothing is unpickled, and a target-less restore
(which could follow paths outside the checkpoint) never happens.

A checkpoint is untrusted input: before Orbax opens a step folder, the folder is checked to hold no
symbolic link (it would read whatever the link points at), and the config and progress records are
checked against their schemas; a checkpoint written by a newer format is refused.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import ml_collections
import orbax.checkpoint as ocp

from pufferfish_jax import config as config_lib
from pufferfish_jax.errors import CheckpointError
from pufferfish_jax.schema import Field, check_record

ITEMS = ("state", "config", "tokenizer", "progress")
FORMAT = 1  # what a checkpoint holds and how; saved in its progress record (absent: 1)
PROGRESS_FIELDS = {"step": Field(int, low=0), "elapsed_s": Field(float, low=0), "progress": Field(float, low=0, high=1),
                   "data_fingerprint": Field(str), "format": Field(int, low=1, required=False),
                   # a budgeted wsd run's schedule state (loop.py): where its warmdown began, when training began
                   "warmdown_from": Field(float, low=0, high=1, required=False),
                   "train_began_s": Field(float, low=0, required=False)}
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
            progress=ocp.args.JsonSave({**progress, "format": FORMAT}),
        ),
    )


@dataclass(frozen=True)
class CheckpointRef:
    root: Path  # the folder holding numbered step folders
    step: int


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise CheckpointError(f"{path} is a symbolic link (to {os.readlink(path)}); a checkpoint is read only from "
                              "real folders inside its run dir: replace the link with a copy, or remove it")


def check_no_links(step_dir: Path) -> None:
    """Refuses a step folder that is, or holds anywhere inside it, a symbolic link: called before
    Orbax opens anything, which would follow one out of the checkpoint to any file on the disk."""
    _refuse_link(step_dir)
    for folder, dirs, files in os.walk(step_dir):  # never descends into a link; it lists them, and we refuse them
        for name in dirs + files:
            _refuse_link(Path(folder) / name)


def saved_steps(root: Path) -> list[int]:
    """Finalized checkpoint steps under `root`, oldest first (temporary folders are not digits). A
    step folder that is a symbolic link is refused, not skipped: it is not this run's checkpoint."""
    _refuse_link(root)
    if not root.is_dir():
        return []
    steps = []
    for path in root.iterdir():
        if path.name.isdigit():
            _refuse_link(path)
            if (path / "state").is_dir():
                steps.append(int(path.name))
    return sorted(steps)


def locate(path: str | Path) -> CheckpointRef:
    """Accepts a run dir, its `checkpoints` folder, or one step folder; picks the newest step."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"no such run dir or checkpoint: {path}")
    path = path.resolve()  # the path the user named may be a link (runs/latest); nothing inside it may
    if (path / "checkpoints").is_symlink() or (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name.isdigit() and (path / "state").is_dir():
        check_no_links(path)
        return CheckpointRef(path.parent, int(path.name))
    steps = saved_steps(path)
    if not steps:
        raise CheckpointError(f"{path} holds no checkpoint (expected a run dir, its checkpoints/ folder or a step folder)")
    check_no_links(path / str(steps[-1]))
    return CheckpointRef(path, steps[-1])


def _read_only_manager(ref: CheckpointRef) -> ocp.CheckpointManager:
    check_no_links(ref.root / str(ref.step))
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    return ocp.CheckpointManager(ref.root, options=options, item_names=ITEMS)


def _progress_where(ref: CheckpointRef) -> str:
    return f"the progress record of checkpoint {ref.root / str(ref.step)}"


def check_format(record, ref: CheckpointRef) -> None:
    """Refuses a checkpoint whose progress record says a newer program wrote it."""
    if not isinstance(record, dict):
        check_record(record, PROGRESS_FIELDS, _progress_where(ref), CheckpointError)  # the one-line "not an object"
    version = record.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"checkpoint {ref.root / str(ref.step)} has no valid format in its progress record; it is damaged")
    if version > FORMAT:
        raise CheckpointError(f"checkpoint {ref.root / str(ref.step)} has format {version}, newer than the "
                              f"{FORMAT} this version reads; upgrade pufferfish_jax to use it")


def check_progress(record, ref: CheckpointRef) -> dict:
    """The progress record a resumed run trusts, checked against FORMAT and PROGRESS_FIELDS."""
    check_format(record, ref)
    return check_record(record, PROGRESS_FIELDS, _progress_where(ref), CheckpointError)


def load_metadata(ref: CheckpointRef) -> tuple[ml_collections.ConfigDict, str]:
    """The saved config (validated against the schema) and the tokenizer JSON, from a checkpoint
    whose progress record says this version can read it."""
    with _read_only_manager(ref) as manager:
        try:
            got = manager.restore(ref.step, args=ocp.args.Composite(
                config=ocp.args.JsonRestore(), tokenizer=ocp.args.JsonRestore(), progress=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax raises many types for a damaged folder.
            raise CheckpointError(f"checkpoint {ref.root / str(ref.step)} is unreadable: {type(e).__name__}: {e}".splitlines()[0]) from None
    check_format(got.progress, ref)
    try:
        if not isinstance(got.config, dict):
            raise config_lib.ConfigError("it is not an object of config sections")
        cfg = config_lib.validate(config_lib.from_saved(got.config))
    except config_lib.ConfigError as e:
        raise CheckpointError(f"checkpoint {ref.root / str(ref.step)} has an invalid config: {e}") from None
    if not isinstance(got.tokenizer, dict):
        raise CheckpointError(f"checkpoint {ref.root / str(ref.step)} has a tokenizer that is not a JSON object")
    return cfg, json.dumps(got.tokenizer)


def load_progress(ref: CheckpointRef) -> dict:
    """The progress record a resumed run continues from, checked (check_progress)."""
    with _read_only_manager(ref) as manager:
        try:
            record = manager.restore(ref.step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())).progress
        except Exception as e:
            raise CheckpointError(f"checkpoint {ref.root / str(ref.step)} has no readable progress record: {type(e).__name__}") from None
    return dict(check_progress(record, ref))


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
