"""Guided mode: `python -m pufferfish_jax` on a terminal, from choosing text to writing with the
trained model, one question at a time.

Every answer is turned into the same config the command line builds, and the session ends by
printing the equivalent `just train ...` line, so what a new user did once by answering
questions they can repeat or script. The steps themselves (planning, training, the REPL) are
passed in by the command line, which owns them; this module only asks.
"""

from __future__ import annotations

import glob
import shlex
from pathlib import Path
from typing import Callable

import ml_collections
from rich.console import Console
from rich.markup import escape

from pufferfish_jax import config as config_lib
from pufferfish_jax.errors import ConfigError
from pufferfish_jax.configure import edit, overrides
from pufferfish_jax.prompting import enable_line_editing

BUILT_IN = (
    ("wiki", "Wikipedia lead sections of 10,033 Vital Articles, 4.9 M characters (the default)"),
    ("shakespeare", "38 plays of Shakespeare, 5.3 M characters"),
    ("kjv", "the King James Bible, 4.1 M characters"),
)
DEFAULT_BUDGET = "5m"


def ask_data(console: Console, read: Callable[[str], str]) -> str:
    console.print("[bold]1. What should the model read?[/]")
    for number, (name, about) in enumerate(BUILT_IN, start=1):
        console.print(f"  {number}  {name}: {about}")
    console.print(f"  {len(BUILT_IN) + 1}  your own text: a .txt, .jsonl or .parquet file, a folder, or a glob")
    while True:
        answer = read("data [1]: ").strip() or "1"
        if answer.isdigit() and 1 <= int(answer) <= len(BUILT_IN):
            return BUILT_IN[int(answer) - 1][0]
        if answer in {name for name, _ in BUILT_IN}:
            return answer
        if answer == str(len(BUILT_IN) + 1):
            answer = read("path: ").strip()
        if answer and (Path(answer).expanduser().exists() or glob.glob(str(Path(answer).expanduser()))):
            return answer
        console.print(f"[red]no such file or folder:[/] {escape(answer)}; type 1-{len(BUILT_IN)}, a corpus name or a path")


def ask_budget(console: Console, read: Callable[[str], str]) -> str:
    console.print("[bold]2. How long may it take, all included?[/] e.g. 90s, 5m, 1h30m")
    while True:
        answer = read(f"budget [{DEFAULT_BUDGET}]: ").strip() or DEFAULT_BUDGET
        try:
            config_lib.parse_duration(answer)
            return answer
        except ConfigError as e:
            console.print(f"[red]refused:[/] {escape(str(e))}")


def command_line(cfg: ml_collections.ConfigDict) -> str:
    """The `just train` line that builds the same config."""
    return "just train " + " ".join(shlex.quote(item) for item in overrides(cfg))


def run_guided(*, plan: Callable[[ml_collections.ConfigDict], None],
               train: Callable[[ml_collections.ConfigDict], tuple[int, Path]],
               generate: Callable[[Path], int], console: Console, read: Callable[[str], str] = input) -> int:
    """`plan(cfg)` prints the plan (may raise ConfigError); `train(cfg)` returns (exit code, run
    dir); `generate(run_dir)` runs the REPL. Ctrl-D at any question leaves."""
    enable_line_editing()
    console.print("[bold]Pufferfish-JAX[/]: train a small language model within a time budget, then write with it.\n"
                  "Enter takes the answer in brackets; Ctrl-D leaves. (Every step is also a command: "
                  "just --list shows them.)")
    try:
        cfg = config_lib.apply_overrides(config_lib.defaults(), [f"data.corpus={ask_data(console, read)}",
                                                                 f"budget.time={ask_budget(console, read)}"])
        while True:
            console.print("[bold]3. The plan[/] (measured on this machine; the first time takes a little longer)")
            try:
                plan(cfg)
            except ConfigError as e:
                console.print(f"[red]error:[/] {escape(str(e))}")
            choice = read("[t]rain, [e]dit the config, change [d]ata or [b]udget, [q]uit [t]: ").strip().lower() or "t"
            if choice.startswith("e"):
                cfg = edit(cfg, plan=plan, console=console, read=read, guided=True)
            elif choice.startswith("d"):
                cfg = config_lib.apply_overrides(cfg, [f"data.corpus={ask_data(console, read)}"])
            elif choice.startswith("b"):
                cfg = config_lib.apply_overrides(cfg, [f"budget.time={ask_budget(console, read)}", "train.steps=0"])
            elif choice.startswith("q"):
                return 0
            elif choice.startswith("t"):
                break
            else:
                console.print(f"[red]not a choice:[/] {escape(choice)}")
        console.print(f"[bold]4. Training.[/] The same run from the command line: {escape(command_line(cfg))}")
        code, run_dir = train(cfg)
        if code != 0:
            return code
        answer = read("5. Write with the model now? [Y/n]: ")
        if answer.strip().lower() in ("", "y", "yes"):
            return generate(run_dir)
        console.print(f"later: tools/generate.sh {escape(str(run_dir))}")
        return 0
    except EOFError:
        console.print()
        return 0

