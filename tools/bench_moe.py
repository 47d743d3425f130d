#!/usr/bin/env python
"""Dense against mixture-of-experts models at an equal wall-clock budget, on this machine.

    python tools/bench_moe.py [--budget 5m] [--corpus wiki] [--shape 4x128] [--batch 8] [--out DIR]

Every row is a real `python -m pufferfish_jax train` run with `budget.planner=none`: the same
fixed shape (layers x width) and batch for all, so the only difference is the FFN, and the loop
fits the number of steps to the budget. The MoE rows use configs/moe.py (top-2 of 4 or 8 routed
experts plus one shared expert, each a third of the dense FFN's width, so a token's active
parameters stay close to the dense model's). Prints one table: wall time over budget, training
tokens/s, active and total parameters, final validation bits per byte, and the max / mean expert
load at the last logged step (the mean over MoE layers, and the worst layer). Each run is preceded
by an untimed `plan` with the same settings, so every row starts from a warm step-time and
compilation cache, as any run after the first one on a machine does.
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

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
MODELS = (
    ("dense", []),
    ("MoE 4 experts", ["config=configs/moe.py", "moe.num_experts=4"]),
    ("MoE 8 experts", ["config=configs/moe.py", "moe.num_experts=8"]),
)


def run(name: str, overrides: list[str], args, out: Path) -> dict:
    run_dir = out / name.replace(" ", "-")
    layers, width = (int(v) for v in args.shape.split("x"))
    settings = [*overrides, f"budget={args.budget}", "budget.planner=none", f"data.corpus={args.corpus}",
                f"model.num_layers={layers}", f"model.d_model={width}", f"model.num_heads={max(1, width // 32)}",
                f"model.num_kv_heads={max(1, width // 64)}", f"train.batch_size={args.batch}"]
    # `plan` first, untimed: it measures the step once on this machine (cached, as after any first
    # run) and fills the compilation cache, so no row pays a one-time cost the others do not.
    subprocess.run([sys.executable, "-m", "pufferfish_jax", "plan", *settings], cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, check=True)
    started = time.time()
    env = {**os.environ, "PUFFERFISH_T0": repr(started), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pufferfish_jax", "train", *settings, f"run_dir={run_dir}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} failed: {(result.stderr.strip().splitlines() or ['no output'])[-1]}")
    plan = json.loads((run_dir / "plan.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train" and r.get("tokens_per_s")]
    loads = [v for k, v in train[-1].items() if k.startswith("moe.") and k.endswith(".max_load")] if train else []
    return dict(wall=wall, budget_s=plan["budget_s"], params=plan["params"], active=plan["active_params"],
                tokens_per_s=float(np.median([r["tokens_per_s"] for r in train])) if train else float("nan"),
                loads=loads, **json.loads((run_dir / "outcome.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="5m", help="wall-clock budget of each run (default 5m)")
    parser.add_argument("--corpus", default="wiki")
    parser.add_argument("--shape", default="4x128", help="LAYERSxWIDTH of every model (heads of 32 wide)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--out", default="", help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_moe_"))
    console = Console(width=150)
    table = Table(title=f"dense vs MoE, {args.budget} each, {args.shape} x batch {args.batch}, {args.corpus} "
                        "(budget.planner=none: steps fitted to the clock)")
    for column in ("model", "wall / budget", "tokens/s", "vs dense", "active params", "total params", "steps",
                   "tokens", "val bpb", "vs dense", "max/mean load (mean, worst layer)"):
        table.add_column(column, justify="right")
    dense = None
    for name, overrides in MODELS:
        console.print(f"running {name} for {args.budget} ...")
        row = run(name, overrides, args, out)
        dense = dense or row
        load = f"{np.mean(row['loads']):.2f}, {max(row['loads']):.2f}" if row["loads"] else "-"
        table.add_row(name, f"{row['wall'] / row['budget_s']:.1%}", f"{row['tokens_per_s']:,.0f}",
                      f"{row['tokens_per_s'] / dense['tokens_per_s']:.2f}x", f"{row['active']:,}", f"{row['params']:,}",
                      f"{row['steps']:,}", f"{row['tokens']:,}", f"{row['val_bpb']:.4f}",
                      f"{row['val_bpb'] - dense['val_bpb']:+.4f}", load)
    console.print(table)
    console.print(f"runs in {out}")


if __name__ == "__main__":
    main()
