"""The application layer: everything a face (CLI, guided mode, config editor, REPL, pipelines) does.

prepare (data, then a plan), train (fresh or resumed), restore a checkpoint, evaluate text. Each
function returns values and reports progress only through a `log` callback; printing, argument
parsing and exit codes belong to the faces. Nothing here imports a face.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tokenizers import Tokenizer

from pufferfish_jax import config as config_lib
from pufferfish_jax import loop, rundir, sharding
from pufferfish_jax.budget.calibrate import CalibrationCache
from pufferfish_jax.budget.hardware import probe
from pufferfish_jax.budget.planner import Plan, apply_plan, budget_plan, fixed_steps_plan
from pufferfish_jax.data import background
from pufferfish_jax.data.cache import PreparedData
from pufferfish_jax.data.corpora import load_documents
from pufferfish_jax.data.files import Log, no_log
from pufferfish_jax.data.growing import read_schedule
from pufferfish_jax.data.pipeline import unigram_bpb
from pufferfish_jax.data.prepare import encode_documents, prepare_data
from pufferfish_jax.errors import ConfigError, DataError
from pufferfish_jax.export import hf_import
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.train import checkpoint
from pufferfish_jax.train.evaluate import evaluate
from pufferfish_jax.train.state import TrainState, abstract_state, make_optimizer
from pufferfish_jax.train.step import make_eval_step

# What a run writes into its run dir (and nothing else may be there for it to start afresh).
RUN_FILES = {"config.json", "plan.json", "stream.json", "outcome.json", "tokenizer.json", "metrics.jsonl", "checkpoints", "tensorboard"}
RUN_FOLDERS = {"checkpoints", "tensorboard"}
# Keys a resumed run may change: where and how often it writes, not what it trains.
# The mesh is free too: a checkpoint restores under any mesh.
RESUME_FREE_KEYS = {"train.run_dir", "train.resume", "train.checkpoint_every_s", "train.keep_checkpoints",
                    "train.log_every", "data.cache_dir", "mesh.data", "mesh.fsdp", "mesh.tensor",
                    "mesh.coordinator", "mesh.num_processes", "mesh.process_id"}


def start_time(started_at: float | None) -> float:
    """The earliest known start of this command: the budget counts from it. `just` exports
    PUFFERFISH_T0 before Python starts; `python -m` entry points pass their own first clock read."""
    try:
        from_env = float(os.environ["PUFFERFISH_T0"])
    except (KeyError, ValueError):
        from_env = None
    candidates = [t for t in (started_at, from_env) if t]
    return min(candidates) if candidates else time.time()


def start(cfg: ml_collections.ConfigDict) -> Mesh:
    """JAX's persistent compilation cache (a rerun of the same shapes skips XLA compilation), the
    other processes of a multi-host run (if this is one), and the device mesh."""
    use_compilation_cache(config_lib.cache_dir(cfg))
    sharding.init_distributed(cfg.mesh)
    return sharding.make_mesh(cfg.mesh)


def use_compilation_cache(cache_dir: Path) -> None:
    """The cache folder's `jax/`, unless JAX's own setting (JAX_COMPILATION_CACHE_DIR) names one:
    the user's choice wins, and the test suite shares one cache across all its processes that way."""
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ----------------------------------------------------------------------------- data and plan
# A budgeted run whose corpus would take longer than this share of the budget to tokenize stops
# within seconds with a one-line error (prepare_data's finish_by) instead of spending it.
PREP_SHARE = 0.5


def prepare(cfg: ml_collections.ConfigDict, user_keys: set[str], started_at: float, mesh: Mesh,
            plan: Plan | None = None, log: Log = no_log) -> tuple[PreparedData, Plan]:
    """Data, then a plan (unless one is given): the part of train and plan before any training.
    Every process plans; process 0's plan is the one all of them follow. Fills in
    model.vocab_size = 0 from the tokenizer; with train.init_from, first writes the imported
    model's architecture and tokenizer into cfg and its shape keys into user_keys (a fixed shape).
    A corpus still being tokenized is left paused by planning; the loop resumes it."""
    if cfg.train.init_from:
        hf_import.configure(cfg, user_keys, log=log)
    if not (cfg.budget.time and cfg.budget.planner == "measured" and "train.batch_size" not in user_keys):
        sharding.check_batch(cfg.train.batch_size, cfg.train.grad_accum, mesh)  # this batch is kept: fail now
    cache = config_lib.cache_dir(cfg)
    finish_by = started_at + PREP_SHARE * config_lib.parse_duration(cfg.budget.time) if cfg.budget.time else None
    streams = cfg.budget.time or cfg.data.stream_steps_per_shard  # a big corpus is tokenized while training
    prepare_fn = background.prepare_growing if streams else prepare_data
    data = prepare_fn(cfg.data, cache, log=log, finish_by=finish_by)
    log(f"data: {cfg.data.corpus}: {len(data.train_tokens):,} train tokens, {len(data.val_tokens):,} held-out "
        f"tokens, vocab {data.vocab_size:,} ({data.prep_seconds:.1f}s)")
    if len(data.val_tokens) < cfg.model.seq_len + 1:  # no eval window: every score would be noise or nan
        held_out = f"data.val_source={cfg.data.val_source}" if cfg.data.val_source else "the held-out split"
        raise DataError(f"{held_out} has {len(data.val_tokens):,} tokens, fewer than one eval window of "
                        f"{cfg.model.seq_len + 1}; give more held-out text or a shorter model.seq_len")
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.vocab_size
    elif cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{data.vocab_size}; set model.vocab_size=0 to use the tokenizer's size")
    if plan is None and cfg.budget.time:
        budget_s = config_lib.parse_duration(cfg.budget.time)
        background.pause(data)  # until the loop's first eval is done (planning times steps, loop.run compiles)
        plan = budget_plan(cfg, budget_s=budget_s, deadline=started_at + budget_s,
                           train_tokens=background.planned_train_tokens(data, started_at + budget_s),
                           val_tokens=len(data.val_tokens), cache=CalibrationCache(cache), user_keys=user_keys,
                           mesh=mesh, memory_limit=probe().memory_bytes, log=lambda s: log(f"planning: {s}"),
                           corpus=data.fingerprint)
    elif plan is None:
        plan = fixed_steps_plan(cfg, train_tokens=len(data.train_tokens), mesh=sharding.shape_of(mesh))
        _refuse_if_too_big(plan, probe().memory_bytes)
    plan = Plan(**sharding.agree_json(plan.to_dict()))
    return background.scheduled(data, cfg.data, step_s=plan.step_s, agree=sharding.agree_json), plan


def _refuse_if_too_big(plan: Plan, memory_limit: int) -> None:
    """A steps= run keeps the user's shape, so one that cannot fit is refused here, before anything
    is allocated (the budget planner only ever chooses shapes that fit)."""
    if plan.predicted_memory_bytes > memory_limit:
        m = plan.model
        raise ConfigError(f"{m['num_layers']} layers x d {m['d_model']} at batch {plan.batch_size} needs about "
                          f"{plan.predicted_memory_bytes / 2**30:,.1f} GiB per device to train, more than the "
                          f"{memory_limit / 2**30:,.1f} GiB there is; lower model.d_model, model.num_layers or "
                          "train.batch_size, or set model.remat=full")


# ----------------------------------------------------------------------------- training
@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    plan: Plan
    outcome: loop.Outcome
    wall_s: float  # every attempt of the run, counted from each attempt's start

    @property
    def interrupted(self) -> bool:
        return self.outcome.interrupted


def train(cfg: ml_collections.ConfigDict, user_keys: set[str], started_at: float, mesh: Mesh, *,
          plan: Plan | None = None, log: Log = no_log, on_plan: Callable[[Plan], None] = lambda plan: None,
          display_console=None) -> RunResult:
    """Trains into cfg.train.run_dir (or a new runs/<timestamp>), or resumes it when it has
    checkpoints. A given `plan` (a pipeline's plan stage made it) is used instead of planning; its
    budget counts from `started_at`. `on_plan` sees the plan (new or resumed) just before training
    starts, after every slow preparation; `display_console` gets the live dashboard."""
    if cfg.train.run_dir and checkpoint.saved_steps(Path(cfg.train.run_dir) / "checkpoints"):
        if cfg.train.resume == "never":
            raise ConfigError(f"run dir {cfg.train.run_dir} already has checkpoints; resume=auto continues it, "
                              "or choose another run_dir")
        return resume(cfg, user_keys, Path(cfg.train.run_dir), started_at, mesh, log=log, on_plan=on_plan,
                      display_console=display_console)
    data, plan = prepare(cfg, user_keys, started_at, mesh, plan, log=log)
    resolved = apply_plan(cfg, plan)
    initial = hf_import.initial_params(resolved) if resolved.train.init_from else None  # read before any write
    run_dir = _new_run_dir(resolved)
    if sharding.is_primary():
        (run_dir / "config.json").write_text(config_lib.to_json(resolved))
        (run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
        (run_dir / "tokenizer.json").write_text(data.tokenizer_json)
        if data.schedule is not None:  # the order's rule while the stream grows: a resume reads it back
            (run_dir / "stream.json").write_text(json.dumps(data.schedule.to_dict(), indent=2))
    on_plan(plan)
    log(f"run dir: {run_dir}")
    deadline = started_at + plan.budget_s if plan.mode == "budget" else None
    beside_encoder = _encoding(data)
    outcome = loop.run(resolved, plan, data, run_dir, mesh=mesh, deadline=deadline, started_at=started_at,
                       display_console=display_console, peak_flops=_peak_flops(resolved, data), initial_params=initial)
    _correct_calibration(resolved, plan, outcome, log, beside_encoder=beside_encoder)
    return _finish(run_dir, plan, outcome, wall_s=time.time() - started_at)


def resume(cfg: ml_collections.ConfigDict, user_keys: set[str], run_dir: Path, started_at: float, mesh: Mesh, *,
           log: Log = no_log, on_plan: Callable[[Plan], None] = lambda plan: None, display_console=None) -> RunResult:
    """Continues run_dir from its newest readable checkpoint (or train.resume=STEP) with the saved
    config and plan; a budgeted run gets what is left of its budget."""
    rundir.refuse_links(run_dir, RUN_FILES)
    saved = rundir.read_config(run_dir)
    before, asked = config_lib.flatten(saved), config_lib.flatten(cfg)
    for key in sorted(user_keys - RESUME_FREE_KEYS):
        if asked[key] != before[key]:
            raise ConfigError(f"run dir {run_dir} was trained with {key}={before[key]!r}, not {asked[key]!r}; "
                              "repeat the original value or choose another run_dir")
    for key in RESUME_FREE_KEYS:
        section, name = key.split(".")
        saved[section][name] = cfg[section][name]
    plan = rundir.read_plan(run_dir)
    if schedule := read_schedule(run_dir / "stream.json"):
        data = background.with_schedule(background.prepare_growing(saved.data, config_lib.cache_dir(saved), log=log,
                                                                   force=True), schedule)
    else:
        data = prepare_data(saved.data, config_lib.cache_dir(saved), log=log)
    spec = ModelSpec.from_config(saved.model, saved.moe)
    at_most = int(cfg.train.resume) if cfg.train.resume.isdigit() else None
    state, ref = checkpoint.restore_newest(run_dir / "checkpoints", abstract_state(spec, make_optimizer(saved.train), mesh),
                                           at_most=at_most, warn=log)
    record = checkpoint.load_progress(ref)
    if record["data_fingerprint"] != data.fingerprint:
        raise ConfigError(f"the corpus or tokenizer of {run_dir} changed since it was trained (data "
                          f"{record['data_fingerprint']} -> {data.fingerprint}); restore the data or choose another run_dir")
    deadline = started_at + plan.budget_s - record["elapsed_s"] if plan.mode == "budget" else None
    left = f", {deadline - time.time():.0f}s of the budget left" if deadline else ""
    on_plan(plan)
    log(f"resuming {run_dir} from step {ref.step}{left}")
    beside_encoder = _encoding(data)
    outcome = loop.run(saved, plan, data, run_dir, mesh=mesh, deadline=deadline, started_at=started_at,
                       display_console=display_console, peak_flops=_peak_flops(saved, data), resumed=(state, record))
    _correct_calibration(saved, plan, outcome, log, beside_encoder=beside_encoder)
    return _finish(run_dir, plan, outcome, wall_s=record["elapsed_s"] + time.time() - started_at)


def _encoding(data: PreparedData) -> bool:
    """Whether the corpus is still being tokenized as training starts (on the same cores)."""
    return data.growing is not None and not data.growing.done


STALE_STEP_RATIO = 1.25  # a run whose steps took this much longer or shorter than planned corrects the cache


def _correct_calibration(cfg: ml_collections.ConfigDict, plan: Plan, outcome: loop.Outcome, log: Log, *,
                         beside_encoder: bool) -> None:
    """When the steps ran much slower or faster than the planner's measurement (another load on the
    machine, a calibration cache carried over from another one), the loop has already re-fitted
    the step count to the clock; this scales every cached step time of the machine by the ratio
    seen, so the next plan starts from it and still ranks the shapes as they were measured.

    Not after a run that trained `beside_encoder`, its own corpus being tokenized on the same cores:
    that slowed its steps 2-3x here, a cost of that run alone. Scaling by it made the next plans
    expect steps 2.9x too slow, and the next stream schedule, built from that step time and the
    encoder's rate measured alone, asked for shards faster than the encoder wrote them (4.8 % of a
    10-minute run waiting for data)."""
    if plan.mode != "budget" or beside_encoder or not plan.step_s or not math.isfinite(outcome.step_s):
        return
    ratio = outcome.step_s / plan.step_s
    if 1 / STALE_STEP_RATIO <= ratio <= STALE_STEP_RATIO:
        return
    log(f"steps took {outcome.step_s * 1000:.0f} ms, {ratio:.2f}x the planned {plan.step_s * 1000:.0f} ms; the step "
        f"count was re-fitted to the clock, and every step time cached for this machine is now scaled by {ratio:.2f}")
    if sharding.is_primary():
        CalibrationCache(config_lib.cache_dir(cfg)).scale_step_times(ratio)


def _peak_flops(cfg: ml_collections.ConfigDict, data: PreparedData) -> tuple[float, str]:
    """The MFU denominator for the dashboard and what it is: the machine's best peak over dtypes,
    whatever dtype the run computes in. A probe it takes pauses the corpus encoder: one that
    shares the cores reads low."""
    return CalibrationCache(config_lib.cache_dir(cfg)).peak_flops(quiet=lambda: background.paused(data))


def _finish(run_dir: Path, plan: Plan, outcome: loop.Outcome, *, wall_s: float) -> RunResult:
    """Writes outcome.json (process 0) once the run has finished; an interrupted run has none."""
    if not outcome.interrupted and sharding.is_primary():
        record = {"wall_s": wall_s, "budget_s": plan.budget_s, "steps": outcome.steps, "tokens": outcome.tokens,
                  "val_loss": outcome.final.loss, "val_bpb": outcome.final.bpb, "val_bpb_se": outcome.final.bpb_se,
                  "unigram_bpb": outcome.unigram_bpb}
        (run_dir / "outcome.json").write_text(json.dumps(record, indent=2))
    return RunResult(run_dir, plan, outcome, wall_s)


def _new_run_dir(cfg: ml_collections.ConfigDict) -> Path:
    """Process 0 names (from its clock) and prepares the run dir; the others wait for it."""
    if cfg.train.run_dir:
        run_dir = Path(cfg.train.run_dir)
    else:
        stamp = int(sharding.agree([int(time.time())])[0])
        run_dir = Path("runs") / datetime.datetime.fromtimestamp(stamp).strftime("%Y%m%d-%H%M%S")
    ready = False
    try:
        if sharding.is_primary():
            _prepare_run_dir(run_dir, link_latest=not cfg.train.run_dir)
        ready = True
    finally:  # the others learn whether process 0 could prepare it, and stop with it if not
        if not sharding.agree([ready])[0] and ready:
            raise ConfigError(f"process 0 could not prepare the run dir {run_dir}; see its error")
    return run_dir


def _prepare_run_dir(run_dir: Path, *, link_latest: bool) -> None:
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= RUN_FILES:
        # An attempt killed before its first checkpoint: nothing in it can be resumed, so start over.
        for name in RUN_FOLDERS:
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in RUN_FILES - RUN_FOLDERS:
            (run_dir / name).unlink(missing_ok=True)
    if run_dir.is_file() or (run_dir.exists() and any(run_dir.iterdir())):
        raise ConfigError(f"run dir {run_dir} is not an empty folder (and has no checkpoint to resume); choose another run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".write_test").touch()
        (run_dir / ".write_test").unlink()
    except OSError as e:
        raise ConfigError(f"cannot write run dir {run_dir} ({e.strerror}); choose another run_dir") from None
    if link_latest:
        latest = run_dir.parent / "latest"
        if latest.is_symlink() or not latest.exists():
            latest.unlink(missing_ok=True)
            latest.symlink_to(run_dir.name)


# ----------------------------------------------------------------------------- checkpoints
@dataclass(frozen=True)
class Restored:
    """A checkpoint as a model: its shapes come from the saved config, never from the user."""

    spec: ModelSpec
    state: TrainState
    tokenizer: Tokenizer
    cfg: ml_collections.ConfigDict
    ref: checkpoint.CheckpointRef


def restore(path: str | Path, cache_dir: Path | None = None) -> Restored:
    """A run dir, its checkpoints/ folder or one step folder, restored on one device. Caches (built-in
    corpora, tokens, compiled code) go to `cache_dir`: the current command's (its config's
    data.cache_dir, else $PUFFERFISH_CACHE, else the default), never the one the checkpoint saved,
    which would let a checkpoint choose where this machine reads and writes."""
    ref = checkpoint.locate(path)
    cfg, tokenizer_json = checkpoint.load_metadata(ref)
    cfg.data.cache_dir = str(cache_dir) if cache_dir else ""
    use_compilation_cache(config_lib.cache_dir(cfg))
    spec = ModelSpec.from_config(cfg.model, cfg.moe)
    state = checkpoint.restore_state(ref, abstract_state(spec, make_optimizer(cfg.train)))
    return Restored(spec, state, Tokenizer.from_str(tokenizer_json), cfg, ref)


def params_digest(*trees) -> str:
    """SHA-256 over every array's path, dtype, shape and bytes, tree by tree in tree order (the
    params, then a MoE model's routing biases: both decide what the model computes)."""
    digest = hashlib.sha256()
    for tree in trees:
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            array = np.asarray(leaf)
            digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class TextEval:
    """A model scored on one text.

    unigram_bpb is the one baseline everywhere (training, `eval`, the pipeline): the bits per byte
    on this text of a unigram model fitted on the checkpoint's *training split* with the same
    tokenizer (`data.pipeline.unigram_bpb`). A model that has learned anything beyond token
    frequencies is below it. val_bpb_se is the standard error of val_bpb over the text's eval
    windows (`train.evaluate.window_loss`): differences much smaller than it are noise.
    """

    source: str
    tokens: int
    bytes: int
    val_loss: float
    val_bpb: float
    val_bpb_se: float
    unigram_bpb: float

    def to_dict(self) -> dict:
        return asdict(self)


def training_data(restored: Restored, log: Log = no_log) -> PreparedData:
    """The checkpoint's own training data (from the token cache when this machine has it)."""
    return prepare_data(restored.cfg.data, config_lib.cache_dir(restored.cfg), log=log)


def evaluate_text(restored: Restored, source: str, *, train_tokens: np.ndarray, batch_size: int = 8,
                  max_chars: int = 0, val: PreparedData | None = None, log: Log = no_log) -> TextEval:
    """Loss and bits per byte of a restored model on `source` (a file, folder, glob or built-in
    corpus), or on its own held-out split when `val` is given."""
    if val is not None:
        stream, num_bytes = val.val_tokens, val.val_bytes
    else:
        docs = load_documents(source, config_lib.cache_dir(restored.cfg), max_chars=max_chars, log=log)
        stream, num_bytes = encode_documents(restored.tokenizer, docs)
    mesh = sharding.single_device_mesh()  # where restore put the state
    spec = restored.spec
    result = evaluate(make_eval_step(spec, mesh), restored.state.variables, stream, num_bytes, seq_len=spec.seq_len,
                      batch_size=batch_size, mesh=mesh)
    return TextEval(source, result.tokens, int(num_bytes), result.loss, result.bpb, result.bpb_se,
                    unigram_bpb(train_tokens, stream, num_bytes, spec.vocab_size))
