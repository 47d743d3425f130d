"""Writing text with a checkpoint: one streamed continuation, or a REPL of prompts and /commands.

The REPL keeps the model loaded and its decode loop compiled across turns, so every turn after
the first costs only the sampling. Sampling settings are changed between turns with slash
commands; a bad command gets a one-line reason and the session goes on. Turn i samples with
seed + i, so asking twice gives two different texts, and `/seed N` restarts the sequence, so a
session replays exactly.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, TextIO

from rich.console import Console
from rich.markup import escape

from pufferfish_jax.data.tokenizer import eos_id
from pufferfish_jax.errors import ConfigError
from pufferfish_jax.generate import Sampling, generate
from pufferfish_jax.prompting import enable_line_editing

# Model output may contain any byte; a terminal must not receive control sequences from it.
_TERMINAL_UNSAFE = {c: "\ufffd" for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]}


def write_continuation(spec, params, tokenizer, prompt: str, sampling: Sampling, *, moe_state: dict | None = None,
                       out: TextIO | None = None, terminal: bool = False) -> list[int]:
    """Writes the prompt, then its continuation token by token as it is sampled, to `out` (the
    stdout of the moment when None); returns the new tokens. On a terminal, control characters in
    the model's output are shown as U+FFFD."""
    out = out or sys.stdout
    eos = eos_id(tokenizer)
    ids = tokenizer.encode(prompt).ids or [eos]
    if len(ids) + sampling.max_new_tokens > spec.seq_len:
        raise ConfigError(f"the prompt is {len(ids)} tokens and the continuation {sampling.max_new_tokens}, more than "
                          f"the model's context of {spec.seq_len}; shorten the prompt or ask for fewer new tokens")
    tokens: list[int] = []
    shown = 0

    def show(text: str) -> None:
        out.write(text.translate(_TERMINAL_UNSAFE) if terminal else text)
        out.flush()

    def on_token(token: int) -> None:
        nonlocal shown
        tokens.append(token)
        text = tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
            show(text[shown:])
            shown = len(text)

    show(prompt)
    generate(spec, params, ids, sampling, eos_id=eos, on_token=on_token, moe_state=moe_state)
    show(tokenizer.decode(tokens)[shown:] + "\n")
    return tokens


HELP = """\
Type text and press Enter: the model continues it. Commands:
  /temp T    sampling temperature (0 = greedy, always the same text)
  /topk K    sample among the K likeliest tokens (0 = off)
  /topp P    sample from the smallest set of tokens holding probability P (1 = off)
  /rep R     repetition penalty (> 1 discourages repeating tokens already seen; 1 = off)
  /max N     new tokens per turn (at most the context length - 1)
  /min N     the end-of-text token is not sampled before N new tokens
  /seed N    restart the seed sequence at N (turn i uses seed N + i)
  /settings  show the current settings
  /help      this list
  /quit      end (also Ctrl-D)"""

# command -> (Sampling field, parser, what a valid argument looks like)
_SETTERS: dict[str, tuple[str, Callable[[str], float | int], str]] = {
    "/temp": ("temperature", float, "a number >= 0, e.g. /temp 0.8"),
    "/topk": ("top_k", int, "a whole number >= 0, e.g. /topk 40"),
    "/topp": ("top_p", float, "a number in (0, 1], e.g. /topp 0.9"),
    "/rep": ("repetition_penalty", float, "a number > 0, e.g. /rep 1.2 (1 = off)"),
    "/max": ("max_new_tokens", int, "a whole number of tokens, e.g. /max 200"),
    "/min": ("min_new_tokens", int, "a whole number of tokens, e.g. /min 20"),
    "/seed": ("seed", int, "a whole number, e.g. /seed 7"),
}


def apply_command(line: str, sampling: Sampling, seq_len: int) -> Sampling:
    """The settings after one /command; ConfigError (one line) for anything it cannot apply."""
    name, *args = line.split()
    if name not in _SETTERS:
        raise ConfigError(f"unknown command {name}; /help lists the commands")
    field, parse, expected = _SETTERS[name]
    if len(args) != 1:
        raise ConfigError(f"{name} needs {expected}")
    try:
        value = parse(args[0])
    except ValueError:
        raise ConfigError(f"{name} {args[0]}: expected {expected}") from None
    return dataclasses.replace(sampling, **{field: value}).check(seq_len)


def run_repl(spec, params, tokenizer, sampling: Sampling, *, moe_state: dict | None = None, interactive: bool) -> int:
    """Reads prompts and /commands until /quit or end of input. `interactive` (stdin is a
    terminal) adds the greeting, the `> ` prompt and a timing line after each turn; piped input
    gets only the text."""
    console = Console(highlight=False, soft_wrap=True)
    err_console = Console(stderr=True, highlight=False, soft_wrap=True)
    terminal = sys.stdout.isatty()
    turn = 0
    if interactive:
        enable_line_editing()
        console.print(f"[bold]{spec.num_layers} layers x d{spec.d_model}, context {spec.seq_len} tokens.[/] "
                      f"{sampling.describe()}. /help lists the commands, /quit ends.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                console.print()
            return 0
        except KeyboardInterrupt:  # like Python's REPL: Ctrl-C drops the line, Ctrl-D ends
            console.print()
            continue
        stripped = line.strip()
        if not stripped:
            continue
        if stripped in ("/quit", "/exit", "/q"):
            return 0
        if stripped in ("/help", "/?"):
            console.print(HELP)
            continue
        if stripped == "/settings":
            console.print(sampling.describe())
            continue
        if stripped.startswith("/"):
            try:
                sampling = apply_command(stripped, sampling, spec.seq_len)
            except ConfigError as e:
                err_console.print(f"error: {escape(str(e))}")
                continue
            if stripped.split()[0] == "/seed":
                turn = 0
            if interactive:
                console.print(sampling.describe())
            continue
        this_turn = dataclasses.replace(sampling, seed=sampling.seed + turn)
        started = time.perf_counter()
        try:
            tokens = write_continuation(spec, params, tokenizer, line, this_turn, moe_state=moe_state, terminal=terminal)
        except ConfigError as e:  # a too-long prompt should not end the session
            err_console.print(f"error: {escape(str(e))}")
            continue
        except KeyboardInterrupt:
            console.print("\n(interrupted)")
            continue
        turn += 1
        if interactive:
            seconds = time.perf_counter() - started
            console.print(f"[dim]({len(tokens)} tokens in {seconds:.1f}s, seed {this_turn.seed})[/]")
