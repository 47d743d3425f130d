"""The config editor: a numbered table of every config key, edited by typing.

Every edit goes through the command line's own apply_overrides and validate, so the editor can
neither accept a value that `just train config=...` would refuse nor refuse one it would take;
a refused edit leaves the config as it was and says why. Only the choice between a budget and a
step count is left open, since `just train budget=5m config=...` may supply it. Files are saved
in the two forms the trainer loads: a `configs/*.py` file with a get_config() (only the values
that differ from the defaults written out, so it reads like the shipped configs) or JSON.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Callable

import ml_collections
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pufferfish_jax import config as config_lib
from pufferfish_jax.config import ALIASES, CHOICES, HELP, SCHEMA, changed_keys
from pufferfish_jax.errors import ConfigError
from pufferfish_jax.prompting import enable_line_editing

KEYS: tuple[str, ...] = tuple(key for key, _, _ in SCHEMA)
DEFAULTS: dict = {key: value for key, value, _ in SCHEMA}

_COMMANDS = """\
  N               edit row N (Enter keeps the value, '' sets empty text)
  key=value ...   set one or more values (full key, a unique short name like d_model, or a row number)
  reset KEY|N|all back to the default
  show [SECTION]  the table again (sections: model, train, data, budget)
  changed         the values that differ from the defaults
  plan [BUDGET]   the plan these values give for a budget (default: budget.time)
  save [PATH]     write PATH.py (a get_config() file) or PATH.json
  quit            {quit}"""


def commands(guided: bool) -> str:
    return _COMMANDS.format(quit="back to the plan" if guided else "leave (asks again if there are unsaved changes)")


def check(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """validate(), except that neither a budget nor steps is fine: the command line may add one."""
    if cfg.budget.time and cfg.train.steps:
        raise ConfigError("budget.time and train.steps are both set; clear one (budget.time= or train.steps=0)")
    probe = ml_collections.ConfigDict(cfg.to_dict())
    if not probe.budget.time and probe.train.steps <= 0:
        probe.budget.time = "1h"
    config_lib.validate(probe)
    return cfg


def resolve(name: str) -> str:
    """A row number, full key, command-line alias or unique short name -> the full key."""
    if name.isdigit():
        if not 1 <= int(name) <= len(KEYS):
            raise ConfigError(f"there is no row {name}; rows are 1 to {len(KEYS)}")
        return KEYS[int(name) - 1]
    if name in HELP or name in ALIASES:
        return ALIASES.get(name, name)
    matches = [key for key in KEYS if key.split(".")[1] == name]
    if len(matches) > 1:
        raise ConfigError(f"'{name}' is ambiguous: {' or '.join(matches)}")
    if matches:
        return matches[0]
    raise ConfigError(f"unknown config key '{name}'{config_lib._closest(name)}")


def typed(value) -> str:
    """A value as it would be typed back: text quoted, so an empty one shows as ''."""
    return repr(value) if isinstance(value, str) else str(value)


def show_value(value) -> str:
    """typed(), escaped for rich markup (a path may hold brackets)."""
    return escape(typed(value))


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def table(cfg: ml_collections.ConfigDict, section: str | None = None, width: int = 200) -> Table:
    """The editor's table for a terminal `width` columns wide: one line per key, so the whole
    config fits on a screen. Long values and help are cut with an ellipsis; picking the row shows
    them in full."""
    flat = config_lib.flatten(cfg)
    value_width, default_width = (28, 16) if width >= 100 else (14, 10)
    rows = []
    for row, key in enumerate(KEYS, start=1):
        part, name = key.split(".")
        if section and part != section:
            continue
        changed = flat[key] != DEFAULTS[key]
        rows.append([str(row), part, name, _cut(typed(flat[key]), value_width) + (" *" if changed else ""),
                     _cut(typed(DEFAULTS[key]), default_width), HELP[key], changed,
                     row == len(KEYS) or KEYS[row].split(".")[0] != part])
    headers = ("#", "section", "key", "value", "default")
    widths = [max([len(header)] + [len(r[i]) for r in rows]) for i, header in enumerate(headers)]
    help_width = max(width - sum(widths) - 2 * len(headers) - 3, 12)  # padding: 2 between columns, 1 at each edge, 1 spare
    grid = Table(title="config (* = changed from the default)", title_justify="left", box=box.SIMPLE_HEAD,
                 collapse_padding=True)
    for header, style, column_width in zip(headers, ("dim", "cyan", "bold", None, "dim"), widths):
        grid.add_column(header, style=style, justify="right" if header == "#" else "left", no_wrap=True,
                        min_width=column_width)
    grid.add_column("help", no_wrap=True)
    for number, part, name, value, default, help_text, changed, last_of_section in rows:
        grid.add_row(number, part, name, f"[yellow]{escape(value)}[/]" if changed else escape(value), escape(default),
                     _cut(help_text, help_width), end_section=last_of_section)
    return grid


def overrides(cfg: ml_collections.ConfigDict) -> list[str]:
    """`key=value` for every changed key: the command line's form of cfg."""
    flat = config_lib.flatten(cfg)
    return [f"{key}={flat[key]}" for key in changed_keys(cfg)]


def render_python(cfg: ml_collections.ConfigDict, path: Path) -> str:
    """A configs/*.py file that rebuilds cfg: the defaults, then each changed value."""
    flat = config_lib.flatten(cfg)
    lines = [f"    cfg.{key} = {flat[key]!r}" for key in changed_keys(cfg)]
    usage = f"just train config={path}" + ("" if cfg.budget.time or cfg.train.steps else " budget=5m")
    return (f'"""Written by `python -m pufferfish_jax configure`: the defaults, then the values changed.\n\n'
            f'    {usage}\n"""\n\nfrom pufferfish_jax.config import defaults\n\n\n'
            f"def get_config():\n    cfg = defaults()\n" + "".join(line + "\n" for line in lines) + "    return cfg\n")


def save(cfg: ml_collections.ConfigDict, path: Path) -> None:
    if path.suffix not in (".py", ".json"):
        raise ConfigError(f"save {path}: the name must end in .py (a get_config() file) or .json")
    text = render_python(cfg, path) if path.suffix == ".py" else config_lib.to_json(cfg) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise ConfigError(f"cannot write {path} ({e.strerror}); choose another path") from None


def edit(cfg: ml_collections.ConfigDict, *, plan: Callable[[ml_collections.ConfigDict], None],
         source: Path | None = None, console: Console | None = None, read: Callable[[str], str] = input,
         guided: bool = False) -> ml_collections.ConfigDict:
    """Runs the editor until quit (or end of input) and returns the config as edited.

    `plan(cfg)` prints the plan for a config with a budget (it may take seconds and raise
    ConfigError). `source` is the file the config came from, the default for `save`. `guided`:
    called from guided mode, where leaving returns to the plan instead of asking about saving.
    """
    return _Editor(cfg, plan, source, console or Console(highlight=False), read, guided).run()


class _Editor:
    """The editor's session: the config being edited and what was last saved (quit warns once
    when they differ)."""

    def __init__(self, cfg, plan, source: Path | None, console: Console, read: Callable[[str], str], guided: bool):
        self.cfg, self.plan, self.source, self.console, self.read, self.guided = cfg, plan, source, console, read, guided
        self.saved = config_lib.flatten(cfg)  # what is on disk (or the starting point)
        self.warned_unsaved = False

    def run(self) -> ml_collections.ConfigDict:
        enable_line_editing()
        check(self.cfg)
        self.console.print(table(self.cfg, width=self.console.width))
        self.console.print(commands(self.guided))
        while True:
            try:
                line = self.read("configure> ").strip()
            except EOFError:
                self.console.print()
                return self.cfg
            except KeyboardInterrupt:  # Ctrl-C drops the line; quit or Ctrl-D leaves
                self.console.print()
                continue
            if not line:
                continue
            try:
                words = shlex.split(line)
            except ValueError as e:
                self.console.print(f"[red]refused:[/] {escape(str(e))} (quote values with spaces: data.corpus='my texts/*.txt')")
                continue
            try:
                if self.dispatch(line, words):
                    return self.cfg
            except ConfigError as e:
                self.console.print(f"[red]refused:[/] {escape(str(e))}")
            except KeyboardInterrupt:
                self.console.print("\n(cancelled)")

    def dispatch(self, line: str, words: list[str]) -> bool:
        """Runs one command; True when the editor should close."""
        command, args, cfg = words[0], words[1:], self.cfg
        if command in ("quit", "q", "exit", "done"):
            if self.guided or config_lib.flatten(cfg) == self.saved or self.warned_unsaved:
                return True
            self.warned_unsaved = True
            self.console.print("there are unsaved changes: save PATH keeps them, quit again discards them")
        elif command in ("help", "?"):
            self.console.print(commands(self.guided))
        elif command in ("show", "table", "ls"):
            if args and args[0] not in {key.split(".")[0] for key in KEYS}:
                raise ConfigError(f"no section '{args[0]}'; sections are model, train, data, budget")
            self.console.print(table(cfg, args[0] if args else None, width=self.console.width))
        elif command == "changed":
            flat = config_lib.flatten(cfg)
            rows = [f"{key} = {show_value(flat[key])} (default {show_value(DEFAULTS[key])})" for key in changed_keys(cfg)]
            self.console.print("\n".join(rows) or "everything is at its default")
        elif command == "reset":
            if not args:
                raise ConfigError("reset needs a key, a row number or all")
            keys = KEYS if args == ["all"] else [resolve(a) for a in args]
            self.apply([(key, DEFAULTS[key]) for key in keys if key in changed_keys(cfg)])
        elif command == "plan":
            self.do_plan(args)
        elif command == "save":
            self.do_save(args)
        elif all("=" in w for w in words):
            self.apply([(resolve(w.split("=", 1)[0].strip()), w.split("=", 1)[1].strip()) for w in words])
        elif command.isdigit() and not args:
            self.ask_row(resolve(command))
        else:
            raise ConfigError(f"'{line}' is not a command; type a row number, key=value, or help")
        return False

    def apply(self, assignments: list[tuple[str, str]]) -> None:
        before = config_lib.flatten(self.cfg)
        self.cfg = check(config_lib.apply_overrides(self.cfg, [f"{key}={value}" for key, value in assignments]))
        after = config_lib.flatten(self.cfg)
        for key, _ in assignments:
            self.console.print(f"{key}: {show_value(before[key])} -> {show_value(after[key])}")

    def ask_row(self, key: str) -> None:
        current = config_lib.flatten(self.cfg)[key]
        hint = f" ({' | '.join(CHOICES[key])})" if key in CHOICES else ""
        if isinstance(DEFAULTS[key], bool):
            hint = " (true | false)"
        self.console.print(f"[bold]{key}[/] = {show_value(current)}: {HELP[key]}")
        raw = self.read(f"{key}{hint} [{typed(current)}]: ").strip()
        if not raw:
            self.console.print(f"{key} kept at {show_value(current)}")
            return
        self.apply([(key, "" if raw in ("''", '""') else raw)])

    def do_plan(self, args: list[str]) -> None:
        budget = args[0] if args else self.cfg.budget.time
        if not budget:
            raise ConfigError("plan needs a budget: type plan 5m, or set budget.time first")
        config_lib.parse_duration(budget)
        with_budget = config_lib.apply_overrides(self.cfg, [f"budget.time={budget}", "train.steps=0"])
        self.plan(check(with_budget))

    def do_save(self, args: list[str]) -> None:
        if len(args) > 1:
            raise ConfigError("save takes one path (quote a path with spaces)")
        path = Path(args[0]).expanduser() if args else self.source
        if path is None:
            raise ConfigError("save needs a path, e.g. save configs/mine.py or save mine.json")
        if path.exists() and self.read(f"{path} exists; overwrite it? [y/N] ").strip().lower() not in ("y", "yes"):
            self.console.print("not saved")
            return
        save(self.cfg, path)
        self.saved, self.warned_unsaved = config_lib.flatten(self.cfg), False
        self.console.print(f"saved {escape(str(path))}; train with: just train config={escape(str(path))}"
                           + ("" if self.cfg.budget.time or self.cfg.train.steps else " budget=5m"))
