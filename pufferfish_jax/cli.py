"""Command line: `python -m pufferfish_jax {train,plan,generate,eval,inspect} ...`.

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

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    from pufferfish_jax.config import ConfigError
    from pufferfish_jax.data.corpora import DataError
    from pufferfish_jax.train.checkpoint import CheckpointError
    from pufferfish_jax.train.loop import TrainingDiverged

    return ConfigError, DataError, CheckpointError, TrainingDiverged


def _start_time(started_at: float | None) -> float:
    """The earliest known start of this command: `just` exports PUFFERFISH_T0."""
    candidates = [t for t in (started_at, _float_env("PUFFERFISH_T0")) if t]
    return min(candidates) if candidates else time.time()


def _float_env(name: str) -> float | None:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return None


def _setup_jax(cache_dir: Path) -> None:
    """Persistent compilation cache: a rerun of the same shapes skips XLA compilation."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache_dir / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _build_config(items: list[str]):
    """config=FILE first, then key=value overrides in order; returns (cfg, keys the user set)."""
    from pufferfish_jax import config as config_lib

    files = [i.split("=", 1)[1] for i in items if i.startswith("config=")]
    overrides = [i for i in items if not i.startswith("config=")]
    cfg = config_lib.load_file(files[-1]) if files else config_lib.defaults()
    base = config_lib.flatten(config_lib.defaults())
    user_keys = {k for k, v in config_lib.flatten(cfg).items() if v != base[k]}
    cfg = config_lib.apply_overrides(cfg, overrides)
    user_keys |= {config_lib.ALIASES.get(k, k) for k in (o.split("=", 1)[0].strip() for o in overrides)}
    if cfg.budget.time and cfg.train.steps:
        raise config_lib.ConfigError("give either a budget (budget=5m) or a number of steps (steps=N), not both")
    return config_lib.validate(cfg), user_keys


def _prepare(cfg, user_keys: set[str], started_at: float):
    """Data, then a plan: the part of train and plan that comes before any training."""
    from pufferfish_jax import config as config_lib
    from pufferfish_jax.budget.calibrate import CalibrationCache
    from pufferfish_jax.budget.hardware import probe
    from pufferfish_jax.budget.planner import budget_plan, fixed_steps_plan
    from pufferfish_jax.data.pipeline import prepare_data

    cache = config_lib.cache_dir(cfg)
    _setup_jax(cache)
    with console.status("preparing data") as status:
        data = prepare_data(cfg.data, cache, log=lambda s: status.update(s))
    console.print(f"data: {cfg.data.corpus}: {len(data.train_tokens):,} train tokens, {len(data.val_tokens):,} "
                  f"held-out tokens, vocab {data.vocab_size:,} ({data.prep_seconds:.1f}s)")
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.vocab_size
    elif cfg.model.vocab_size < data.vocab_size:
        raise config_lib.ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                                     f"{data.vocab_size}; set model.vocab_size=0 to use the tokenizer's size")
    if cfg.budget.time:
        budget_s = config_lib.parse_duration(cfg.budget.time)
        with console.status("planning: timing candidate models on this machine") as status:
            plan = budget_plan(cfg, budget_s=budget_s, deadline=started_at + budget_s,
                               train_tokens=len(data.train_tokens), val_tokens=len(data.val_tokens),
                               cache=CalibrationCache(cache), user_keys=user_keys,
                               memory_limit=probe(measure=False).memory_bytes, log=lambda s: status.update(f"planning: {s}"))
    else:
        plan = fixed_steps_plan(cfg, train_tokens=len(data.train_tokens))
    return data, plan


def _plan_table(plan) -> Table:
    table = Table(title="plan", show_header=False, title_justify="left")
    m = plan.model
    rows = [
        ("model", f"{m['num_layers']} layers, d {m['d_model']}, {m['num_heads']} heads ({m['num_kv_heads']} kv), "
                  f"vocab {m['vocab_size']}, {m['dtype']}, remat {m['remat']}"),
        ("params", f"{plan.params:,} ({plan.non_embedding_params:,} non-embedding"
                   + (f", {plan.active_params:,} active per token)" if 0 < plan.active_params < plan.params else ")")),
        ("batch", f"{plan.batch_size} x {plan.seq_len} tokens"),
        ("steps", f"{plan.steps:,}" + (" (re-fitted to the clock as the run goes)" if plan.mode == "budget" else "")),
        ("tokens", f"{plan.tokens:,} ({plan.epochs:.2f} epochs of "
                   f"{'all' if plan.subset_fraction >= 1 else f'a {plan.subset_fraction:.0%} subset of'} the training text, "
                   f"{plan.tokens_per_param:.1f} per non-embedding param)"),
        ("memory", f"{plan.predicted_memory_bytes / 2**20:,.0f} MiB predicted peak"),
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
    if cfg.train.run_dir:
        run_dir = Path(cfg.train.run_dir)
    else:
        run_dir = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
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
    return run_dir


# What a run writes into its run dir (and nothing else may be there for it to start afresh).
RUN_FILES = {"config.json", "plan.json", "tokenizer.json", "metrics.jsonl", "checkpoints"}
# Keys a resumed run may change: where and how often it writes, not what it trains.
RESUME_FREE_KEYS = {"train.run_dir", "train.resume", "train.checkpoint_every_s", "train.keep_checkpoints",
                    "train.log_every", "data.cache_dir"}


def cmd_train(items: list[str], started_at: float) -> int:
    from pufferfish_jax.budget.planner import apply_plan
    from pufferfish_jax.config import ConfigError, to_json
    from pufferfish_jax.train import checkpoint
    from pufferfish_jax.train.loop import run

    cfg, user_keys = _build_config(items)
    if cfg.train.run_dir and checkpoint.saved_steps(Path(cfg.train.run_dir) / "checkpoints"):
        if cfg.train.resume == "never":
            raise ConfigError(f"run dir {cfg.train.run_dir} already has checkpoints; resume=auto continues it, "
                              "or choose another run_dir")
        return _resume(cfg, user_keys, Path(cfg.train.run_dir), started_at)
    data, plan = _prepare(cfg, user_keys, started_at)
    resolved = apply_plan(cfg, plan)
    run_dir = _new_run_dir(resolved)
    (run_dir / "config.json").write_text(to_json(resolved))
    (run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
    (run_dir / "tokenizer.json").write_text(data.tokenizer_json)
    console.print(_plan_table(plan))
    console.print(f"run dir: {run_dir}")
    deadline = started_at + plan.budget_s if plan.mode == "budget" else None
    outcome = run(resolved, plan, data, run_dir, deadline=deadline, started_at=started_at, display_console=console)
    return _finish(run_dir, plan, outcome, wall_s=time.time() - started_at)


def _resume(cfg, user_keys: set[str], run_dir: Path, started_at: float) -> int:
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
    _setup_jax(cache)
    with console.status("preparing data") as status:
        data = prepare_data(saved.data, cache, log=lambda s: status.update(s))
    spec = ModelSpec.from_config(saved.model, saved.moe)
    at_most = int(cfg.train.resume) if cfg.train.resume.isdigit() else None
    state, ref = checkpoint.restore_newest(run_dir / "checkpoints", abstract_state(spec, make_optimizer(saved.train)),
                                           at_most=at_most, warn=err_console.print)
    record = checkpoint.load_progress(ref)
    if record["data_fingerprint"] != data.fingerprint:
        raise config_lib.ConfigError(f"the corpus or tokenizer of {run_dir} changed since it was trained (data "
                                     f"{record['data_fingerprint']} -> {data.fingerprint}); restore the data or choose another run_dir")
    deadline = started_at + plan.budget_s - record["elapsed_s"] if plan.mode == "budget" else None
    left = f", {deadline - time.time():.0f}s of the budget left" if deadline else ""
    console.print(f"resuming {run_dir} from step {ref.step}{left}")
    outcome = run(saved, plan, data, run_dir, deadline=deadline, started_at=started_at, display_console=console,
                  resumed=(state, record))
    return _finish(run_dir, plan, outcome, wall_s=record["elapsed_s"] + time.time() - started_at)


def _finish(run_dir: Path, plan, outcome, *, wall_s: float) -> int:
    """Records the outcome in plan.json and prints it; wall_s counts every attempt of the run."""
    if outcome.interrupted:
        console.print(f"stopped at step {outcome.steps}; checkpoint saved. Resume with the same command "
                      f"(run_dir={run_dir}).")
        return 130
    record = plan.to_dict() | {"outcome": {"wall_s": wall_s, "steps": outcome.steps, "tokens": outcome.tokens,
                                           "val_loss": outcome.final.loss, "val_bpb": outcome.final.bpb,
                                           "unigram_bpb": outcome.unigram_bpb}}
    (run_dir / "plan.json").write_text(json.dumps(record, indent=2))
    gain = 1 - outcome.final.bpb / outcome.unigram_bpb
    console.print(f"final: val loss {outcome.final.loss:.4f} nats/token, val bpb {outcome.final.bpb:.4f} "
                  f"(unigram bpb {outcome.unigram_bpb:.4f}, {gain:.0%} below it) after {outcome.steps} steps, "
                  f"{wall_s:.1f}s" + (f" of {plan.budget_s:.0f}s budget" if plan.budget_s else ""))
    return 0


def cmd_plan(items: list[str], started_at: float) -> int:
    cfg, user_keys = _build_config(items)
    if not cfg.budget.time:
        from pufferfish_jax.config import ConfigError

        raise ConfigError("plan needs a budget, e.g. budget=1h")
    _, plan = _prepare(cfg, user_keys, started_at)
    console.print(_plan_table(plan))
    return 0


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


def _restore(path: str):
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
    from pufferfish_jax.config import ConfigError
    from pufferfish_jax.data.tokenizer import eos_id
    from pufferfish_jax.generate import generate

    parser = argparse.ArgumentParser(prog="tools/generate.sh", description="Write text with a trained checkpoint.")
    parser.add_argument("path", help="run dir, its checkpoints/ folder, or one checkpoint step folder")
    parser.add_argument("prompt", nargs="?", help="text to continue; omit for an interactive prompt loop")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--min-new-tokens", type=int, default=50,
                        help="the end-of-text token is not sampled before this many tokens")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    spec, state, tokenizer, _, _ = _restore(args.path)
    eos = eos_id(tokenizer)

    if not 0 < args.max_new_tokens < spec.seq_len:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be between 1 and {spec.seq_len - 1} "
                          f"(the model's context is {spec.seq_len} tokens)")

    def write(prompt: str) -> None:
        ids = tokenizer.encode(prompt).ids or [eos]
        if len(ids) + args.max_new_tokens > spec.seq_len:
            raise ConfigError(f"the prompt is {len(ids)} tokens and --max-new-tokens {args.max_new_tokens}, more than the "
                              f"model's context of {spec.seq_len}; shorten the prompt or lower --max-new-tokens")
        out: list[int] = []
        shown = 0

        def on_token(token: int) -> None:
            nonlocal shown
            out.append(token)
            text = tokenizer.decode(out)
            if not text.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)

        sys.stdout.write(prompt)
        generate(spec, state.params, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=eos,
                 min_new_tokens=min(args.min_new_tokens, args.max_new_tokens), on_token=on_token,
                 moe_state=state.moe_state)
        sys.stdout.write(tokenizer.decode(out)[shown:] + "\n")
        sys.stdout.flush()

    if args.prompt is not None:
        write(args.prompt)
        return 0
    while True:  # interactive loop; Ctrl-D or an empty line ends it
        try:
            prompt = input("prompt> ")
        except EOFError:
            return 0
        if not prompt.strip():
            return 0
        try:
            write(prompt)
        except ConfigError as e:  # a too-long prompt should not end the session
            err_console.print(f"error: {e}")


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
    spec, state, _, _, ref = _restore(args.path)
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
    spec, state, tokenizer, cfg, ref = _restore(args.path)
    docs = load_documents(args.data, config_lib.cache_dir(cfg))
    tokens, num_bytes = encode_documents(tokenizer, docs)
    result = evaluate(make_eval_step(spec), state.variables, tokens, num_bytes, seq_len=spec.seq_len, batch_size=args.batch_size)
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
    started_at = _start_time(started_at)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    commands = {"train": lambda a: cmd_train(a, started_at), "plan": lambda a: cmd_plan(a, started_at),
                "generate": cmd_generate, "eval": cmd_eval, "hardware": cmd_hardware, "inspect": cmd_inspect}
    if not argv or argv[0] not in commands:
        err_console.print(f"usage: python -m pufferfish_jax {{{','.join(commands)}}} ... [--debug]")
        return 2
    try:
        return commands[argv[0]](argv[1:])
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as e:
        if debug or not isinstance(e, _user_errors()):
            raise
        err_console.print(f"error: {e}")
        return 1 if type(e).__name__ == "TrainingDiverged" else 2
