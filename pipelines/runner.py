"""The stage runner: run what is missing or out of date, skip what is finished, resume what was cut.

Each stage names the config keys it reads and the stages whose outputs it reads. Its fingerprint
hashes those keys' values, the fingerprints of its input stages and of any outside files it reads,
so a change reaches exactly the stages that depend on it. `pipeline.json` in the run dir records,
per stage, the fingerprint it last ran with and whether it finished:

- finished with the current fingerprint and its outputs present: skipped;
- started with the current fingerprint but not finished (a crash, Ctrl-C): run again over its
  partial outputs, which lets the train stage resume from its checkpoints;
- anything else: its old outputs are removed and it runs afresh.

All fingerprints are computed before any stage runs, and every stage gets its own copy of the
config, so nothing a stage resolves (the planner's choices) can make a later run look different.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ml_collections

from pufferfish_jax import config as config_lib
from pufferfish_jax.data.files import atomic_write

MANIFEST = "pipeline.json"
_VERSION = 1  # bump when a stage's outputs change meaning, so old run dirs rerun
# Keys that change where and how often a run writes, never what it computes.
UNTRACKED_KEYS = frozenset({"train.run_dir", "train.resume", "train.checkpoint_every_s", "train.keep_checkpoints",
                            "train.log_every", "data.cache_dir", "pipeline.stages", "pipeline.run_dir"})


@dataclass
class Context:
    """What a stage gets: its own copy of the config, the run dir and the budget clock."""

    cfg: ml_collections.ConfigDict  # validated; train.run_dir = <run_dir>/train
    user_keys: set[str]  # keys the config file or command line set (the planner keeps those)
    run_dir: Path
    started_at: float  # the start of this command: a budget counts from here
    ran: list[str] = field(default_factory=list)  # stages run so far by this command


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], dict]  # writes the outputs; returns a small summary for the manifest
    outputs: tuple[str, ...]  # files or folders in the run dir
    inputs: tuple[str, ...] = ()  # stages whose outputs it reads
    keys: tuple[str, ...] = ()  # config keys or whole sections ("model") it reads
    sources: Callable[[ml_collections.ConfigDict], list] = lambda cfg: []  # identities of outside files it reads


class StageFailed(Exception):
    """A stage raised `error`; the stage stays unfinished in the manifest and reruns next time."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"{stage} stage: {error}")
        self.stage, self.error = stage, error


def _tracked(key: str, selectors: Sequence[str]) -> bool:
    return key not in UNTRACKED_KEYS and any(key == s or key.startswith(s + ".") for s in selectors)


def fingerprint(stage: Stage, cfg: ml_collections.ConfigDict, user_keys: set[str], inputs: dict[str, str]) -> str:
    values = {k: v for k, v in config_lib.flatten(cfg).items() if _tracked(k, stage.keys)}
    pinned = sorted(k for k in user_keys if k in values)  # a key the user set is kept by the planner
    payload = [_VERSION, stage.name, values, pinned, stage.sources(cfg), [inputs[n] for n in stage.inputs]]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def needed(stages: Sequence[Stage], wanted: Sequence[str]) -> list[Stage]:
    """The wanted stages and every stage they depend on, in pipeline order."""
    by_name = {s.name: s for s in stages}
    keep: set[str] = set()
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(by_name[name].inputs)
    return [s for s in stages if s.name in keep]


def load_manifest(run_dir: Path) -> dict:
    path = run_dir / MANIFEST
    if not path.is_file():
        if run_dir.is_dir() and any(run_dir.iterdir()):  # never remove what a pipeline did not write
            raise config_lib.ConfigError(f"{run_dir} is not empty and holds no {MANIFEST}, so it is not a pipeline's "
                                         "run dir; choose another pipeline.run_dir")
        return {"version": _VERSION, "stages": {}}
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("stages"), dict):
            raise ValueError
        return manifest
    except ValueError:
        raise config_lib.ConfigError(f"{path} is damaged; delete it (every stage then reruns) or choose "
                                     "another pipeline.run_dir") from None


def _save_manifest(run_dir: Path, manifest: dict) -> None:
    with atomic_write(run_dir / MANIFEST) as f:
        f.write(json.dumps(manifest, indent=2).encode())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def fingerprints(stages: Sequence[Stage], cfg: ml_collections.ConfigDict, user_keys: set[str]) -> dict[str, str]:
    """Every stage's fingerprint, inputs first (`stages` is in pipeline order)."""
    prints: dict[str, str] = {}
    for stage in stages:
        prints[stage.name] = fingerprint(stage, cfg, user_keys, prints)
    return prints


def run_stages(stages: Sequence[Stage], ctx: Context, wanted: Sequence[str], *,
               log: Callable[[str], None] = print) -> dict[str, str]:
    """Runs the wanted stages (and what they need) in order; returns {stage: 'ran' | 'skipped'}."""
    order = needed(stages, wanted)
    prints = fingerprints(order, ctx.cfg, ctx.user_keys)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(ctx.run_dir)
    actions: dict[str, str] = {}
    for stage in order:
        entry = manifest["stages"].get(stage.name, {})
        same = entry.get("fingerprint") == prints[stage.name]
        if same and entry.get("status") == "done" and all((ctx.run_dir / o).exists() for o in stage.outputs):
            actions[stage.name] = "skipped"
            log(f"{stage.name}: finished earlier ({entry.get('seconds', 0):.1f}s), skipped")
            continue
        if same:
            log(f"{stage.name}: resuming the unfinished stage")
        else:
            for output in stage.outputs:
                _remove(ctx.run_dir / output)
            log(f"{stage.name}: running" + (" (its inputs or settings changed)" if entry else ""))
        manifest["stages"][stage.name] = {"fingerprint": prints[stage.name], "status": "running",
                                          "started": time.time()}
        _save_manifest(ctx.run_dir, manifest)
        started = time.perf_counter()
        stage_ctx = Context(ml_collections.ConfigDict(ctx.cfg.to_dict()), set(ctx.user_keys), ctx.run_dir,
                            ctx.started_at, ctx.ran)
        try:
            summary = stage.run(stage_ctx)
        except Exception as e:
            raise StageFailed(stage.name, e) from e
        seconds = time.perf_counter() - started
        manifest["stages"][stage.name].update(status="done", seconds=seconds, finished=time.time(), summary=summary)
        _save_manifest(ctx.run_dir, manifest)
        ctx.ran.append(stage.name)
        actions[stage.name] = "ran"
        log(f"{stage.name}: done in {seconds:.1f}s")
    return actions
