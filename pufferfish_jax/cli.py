"""Command line: `pufferfish {train,plan,generate,eval,inspect,export,hardware,configure} ...` (or
`python -m pufferfish_jax ...`), or no command on a terminal for the guided mode.

Commands are thin: they parse, call the session layer, and print. Every user mistake surfaces as
one line on stderr and a non-zero exit; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import ml_collections
from rich.table import Table

from pufferfish_jax import config as config_lib
from pufferfish_jax import guided, session, sharding
from pufferfish_jax.budget.calibrate import CalibrationCache
from pufferfish_jax.budget.hardware import CpuInfo, best_peak, probe
from pufferfish_jax.configure import check, commands, edit, overrides
from pufferfish_jax.display import console, err_console, plan_table
from pufferfish_jax.errors import ConfigError, UserError
from pufferfish_jax.generate import Sampling
from pufferfish_jax.model.transformer import count_params
from pufferfish_jax.prompting import is_interactive
from pufferfish_jax.repl import run_repl, write_continuation
from pufferfish_jax.train.metrics import read_metrics

COMMANDS = {
    "train": "train within a budget (budget=5m) or for steps=N; key=value overrides, config=FILE",
    "plan": "print the plan for a budget without training (budget=1h)",
    "generate": "continue a prompt with a run dir or checkpoint; no prompt: the REPL",
    "eval": "loss and bits per byte of a checkpoint on any text (--data)",
    "inspect": "what a run dir or checkpoint holds (--digest: SHA-256 of the parameters)",
    "export": "write a checkpoint as a Hugging Face Llama folder (--format hf) or a GGUF file (--format gguf)",
    "hardware": "devices, memory, CPU and cores, and each dtype's matmul peak on this machine",
    "configure": "edit a config in a table and save it for train config=FILE",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return ("usage: pufferfish COMMAND [args] [--debug]   (also: python -m pufferfish_jax, just COMMAND)\n\n"
            "commands:\n" + "\n".join(lines) + "\n\nNo command, on a terminal: guided mode. "
            "`pufferfish COMMAND --help` for a command's own options; docs/ for the rest.")


@contextlib.contextmanager
def _progress(label: str, out=console):
    """A spinner for the slow preparation, and a `log` that keeps each message as a line. The
    spinner stops (`stop`) before anything else takes over the terminal, like the dashboard.
    Commands whose stdout is a result (eval --json) send progress to stderr."""
    with out.status(label) as status:
        def log(message: str) -> None:
            out.print(message, style="dim", markup=False)
            status.update(message)

        yield log, status.stop


def _start(cfg) -> object:
    mesh = session.start(cfg)
    if not sharding.is_primary():  # one process speaks for a multi-host run
        console.quiet = True
    return mesh


def cmd_train(items: list[str], started_at: float) -> int:
    cfg, user_keys = config_lib.from_command_line(items)
    return train(cfg, user_keys, started_at)


def train(cfg, user_keys: set[str], started_at: float) -> int:
    """Trains (or resumes) and prints the result; 130 when stopped with a checkpoint saved."""
    mesh = _start(cfg)
    with _progress("preparing data and plan") as (log, stop):
        def on_plan(plan) -> None:
            stop()
            console.print(plan_table(plan))

        result = session.train(cfg, user_keys, started_at, mesh, log=log, on_plan=on_plan, display_console=console)
    return report(result)


def report(result: session.RunResult) -> int:
    outcome, plan = result.outcome, result.plan
    if result.interrupted:
        console.print(f"stopped at step {outcome.steps}; checkpoint saved. Resume with the same command "
                      f"(run_dir={result.run_dir}).")
        return 130
    gain = 1 - outcome.final.bpb / outcome.unigram_bpb
    console.print(f"final: val loss {outcome.final.loss:.4f} nats/token, val bpb {outcome.final.bpb:.4f} "
                  f"± {outcome.final.bpb_se:.4f} (SE) "
                  f"(unigram bpb {outcome.unigram_bpb:.4f}, {abs(gain):.0%} {'below' if gain >= 0 else 'above'} it) "
                  f"after {outcome.steps} steps, "
                  f"{result.wall_s:.1f}s" + (f" of {plan.budget_s:.0f}s budget" if plan.budget_s else ""))
    return 0


def cmd_plan(items: list[str], started_at: float) -> int:
    cfg, user_keys = config_lib.from_command_line(items)
    if not cfg.budget.time:
        raise ConfigError("plan needs a budget, e.g. budget=1h")
    show_plan(cfg, user_keys, started_at)
    return 0


def show_plan(cfg, user_keys: set[str] | None = None, started_at: float | None = None) -> None:
    """Prints what `just plan` would for this config (also the config editor's and guided mode's
    review, which pass only the config: the keys it changes are the user's)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    user_keys = set(config_lib.changed_keys(cfg)) if user_keys is None else user_keys
    mesh = _start(cfg)
    with _progress("planning") as (log, _):
        _, plan = session.prepare(cfg, user_keys, started_at or time.time(), mesh, log=log)
    console.print(plan_table(plan))


def cmd_configure(argv: list[str]) -> int:
    """`configure [FILE] [key=value ...]`: the table editor, starting from FILE (or the defaults)."""
    if any(a in ("-h", "--help") for a in argv):
        console.print("usage: pufferfish configure [FILE.py|FILE.json] [key=value ...]\n"
                      "A table of every config key, edited by typing at the prompt:\n" + commands(guided=False),
                      markup=False)
        return 0
    files = [a.removeprefix("config=") for a in argv if "=" not in a or a.startswith("config=")]
    if len(files) > 1:
        raise ConfigError(f"configure takes one config file, not {len(files)} ({', '.join(files)})")
    cfg = config_lib.load_file(files[0]) if files else config_lib.defaults()
    cfg = check(config_lib.apply_overrides(cfg, [a for a in argv if "=" in a and not a.startswith("config=")]))
    edit(cfg, plan=show_plan, source=Path(files[0]) if files else None, console=console)
    return 0


def _guided() -> int:
    """`pufferfish` with no arguments on a terminal."""
    def train_cfg(cfg) -> tuple[int, Path]:
        code = cmd_train(overrides(cfg), time.time())  # the budget starts when the user says train
        return code, Path(cfg.train.run_dir) if cfg.train.run_dir else Path("runs/latest").resolve()

    return guided.run_guided(plan=show_plan, train=train_cfg, generate=lambda run_dir: cmd_generate([str(run_dir)]),
                             console=console)


def cmd_hardware(argv: list[str]) -> int:
    """Probes each dtype's matmul peak now and shows the best this machine has shown (the cache's,
    which this probe joins): the figure the dashboard's MFU divides by."""
    hw = probe()
    table = Table(title="hardware", show_header=False, title_justify="left")
    table.add_row("platform", f"{hw.platform} ({hw.device_kind}) x {hw.device_count}")
    table.add_row("cpu", CpuInfo(hw.cpu_model, hw.cpu_features).describe())
    table.add_row("memory", f"{hw.memory_bytes / 2**30:.1f} GiB per device" + (" (host RAM)" if hw.platform == "cpu" else ""))
    table.add_row("host cores", str(hw.host_cores))
    cache = CalibrationCache(config_lib.cache_dir(config_lib.defaults()))
    hw = replace(hw, measured_flops_fp32=cache.matmul_rate("float32", fresh=True),
                 measured_flops_bf16=cache.matmul_rate("bfloat16", fresh=True))
    for dtype, measured, sheet in (("float32", hw.measured_flops_fp32, hw.peak_flops_fp32),
                                   ("bfloat16", hw.measured_flops_bf16, hw.peak_flops_bf16)):
        count = cache.probes(dtype)[0]
        table.add_row(f"{dtype} matmul", f"{measured / 1e9:,.0f} GFLOP/s peak measured per device (best of {count} "
                      f"probe{'s' if count > 1 else ''})" + (f", {sheet / 1e12:,.0f} TFLOP/s peak (data sheet)" if sheet else ""))
    dtype, best = best_peak(hw.peaks())
    table.add_row("best", f"{dtype}: {best / 1e12:,.3g} TFLOP/s per device (the training dashboard's MFU denominator)")
    console.print(table)
    return 0


def _checkpoint_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("path", help="run dir, its checkpoints/ folder, or one checkpoint step folder")
    return parser


def cmd_generate(argv: list[str]) -> int:
    parser = _checkpoint_parser("tools/generate.sh", "Write text with a trained checkpoint.")
    parser.add_argument("prompt", nargs="?", help="text to continue; omit for the interactive REPL (/help inside)")
    default = Sampling()
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"default {default.max_new_tokens}, or half the model's context if that is shorter")
    parser.add_argument("--min-new-tokens", type=int, default=default.min_new_tokens,
                        help="the end-of-text token is not sampled before this many tokens")
    parser.add_argument("--temperature", type=float, default=default.temperature)
    parser.add_argument("--top-k", type=int, default=default.top_k)
    parser.add_argument("--top-p", type=float, default=default.top_p)
    parser.add_argument("--repetition-penalty", type=float, default=default.repetition_penalty,
                        help="> 1 makes tokens already in the prompt or output less likely (1.1-1.3 is typical); 1 = off")
    parser.add_argument("--seed", type=int, default=default.seed)
    args = parser.parse_args(argv)
    restored = session.restore(args.path)
    spec, state = restored.spec, restored.state
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else min(default.max_new_tokens, spec.seq_len // 2)
    sampling = Sampling(max_new_tokens=max_new_tokens, min_new_tokens=args.min_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                        seed=args.seed).check(spec.seq_len)
    if args.prompt is not None:
        write_continuation(spec, state.params, restored.tokenizer, args.prompt, sampling, moe_state=state.moe_state,
                           terminal=sys.stdout.isatty())
        return 0
    return run_repl(spec, state.params, restored.tokenizer, sampling, moe_state=state.moe_state,
                    interactive=sys.stdin.isatty())


def cmd_inspect(argv: list[str]) -> int:
    parser = _checkpoint_parser("pufferfish inspect", "What a run dir or checkpoint holds, as inferred from it.")
    parser.add_argument("--digest", action="store_true", help="print only the SHA-256 of the parameters")
    args = parser.parse_args(argv)
    restored = session.restore(args.path)
    spec, state, ref = restored.spec, restored.state, restored.ref
    if args.digest:
        print(session.params_digest(state.params, state.moe_state))
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
    records = read_metrics(metrics_path) if metrics_path.is_file() and not metrics_path.is_symlink() else []
    for event in ("train", "eval"):
        if last := next((r for r in reversed(records) if r["event"] == event), None):
            table.add_row(f"last {event}", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in last.items() if k not in ("event", "time")))
    console.print(table)
    return 0


def cmd_export(argv: list[str]) -> int:
    # Imported here: gguf is export's own need, so a machine without it (a GPU image with its own
    # packages, say) still trains, plans and generates.
    from pufferfish_jax.export import write as export_write

    parser = _checkpoint_parser("pufferfish export", "Write a checkpoint for transformers (hf) or llama.cpp (gguf).")
    parser.add_argument("out", help="folder to write (hf; a previous export in it is replaced), or a .gguf file or a "
                                    "folder for model.gguf (gguf)")
    parser.add_argument("--format", choices=export_write.FORMATS, default="hf")
    parser.add_argument("--dtype", choices=export_write.DTYPES, default="float32", help="dtype of the weights written")
    args = parser.parse_args(argv)
    restored = session.restore(args.path)
    written = export_write.export_model(restored.spec, restored.state.params, restored.tokenizer, Path(args.out),
                                        fmt=args.format, dtype=args.dtype,
                                        name=f"pufferfish-{restored.ref.root.parent.name}-step{restored.ref.step}")
    size = sum(p.stat().st_size for p in written)
    console.print(f"wrote {args.out} ({args.format}, {args.dtype}, {size / 2**20:,.1f} MiB, {len(written)} files) from "
                  f"{restored.ref.root / str(restored.ref.step)}", markup=False)
    return 0


def cmd_eval(argv: list[str]) -> int:
    parser = _checkpoint_parser("pufferfish eval", "Loss and bits per byte of a checkpoint on any text.")
    parser.add_argument("--data", required=True, help="a file, folder, glob or built-in corpus name (wiki, shakespeare, kjv)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    restored = session.restore(args.path)
    with _progress("evaluating", err_console if args.json else console) as (log, _):  # stderr: the error alone
        train_tokens = session.training_data(restored, log=log).train_tokens
        result = session.evaluate_text(restored, args.data, train_tokens=train_tokens, batch_size=args.batch_size, log=log)
    if args.json:
        print(json.dumps({"checkpoint": str(restored.ref.root / str(restored.ref.step)), "data": args.data}
                         | result.to_dict()))
    else:
        console.print(f"{args.data}: loss {result.val_loss:.4f} nats/token, {result.val_bpb:.4f} ± "
                      f"{result.val_bpb_se:.4f} (SE) bits/byte "
                      f"(unigram {result.unigram_bpb:.4f}) over {result.tokens:,} tokens")
    return 0


def main(argv: list[str], started_at: float | None = None) -> int:
    started_at = session.start_time(started_at)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    commands_ = {"train": lambda a: cmd_train(a, started_at), "plan": lambda a: cmd_plan(a, started_at),
                 "generate": cmd_generate, "eval": cmd_eval, "hardware": cmd_hardware, "inspect": cmd_inspect,
                 "export": cmd_export, "configure": cmd_configure}
    if argv and argv[0] in ("-h", "--help", "help"):
        console.print(usage(), markup=False)
        return 0
    if argv:
        command = commands_.get(argv[0])
    else:  # guided mode asks questions, so only a person at a terminal gets it; pipes and CI get usage
        command = (lambda _: _guided()) if is_interactive() else None
    if command is None:
        err_console.print(usage(), markup=False)
        return 2
    try:
        return command(argv[1:])
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except UserError as e:
        if debug:
            raise
        err_console.print(f"error: {e}", markup=False)
        return e.exit_code
