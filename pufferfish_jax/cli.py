"""Command line: `python -m pufferfish_jax {train,plan,generate,eval,inspect,hardware,configure} ...`,
or no command on a terminal for the guided mode.

Commands are thin: they parse, call the library, and print. Every user mistake surfaces as one
line on stderr and a non-zero exit; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pufferfish_jax.prompting import is_interactive

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def user_errors() -> tuple[type[BaseException], ...]:
    from pufferfish_jax.config import ConfigError
    from pufferfish_jax.data.corpora import DataError
    from pufferfish_jax.model.attention import AttentionBackendError
    from pufferfish_jax.train.checkpoint import CheckpointError
    from pufferfish_jax.train.loop import TrainingDiverged

    return ConfigError, DataError, CheckpointError, TrainingDiverged, AttentionBackendError


def start_time(started_at: float | None) -> float:
    """The earliest known start of this command: `just` exports PUFFERFISH_T0."""
    candidates = [t for t in (started_at, _float_env("PUFFERFISH_T0")) if t]
    return min(candidates) if candidates else time.time()


def _float_env(name: str) -> float | None:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return None


def setup_jax(cache_dir: Path) -> None:
    """Persistent compilation cache: a rerun of the same shapes skips XLA compilation."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache_dir / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def start_mesh(cfg):
    """Joins the other processes of a multi-host run (if this is one) and builds the device mesh;
    every process but 0 stays quiet."""
    from pufferfish_jax import sharding

    sharding.init_distributed(cfg.mesh)
    if not sharding.is_primary():
        console.quiet = True
    return sharding.make_mesh(cfg.mesh)


def build_config(items: list[str]):
    """config=FILE first, then key=value overrides in order; returns (cfg, keys the user set)."""
    from pufferfish_jax import config as config_lib
    from pufferfish_jax.configure import changed_keys

    files = [i.split("=", 1)[1] for i in items if i.startswith("config=")]
    overrides = [i for i in items if not i.startswith("config=")]
    cfg = config_lib.load_file(files[-1]) if files else config_lib.defaults()
    user_keys = set(changed_keys(cfg))  # what a config file sets, the planner keeps
    cfg = config_lib.apply_overrides(cfg, overrides)
    user_keys |= {config_lib.ALIASES.get(k, k) for k in (o.split("=", 1)[0].strip() for o in overrides)}
    if cfg.budget.time and cfg.train.steps:
        raise config_lib.ConfigError("give either a budget (budget=5m) or a number of steps (steps=N), not both")
    return config_lib.validate(cfg), user_keys


def prepare(cfg, user_keys: set[str], started_at: float, mesh, plan=None):
    """Data, then a plan (unless one is given): the part of train and plan before any training.
    Every process plans; process 0's plan is the one all of them follow."""
    from pufferfish_jax import config as config_lib
    from pufferfish_jax import sharding
    from pufferfish_jax.budget.calibrate import CalibrationCache
    from pufferfish_jax.budget.hardware import probe
    from pufferfish_jax.budget.planner import Plan, budget_plan, fixed_steps_plan
    from pufferfish_jax.data.pipeline import prepare_data

    if not (cfg.budget.time and cfg.budget.planner == "measured" and "train.batch_size" not in user_keys):
        sharding.check_batch(cfg.train.batch_size, cfg.train.grad_accum, mesh)  # this batch is kept: fail now
    cache = config_lib.cache_dir(cfg)
    setup_jax(cache)
    with console.status("preparing data") as status:
        data = prepare_data(cfg.data, cache, log=lambda s: status.update(s))
    console.print(f"data: {cfg.data.corpus}: {len(data.train_tokens):,} train tokens, {len(data.val_tokens):,} "
                  f"held-out tokens, vocab {data.vocab_size:,} ({data.prep_seconds:.1f}s)")
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.vocab_size
    elif cfg.model.vocab_size < data.vocab_size:
        raise config_lib.ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                                     f"{data.vocab_size}; set model.vocab_size=0 to use the tokenizer's size")
    if plan is None and cfg.budget.time:
        budget_s = config_lib.parse_duration(cfg.budget.time)
        with console.status("planning: timing candidate models on this machine") as status:
            plan = budget_plan(cfg, budget_s=budget_s, deadline=started_at + budget_s,
                               train_tokens=len(data.train_tokens), val_tokens=len(data.val_tokens),
                               cache=CalibrationCache(cache), user_keys=user_keys, mesh=mesh,
                               memory_limit=probe(measure=False).memory_bytes, log=lambda s: status.update(f"planning: {s}"))
    elif plan is None:
        plan = fixed_steps_plan(cfg, train_tokens=len(data.train_tokens), mesh=sharding.shape_of(mesh))
    return data, Plan(**sharding.agree_json(plan.to_dict()))


def _plan_table(plan) -> Table:
    table = Table(title="plan", show_header=False, title_justify="left")
    m = plan.model
    rows = [
        ("model", f"{m['num_layers']} layers, d {m['d_model']}, {m['num_heads']} heads ({m['num_kv_heads']} kv), "
                  f"vocab {m['vocab_size']}, {m['dtype']}, remat {m['remat']}"),
        ("params", f"{plan.params:,} ({plan.non_embedding_params:,} non-embedding"
                   + (f", {plan.active_params:,} active per token)" if 0 < plan.active_params < plan.params else ")")),
        ("batch", f"{plan.batch_size} x {plan.seq_len} tokens"),
        ("mesh", "data {} x fsdp {} x tensor {}".format(*plan.mesh)),
        ("steps", f"{plan.steps:,}" + (" (re-fitted to the clock as the run goes)" if plan.mode == "budget" else "")),
        ("tokens", f"{plan.tokens:,} ({plan.epochs:.2f} epochs of "
                   f"{'all' if plan.subset_fraction >= 1 else f'a {plan.subset_fraction:.0%} subset of'} the training text, "
                   f"{plan.tokens_per_param:.1f} per non-embedding param)"),
        ("memory", f"{plan.predicted_memory_bytes / 2**20:,.0f} MiB predicted peak per device"),
    ]
    if plan.mode == "budget":
        rows += [
            ("step time", f"{plan.step_s * 1000:.0f} ms measured ({plan.batch_size * plan.seq_len / plan.step_s:,.0f} tokens/s)"),
            ("time", f"budget {plan.budget_s:.0f}s = {plan.planning_s:.0f}s data+planning + {plan.compile_s:.0f}s compile "
                     f"+ {plan.train_s:.0f}s training + {plan.reserve_s:.0f}s evals, save and margin"),
            ("planner", plan.planner + (f" (chose among {len(plan.candidates)} shapes by predicted loss)"
                                        if plan.candidates else "")),
        ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _new_run_dir(cfg) -> Path:
    """Process 0 names (from its clock) and prepares the run dir; the others wait for it."""
    from pufferfish_jax import sharding
    from pufferfish_jax.config import ConfigError

    if cfg.train.run_dir:
        run_dir = Path(cfg.train.run_dir)
    else:
        stamp = int(sharding.agree([int(time.time())])[0])
        run_dir = Path("runs") / datetime.datetime.fromtimestamp(stamp).strftime("%Y%m%d-%H%M%S")
    ready = False
    try:
        if sharding.is_primary():
            _prepare_run_dir(cfg, run_dir)
        ready = True
    finally:  # the others learn whether process 0 could prepare it, and stop with it if not
        if not sharding.agree([ready])[0] and ready:
            raise ConfigError(f"process 0 could not prepare the run dir {run_dir}; see its error")
    return run_dir


def _prepare_run_dir(cfg, run_dir: Path) -> None:
    from pufferfish_jax.config import ConfigError

    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= RUN_FILES:
        # An attempt killed before its first checkpoint: nothing in it can be resumed, so start over.
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        for name in RUN_FILES - {"checkpoints"}:
            (run_dir / name).unlink(missing_ok=True)
    if run_dir.is_file() or (run_dir.exists() and any(run_dir.iterdir())):
        raise ConfigError(f"run dir {run_dir} is not an empty folder (and has no checkpoint to resume); choose another run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".write_test").touch()
        (run_dir / ".write_test").unlink()
    except OSError as e:
        raise ConfigError(f"cannot write run dir {run_dir} ({e.strerror}); choose another run_dir") from None
    if not cfg.train.run_dir:
        latest = run_dir.parent / "latest"
        if latest.is_symlink() or not latest.exists():
            latest.unlink(missing_ok=True)
            latest.symlink_to(run_dir.name)


# What a run writes into its run dir (and nothing else may be there for it to start afresh).
RUN_FILES = {"config.json", "plan.json", "tokenizer.json", "metrics.jsonl", "checkpoints"}
# Keys a resumed run may change: where and how often it writes, not what it trains.
# The mesh is free too: a checkpoint restores under any mesh.
RESUME_FREE_KEYS = {"train.run_dir", "train.resume", "train.checkpoint_every_s", "train.keep_checkpoints",
                    "train.log_every", "data.cache_dir", "mesh.data", "mesh.fsdp", "mesh.tensor",
                    "mesh.coordinator", "mesh.num_processes", "mesh.process_id"}


def cmd_train(items: list[str], started_at: float) -> int:
    cfg, user_keys = build_config(items)
    return train(cfg, user_keys, started_at)


def train(cfg, user_keys: set[str], started_at: float, *, plan=None) -> int:
    """Trains into cfg.train.run_dir, or resumes it when it has checkpoints; returns the exit code
    (130: interrupted, checkpoint saved). A given `plan` (a pipeline's plan stage made it) is used
    instead of planning; its budget counts from `started_at`."""
    from pufferfish_jax import sharding
    from pufferfish_jax.budget.planner import apply_plan
    from pufferfish_jax.config import ConfigError, to_json
    from pufferfish_jax.train import checkpoint
    from pufferfish_jax.train.loop import run

    mesh = start_mesh(cfg)
    if cfg.train.run_dir and checkpoint.saved_steps(Path(cfg.train.run_dir) / "checkpoints"):
        if cfg.train.resume == "never":
            raise ConfigError(f"run dir {cfg.train.run_dir} already has checkpoints; resume=auto continues it, "
                              "or choose another run_dir")
        return _resume(cfg, user_keys, Path(cfg.train.run_dir), started_at, mesh)
    data, plan = prepare(cfg, user_keys, started_at, mesh, plan)
    resolved = apply_plan(cfg, plan)
    run_dir = _new_run_dir(resolved)
    if sharding.is_primary():
        (run_dir / "config.json").write_text(to_json(resolved))
        (run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
        (run_dir / "tokenizer.json").write_text(data.tokenizer_json)
    console.print(_plan_table(plan))
    console.print(f"run dir: {run_dir}")
    deadline = started_at + plan.budget_s if plan.mode == "budget" else None
    outcome = run(resolved, plan, data, run_dir, mesh=mesh, deadline=deadline, started_at=started_at,
                  display_console=console)
    return _finish(run_dir, plan, outcome, wall_s=time.time() - started_at)


def _resume(cfg, user_keys: set[str], run_dir: Path, started_at: float, mesh) -> int:
    """Continues run_dir from its newest readable checkpoint (or train.resume=STEP) with the saved
    config and plan; a budgeted run gets what is left of its budget."""
    from pufferfish_jax import config as config_lib
    from pufferfish_jax.budget.planner import Plan
    from pufferfish_jax.data.pipeline import prepare_data
    from pufferfish_jax.model.transformer import ModelSpec
    from pufferfish_jax.train import checkpoint
    from pufferfish_jax.train.loop import run
    from pufferfish_jax.train.state import abstract_state, make_optimizer

    saved = config_lib.load_file(run_dir / "config.json")
    before, asked = config_lib.flatten(saved), config_lib.flatten(cfg)
    for key in sorted(user_keys - RESUME_FREE_KEYS):
        if asked[key] != before[key]:
            raise config_lib.ConfigError(f"run dir {run_dir} was trained with {key}={before[key]!r}, not {asked[key]!r}; "
                                         "repeat the original value or choose another run_dir")
    for key in RESUME_FREE_KEYS:
        section, name = key.split(".")
        saved[section][name] = cfg[section][name]
    plan_record = json.loads((run_dir / "plan.json").read_text())
    plan = Plan(**{k: v for k, v in plan_record.items() if k != "outcome"})
    cache = config_lib.cache_dir(saved)
    setup_jax(cache)
    with console.status("preparing data") as status:
        data = prepare_data(saved.data, cache, log=lambda s: status.update(s))
    spec = ModelSpec.from_config(saved.model, saved.moe)
    at_most = int(cfg.train.resume) if cfg.train.resume.isdigit() else None
    state, ref = checkpoint.restore_newest(run_dir / "checkpoints", abstract_state(spec, make_optimizer(saved.train), mesh),
                                           at_most=at_most, warn=err_console.print)
    record = checkpoint.load_progress(ref)
    if record["data_fingerprint"] != data.fingerprint:
        raise config_lib.ConfigError(f"the corpus or tokenizer of {run_dir} changed since it was trained (data "
                                     f"{record['data_fingerprint']} -> {data.fingerprint}); restore the data or choose another run_dir")
    deadline = started_at + plan.budget_s - record["elapsed_s"] if plan.mode == "budget" else None
    left = f", {deadline - time.time():.0f}s of the budget left" if deadline else ""
    console.print(f"resuming {run_dir} from step {ref.step}{left}")
    outcome = run(saved, plan, data, run_dir, mesh=mesh, deadline=deadline, started_at=started_at,
                  display_console=console, resumed=(state, record))
    return _finish(run_dir, plan, outcome, wall_s=record["elapsed_s"] + time.time() - started_at)


def _finish(run_dir: Path, plan, outcome, *, wall_s: float) -> int:
    """Records the outcome in plan.json (process 0) and prints it; wall_s counts every attempt of the run."""
    from pufferfish_jax import sharding

    if outcome.interrupted:
        console.print(f"stopped at step {outcome.steps}; checkpoint saved. Resume with the same command "
                      f"(run_dir={run_dir}).")
        return 130
    record = plan.to_dict() | {"outcome": {"wall_s": wall_s, "steps": outcome.steps, "tokens": outcome.tokens,
                                           "val_loss": outcome.final.loss, "val_bpb": outcome.final.bpb,
                                           "unigram_bpb": outcome.unigram_bpb}}
    if sharding.is_primary():
        (run_dir / "plan.json").write_text(json.dumps(record, indent=2))
    gain = 1 - outcome.final.bpb / outcome.unigram_bpb
    console.print(f"final: val loss {outcome.final.loss:.4f} nats/token, val bpb {outcome.final.bpb:.4f} "
                  f"(unigram bpb {outcome.unigram_bpb:.4f}, {gain:.0%} below it) after {outcome.steps} steps, "
                  f"{wall_s:.1f}s" + (f" of {plan.budget_s:.0f}s budget" if plan.budget_s else ""))
    return 0


def cmd_plan(items: list[str], started_at: float) -> int:
    cfg, user_keys = build_config(items)
    if not cfg.budget.time:
        from pufferfish_jax.config import ConfigError

        raise ConfigError("plan needs a budget, e.g. budget=1h")
    _, plan = prepare(cfg, user_keys, started_at, start_mesh(cfg))
    console.print(_plan_table(plan))
    return 0


def _show_plan(cfg) -> None:
    """Prints what `just plan` would for this config (the config editor's and guided mode's review);
    any user error comes back as a ConfigError, so the caller can show it and carry on."""
    import ml_collections

    from pufferfish_jax.config import ConfigError
    from pufferfish_jax.configure import changed_keys

    try:
        cfg = ml_collections.ConfigDict(cfg.to_dict())
        _, plan = prepare(cfg, set(changed_keys(cfg)), time.time(), start_mesh(cfg))
    except user_errors() as e:
        raise ConfigError(str(e)) from None
    console.print(_plan_table(plan))


def cmd_configure(argv: list[str]) -> int:
    """`configure [FILE] [key=value ...]`: the table editor, starting from FILE (or the defaults)."""
    from pufferfish_jax import config as config_lib
    from pufferfish_jax.configure import check, commands, edit

    if any(a in ("-h", "--help") for a in argv):
        console.print("usage: python -m pufferfish_jax configure [FILE.py|FILE.json] [key=value ...]\n"
                      "A table of every config key, edited by typing at the prompt:\n" + commands(guided=False),
                      markup=False)
        return 0
    files = [a.removeprefix("config=") for a in argv if "=" not in a or a.startswith("config=")]
    if len(files) > 1:
        raise config_lib.ConfigError(f"configure takes one config file, not {len(files)} ({', '.join(files)})")
    cfg = config_lib.load_file(files[0]) if files else config_lib.defaults()
    cfg = check(config_lib.apply_overrides(cfg, [a for a in argv if "=" in a and not a.startswith("config=")]))
    edit(cfg, plan=_show_plan, source=Path(files[0]) if files else None, console=console)
    return 0


def _guided() -> int:
    """`python -m pufferfish_jax` with no arguments on a terminal."""
    from pufferfish_jax.configure import overrides
    from pufferfish_jax.guided import run_guided

    def train(cfg) -> tuple[int, Path]:
        code = cmd_train(overrides(cfg), time.time())  # the budget starts when the user says train
        return code, Path(cfg.train.run_dir) if cfg.train.run_dir else Path("runs/latest").resolve()

    return run_guided(plan=_show_plan, train=train, generate=lambda run_dir: cmd_generate([str(run_dir)]),
                      console=console)


def cmd_hardware(argv: list[str]) -> int:
    from pufferfish_jax.budget.hardware import probe

    hw = probe()
    table = Table(title="hardware", show_header=False, title_justify="left")
    table.add_row("platform", f"{hw.platform} ({hw.device_kind}) x {hw.device_count}")
    table.add_row("memory", f"{hw.memory_bytes / 2**30:.1f} GiB per device" + (" (host RAM)" if hw.platform == "cpu" else ""))
    table.add_row("host cores", str(hw.host_cores))
    for dtype, peak in (("bfloat16", hw.peak_flops_bf16), ("float32", hw.peak_flops_fp32)):
        measured = hw.measured_flops_bf16 if dtype == "bfloat16" else hw.measured_flops_fp32
        table.add_row(f"{dtype} matmul", f"{measured / 1e9:,.0f} GFLOP/s measured"
                      + (f", {peak / 1e12:,.0f} TFLOP/s peak (data sheet)" if peak else ", no data-sheet peak: MFU uses the measured rate"))
    console.print(table)
    return 0


def restore(path: str):
    """(spec, state, tokenizer, cfg, ref) from a run dir or checkpoint, shapes from the saved config."""
    from tokenizers import Tokenizer

    from pufferfish_jax.model.transformer import ModelSpec
    from pufferfish_jax.train import checkpoint
    from pufferfish_jax.train.state import abstract_state, make_optimizer

    ref = checkpoint.locate(path)
    cfg, tokenizer_json = checkpoint.load_metadata(ref)
    spec = ModelSpec.from_config(cfg.model, cfg.moe)
    state = checkpoint.restore_state(ref, abstract_state(spec, make_optimizer(cfg.train)))
    return spec, state, Tokenizer.from_str(tokenizer_json), cfg, ref


def cmd_generate(argv: list[str]) -> int:
    from pufferfish_jax.repl import Sampling, check_sampling, run_repl, write_continuation

    parser = argparse.ArgumentParser(prog="tools/generate.sh", description="Write text with a trained checkpoint.")
    parser.add_argument("path", help="run dir, its checkpoints/ folder, or one checkpoint step folder")
    parser.add_argument("prompt", nargs="?", help="text to continue; omit for the interactive REPL (/help inside)")
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"default {Sampling.max_new_tokens}, or half the model's context if that is shorter")
    parser.add_argument("--min-new-tokens", type=int, default=Sampling.min_new_tokens,
                        help="the end-of-text token is not sampled before this many tokens")
    parser.add_argument("--temperature", type=float, default=Sampling.temperature)
    parser.add_argument("--top-k", type=int, default=Sampling.top_k)
    parser.add_argument("--top-p", type=float, default=Sampling.top_p)
    parser.add_argument("--repetition-penalty", type=float, default=Sampling.repetition_penalty,
                        help="> 1 makes tokens already in the prompt or output less likely (1.1-1.3 is typical); 1 = off")
    parser.add_argument("--seed", type=int, default=Sampling.seed)
    args = parser.parse_args(argv)
    spec, state, tokenizer, _, _ = restore(args.path)
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else min(Sampling.max_new_tokens, spec.seq_len // 2)
    sampling = check_sampling(Sampling(max_new_tokens=max_new_tokens, min_new_tokens=args.min_new_tokens,
                                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                       repetition_penalty=args.repetition_penalty, seed=args.seed), spec.seq_len)
    if args.prompt is not None:
        write_continuation(spec, state.params, tokenizer, args.prompt, sampling, moe_state=state.moe_state,
                           terminal=sys.stdout.isatty())
        return 0
    return run_repl(spec, state.params, tokenizer, sampling, moe_state=state.moe_state, interactive=sys.stdin.isatty())


def params_digest(*trees) -> str:
    """SHA-256 over every array's path, dtype, shape and bytes, tree by tree in tree order (the
    params, then a MoE model's routing biases: both decide what the model computes)."""
    import hashlib

    import jax
    import numpy as np

    digest = hashlib.sha256()
    for tree in trees:
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            array = np.asarray(leaf)
            digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def cmd_inspect(argv: list[str]) -> int:
    from pufferfish_jax.model.transformer import count_params

    parser = argparse.ArgumentParser(prog="python -m pufferfish_jax inspect",
                                     description="What a run dir or checkpoint holds, as inferred from it.")
    parser.add_argument("path", help="run dir, its checkpoints/ folder, or one checkpoint step folder")
    parser.add_argument("--digest", action="store_true", help="print only the SHA-256 of the parameters")
    args = parser.parse_args(argv)
    spec, state, _, _, ref = restore(args.path)
    if args.digest:
        print(params_digest(state.params, state.moe_state))
        return 0
    table = Table(title=f"checkpoint {ref.root / str(ref.step)}", show_header=False, title_justify="left")
    table.add_row("step", str(ref.step))
    table.add_row("architecture", f"{spec.num_layers} layers, d {spec.d_model}, {spec.num_heads} heads ({spec.num_kv_heads} kv), "
                                  f"head dim {spec.head_dim}, ffn {spec.ffn_hidden}, vocab {spec.vocab_size}, context {spec.seq_len}, "
                                  f"{'tied' if spec.tie_embeddings else 'untied'} embeddings, {spec.dtype}")
    table.add_row("params", f"{count_params(spec):,} ({count_params(spec, embedding=False):,} non-embedding)")
    if spec.moe is not None:
        m = spec.moe
        table.add_row("experts", f"{m.num_experts} routed (top {m.top_k}, {m.score}) + {m.num_shared_experts} shared, "
                                 f"width {m.expert_hidden}, in blocks {', '.join(map(str, m.layers))}; "
                                 f"{count_params(spec, active=True):,} params active per token; balance {m.balance}")
    metrics_path = ref.root.parent / "metrics.jsonl"
    if metrics_path.is_file():
        from pufferfish_jax.train.metrics import read_metrics

        records = read_metrics(metrics_path)
        for event in ("train", "eval"):
            last = next((r for r in reversed(records) if r["event"] == event), None)
            if last:
                table.add_row(f"last {event}", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in last.items() if k not in ("event", "time")))
    console.print(table)
    return 0


def cmd_eval(argv: list[str]) -> int:
    from pufferfish_jax import config as config_lib
    from pufferfish_jax import sharding
    from pufferfish_jax.data.corpora import load_documents
    from pufferfish_jax.data.pipeline import encode_documents, unigram_bpb
    from pufferfish_jax.train.evaluate import evaluate
    from pufferfish_jax.train.step import make_eval_step

    parser = argparse.ArgumentParser(prog="python -m pufferfish_jax eval",
                                     description="Loss and bits per byte of a checkpoint on any text.")
    parser.add_argument("path", help="run dir, its checkpoints/ folder, or one checkpoint step folder")
    parser.add_argument("--data", required=True, help="a file, folder, glob or built-in corpus name (wiki, shakespeare, kjv)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    spec, state, tokenizer, cfg, ref = restore(args.path)
    docs = load_documents(args.data, config_lib.cache_dir(cfg))
    tokens, num_bytes = encode_documents(tokenizer, docs)
    mesh = sharding.single_device_mesh()  # where restore put the state
    result = evaluate(make_eval_step(spec, mesh), state.variables, tokens, num_bytes, seq_len=spec.seq_len,
                      batch_size=args.batch_size, mesh=mesh)
    # The unigram baseline is fitted on the evaluated text itself: the entropy of its token
    # frequencies, the best any order-0 model with this tokenizer could do on it.
    unigram = unigram_bpb(tokens, tokens, num_bytes, spec.vocab_size)
    report = {"checkpoint": str(ref.root / str(ref.step)), "data": args.data, "tokens": result.tokens,
              "bytes": int(num_bytes), "val_loss": result.loss, "val_bpb": result.bpb, "unigram_bpb": unigram}
    if args.json:
        print(json.dumps(report))
    else:
        console.print(f"{args.data}: loss {result.loss:.4f} nats/token, {result.bpb:.4f} bits/byte "
                      f"(unigram {unigram:.4f}) over {result.tokens:,} tokens")
    return 0


def main(argv: list[str], started_at: float | None = None) -> int:
    started_at = start_time(started_at)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    commands = {"train": lambda a: cmd_train(a, started_at), "plan": lambda a: cmd_plan(a, started_at),
                "generate": cmd_generate, "eval": cmd_eval, "hardware": cmd_hardware, "inspect": cmd_inspect,
                "configure": cmd_configure}
    if argv:
        command = commands.get(argv[0])
    else:  # guided mode asks questions, so only a person at a terminal gets it; pipes and CI get usage
        command = (lambda _: _guided()) if is_interactive() else None
    if command is None:
        err_console.print(f"usage: python -m pufferfish_jax {{{','.join(commands)}}} ... [--debug]  "
                          "(no command, on a terminal: guided mode)")
        return 2
    try:
        return command(argv[1:])
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as e:
        if debug or not isinstance(e, user_errors()):
            raise
        err_console.print(f"error: {e}")
        return 1 if type(e).__name__ == "TrainingDiverged" else 2
