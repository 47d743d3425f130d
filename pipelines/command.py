"""The pipeline command: parse `CONFIG.py [key=value ...] [--debug]`, run the stages, print.

Entered through `python -m pipelines` (`just pipeline ...`), which reads the clock first.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipelines.runner import Context, StageFailed, run_stages
from pipelines.stages import STAGES, Interrupted, check, stage_names
from pufferfish_jax import config as config_lib
from pufferfish_jax import session
from pufferfish_jax.display import console, err_console
from pufferfish_jax.errors import ConfigError, UserError
from pufferfish_jax.export import hf_import

USAGE = "usage: python -m pipelines CONFIG.py [key=value ...] [--debug]"


def build(argv: list[str]):
    """(config, user keys, run dir) from the command line: the config file, then the overrides.
    `run_dir=` names the pipeline's run dir; its training run goes to <run_dir>/train."""
    files = [a for a in argv if "=" not in a]
    if len(files) != 1:
        raise ConfigError(f"name one config file; {USAGE}")
    overrides = [("pipeline.run_dir=" + a.split("=", 1)[1]) if a.startswith("run_dir=") else a
                 for a in argv if "=" in a]
    cfg, user_keys = config_lib.from_command_line([f"config={files[0]}", *overrides])
    if cfg.train.init_from:  # every stage, the tokenizer's first, sees the imported model's keys
        hf_import.configure(cfg, user_keys)
    check(cfg)
    run_dir = Path(cfg.pipeline.run_dir or Path("runs") / Path(files[0]).stem)
    cfg.train.run_dir = str(run_dir / "train")
    return cfg, user_keys, run_dir


def main(argv: list[str], started_at: float | None = None) -> int:
    started_at = session.start_time(started_at)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        err_console.print(USAGE, markup=False)
        return 2
    try:
        cfg, user_keys, run_dir = build(argv)
        ctx = Context(cfg, user_keys, run_dir, started_at)
        actions = run_stages(STAGES, ctx, stage_names(cfg), log=lambda s: console.print(s, markup=False))
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun the same command to continue where it stopped", markup=False)
        return 130
    except Exception as e:
        error = e.error if isinstance(e, StageFailed) else e
        if isinstance(error, Interrupted):
            err_console.print(str(e), markup=False)
            return 130
        if debug or not isinstance(error, UserError):
            raise
        err_console.print(f"error: {e}", markup=False)
        return error.exit_code
    ran = [name for name, action in actions.items() if action == "ran"]
    console.print(f"pipeline {run_dir}: {len(ran)} stage(s) ran, {len(actions) - len(ran)} skipped, "
                      f"{time.time() - started_at:.1f}s" + (f"; report: {run_dir / 'report.md'}" if "report" in actions else ""),
                      markup=False)
    return 0
