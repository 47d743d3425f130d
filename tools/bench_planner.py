#!/usr/bin/env python
"""Measured planner against the white paper's tiers: same machine, same corpus, same budgets.

    python tools/bench_planner.py [--budgets 2m,5m,10m] [--corpus wiki] [--out DIR]

Each (budget, planner) pair is a real `python -m pufferfish_jax train` run, timed from process
launch to exit like `just train`. Prints one table: wall time as a fraction of the budget, the
final validation bits per byte, and the seed planner's bpb over the measured planner's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent


def run(budget: str, planner: str, corpus: str, out: Path) -> dict:
    run_dir = out / f"{budget}-{planner}"
    started = time.time()
    env = {**os.environ, "PUFFERFISH_T0": repr(started), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "pufferfish_jax", "train", f"budget={budget}",
                             f"budget.planner={planner}", f"data.corpus={corpus}", f"run_dir={run_dir}"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - started
    if result.returncode != 0:
        raise SystemExit(f"{budget} {planner} failed: {result.stderr.strip().splitlines()[-1]}")
    plan = json.loads((run_dir / "plan.json").read_text())
    return dict(budget=budget, planner=planner, wall=wall, budget_s=plan["budget_s"], model=plan["model"],
                batch=plan["batch_size"], **json.loads((run_dir / "outcome.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="2m,5m,10m")
    parser.add_argument("--corpus", default="wiki")
    parser.add_argument("--out", default="", help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_planner_"))
    console = Console(width=130)
    table = Table(title=f"planner benchmark on {args.corpus} (wall time from launch to exit)")
    for column in ("budget", "planner", "wall / budget", "model", "batch", "tokens", "val bpb", "seed / measured bpb"):
        table.add_column(column, justify="right")
    for budget in args.budgets.split(","):
        rows = {}
        for planner in ("measured", "seed"):
            console.print(f"running {budget} {planner} ...")
            rows[planner] = row = run(budget, planner, args.corpus, out)
            m = row["model"]
            ratio = f"{rows['seed']['val_bpb'] / rows['measured']['val_bpb']:.3f}" if planner == "seed" else ""
            table.add_row(budget, planner, f"{row['wall'] / row['budget_s']:.1%}",
                          f"{m['num_layers']} x d{m['d_model']}", str(row["batch"]), f"{row['tokens']:,}",
                          f"{row['val_bpb']:.4f}", ratio)
    console.print(table)


if __name__ == "__main__":
    main()
