"""`python -m pipelines CONFIG.py [key=value ...] [--debug]` (`just pipeline ...`).

The start time is taken before any heavy import: a budget counts from the start of the command;
the command re-runs itself once with huge pages for XLA's buffers (see pufferfish_jax.host_memory).
"""

from __future__ import annotations

import time

STARTED_AT = time.time()

USAGE = "usage: python -m pipelines CONFIG.py [key=value ...] [--debug]"


def build(argv: list[str]):
    """(config, user keys, run dir) from the command line: the config file, then the overrides.
    `run_dir=` names the pipeline's run dir; its training run goes to <run_dir>/train."""
    from pathlib import Path

    from pipelines.stages import check
    from pufferfish_jax import cli
    from pufferfish_jax.config import ConfigError

    files = [a for a in argv if "=" not in a]
    if len(files) != 1:
        raise ConfigError(f"name one config file; {USAGE}")
    overrides = [("pipeline.run_dir=" + a.split("=", 1)[1]) if a.startswith("run_dir=") else a
                 for a in argv if "=" in a]
    cfg, user_keys = cli.build_config([f"config={files[0]}", *overrides])
    check(cfg)
    run_dir = Path(cfg.pipeline.run_dir or Path("runs") / Path(files[0]).stem)
    cfg.train.run_dir = str(run_dir / "train")
    return cfg, user_keys, run_dir


def main(argv: list[str], started_at: float | None = None) -> int:
    from pipelines.runner import Context, StageFailed, run_stages
    from pipelines.stages import STAGES, Interrupted, stage_names
    from pufferfish_jax import cli

    started_at = cli.start_time(started_at)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        cli.err_console.print(USAGE, markup=False)
        return 2
    try:
        cfg, user_keys, run_dir = build(argv)
        ctx = Context(cfg, user_keys, run_dir, started_at)
        actions = run_stages(STAGES, ctx, stage_names(cfg), log=lambda s: cli.console.print(s, markup=False))
    except KeyboardInterrupt:
        cli.err_console.print("interrupted; rerun the same command to continue where it stopped", markup=False)
        return 130
    except Exception as e:
        error = e.error if isinstance(e, StageFailed) else e
        if isinstance(error, Interrupted):
            cli.err_console.print(str(e), markup=False)
            return 130
        if debug or not isinstance(error, cli.user_errors()):
            raise
        cli.err_console.print(f"error: {e}", markup=False)
        return 1 if type(error).__name__ == "TrainingDiverged" else 2
    ran = [name for name, action in actions.items() if action == "ran"]
    cli.console.print(f"pipeline {run_dir}: {len(ran)} stage(s) ran, {len(actions) - len(ran)} skipped, "
                      f"{time.time() - started_at:.1f}s" + (f"; report: {run_dir / 'report.md'}" if "report" in actions else ""),
                      markup=False)
    return 0


if __name__ == "__main__":
    import sys

    from pufferfish_jax.host_memory import rerun_with_huge_pages

    rerun_with_huge_pages(STARTED_AT)
    sys.exit(main(sys.argv[1:], started_at=STARTED_AT))
