#!/usr/bin/env python
"""Measured planner against the white paper's tiers, against a grid of fixed recipes, and under stress.

    python tools/bench_planner.py [--budgets 2m,5m,10m] [--corpus wiki] [--out DIR]
    python tools/bench_planner.py --oracle [--budgets 2m,5m,10m] [--corpus SPEC ...] [--grid N]
                                  [--only-cell BUDGET:CORPUS] [--json PATH] [--markdown] [--extra KEY=VALUE ...]
    python tools/bench_planner.py --stress [--budgets 2m,5m] [--corpus SPEC] [--json PATH] [--extra ...]
    python tools/bench_planner.py --combine a.json b.json ... [--markdown]

Every run is a real `python -m pufferfish_jax train` subprocess, timed from process launch to exit
with PUFFERFISH_T0 set at launch, like `just train`; each gets its own run dir under --out (logs in
--out/logs). A run that fails is recorded as failed with its one-line error; the benchmark goes on.

Default: the measured and the seed planner at each budget; one table with wall time as a fraction
of the budget, the final validation bits per byte, and the seed planner's bpb over the measured's.

--oracle: in each (budget, corpus) cell, the measured planner, then a grid of fixed recipes (model
shape, batch, dtype set on the command line, so the planner only fits the steps) around the
planner's choice as its plan.json records it (the same recipe, one ladder rung smaller and larger,
batch halved and doubled, the other dtype, their combinations) plus the earlier winners recorded in
docs/budget.md, then the seed planner. Prints every run and a summary: regret = planner bpb / best
grid bpb (1.0: the planner found the grid's best; above: a fixed recipe beat it). Fairness: every
run pays for its own planning and compiling inside its budget; the planner's runs also pay for
measuring the alternatives, the fixed recipes plan too (fitting the steps) and compile theirs. The
tool fits nothing: the grid is a fixed pattern and every number is a run's. Corpora: `wiki` and, by
default, `@shakespeare` (the built-in Shakespeare corpus written to --out as a .jsonl file and
passed as a path, i.e. a user file); `@NAME` does that for any built-in corpus.

--stress: `train budget=B` must end within 95-100 % of B without error (a) on one core
(`taskset -c 0`), (b) with one core kept busy by a busy-loop process for the whole run, and (c)
with a calibration cache that is 3x too optimistic (a cache made on a faster machine): one run fills
a dedicated cache (PUFFERFISH_CACHE=--out/stale-cache), every measured step_s in its
calibration.json is divided by 3, then the run is repeated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_planner_core as core  # noqa: E402

from pufferfish_jax.config import parse_duration  # noqa: E402

console = Console(width=160)
STRESS_FACTOR = 3.0
PASS_RANGE = (0.95, 1.00)


def _fmt(value, spec: str, empty: str = "") -> str:
    return empty if value is None else format(value, spec)


def _timeout(budget: str) -> float:
    return 2 * parse_duration(budget) + 300  # a hung run must not hang the benchmark


def _run(out: Path, budget: str, corpus: tuple[str, str], kind: str, label: str, name: str,
         overrides: list[str], extra: list[str], **kw) -> dict:
    console.print(f"[dim]running {budget} {corpus[0]} {kind}: {label} ...[/]")
    row = core.train_run(name, [f"budget={budget}", f"data.corpus={corpus[1]}", *extra, *overrides], out,
                         timeout_s=_timeout(budget), **kw)
    row.update(budget=budget, corpus=corpus[0], kind=kind, label=label, slot=label)  # slot: --combine's key
    if row["status"] == "ok" and kind != "grid":  # the planner's and seed's labels say what they chose
        row["label"] = f"{label}: {core.recipe_label(dict(row['recipe'], seq_len=None))}"
    console.print(f"[dim]  -> {row['status']} in {row['wall']:.1f} s {row.get('error', '')}[/]")
    return row


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:40]


def corpora(specs: list[str], out: Path) -> list[tuple[str, str]]:
    """(label, data.corpus value) per cell; `@NAME` writes built-in NAME to out/NAME.jsonl first."""
    result = []
    for spec in specs:
        if spec.startswith("@"):
            from pufferfish_jax.data.corpora import load_documents
            name = spec[1:]
            cache = Path(os.environ.get("PUFFERFISH_CACHE") or "~/.cache/pufferfish").expanduser()
            path = out / f"{name}.jsonl"
            if not path.exists():
                out.mkdir(parents=True, exist_ok=True)
                docs = load_documents(name, cache)
                path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
            result.append((f"{name}-file", str(path)))
        else:
            result.append((Path(spec).name if os.sep in spec else spec, spec))
    return result


def oracle_cell(out: Path, budget: str, corpus: tuple[str, str], grid: int, extra: list[str]) -> list[dict]:
    tag = f"{budget}-{_safe(corpus[0])}"
    rows = [_run(out, budget, corpus, "planner", "measured", f"{tag}-measured", ["budget.planner=measured"], extra)]
    if rows[0]["status"] != "ok":
        console.print(f"[red]{tag}: the planner failed, so there is no plan to build a grid around[/]")
    else:
        plan = json.loads((Path(rows[0]["run_dir"]) / "plan.json").read_text())
        for i, recipe in enumerate(core.grid_recipes(plan, grid)):
            rows.append(_run(out, budget, corpus, "grid", core.recipe_label(recipe), f"{tag}-grid{i}",
                             core.recipe_overrides(recipe), extra))
    rows.append(_run(out, budget, corpus, "seed", "seed", f"{tag}-seed", ["budget.planner=seed"], extra))
    return rows


def print_cell(rows: list[dict]) -> None:
    table = Table(title=f"{rows[0]['budget']} on {rows[0]['corpus']} (wall time from launch to exit)")
    for column in ("kind", "recipe", "wall / budget", "planning s", "tokens", "val bpb", "± se", "status"):
        table.add_column(column, justify="left" if column in ("recipe", "status") else "right")
    for r in rows:
        ok = r["status"] == "ok"
        table.add_row(r["kind"], r["label"], f"{r['wall'] / r['budget_s']:.1%}" if ok else f"{r['wall']:.0f} s",
                      _fmt(r.get("planning_s"), ".1f"), f"{r['tokens']:,}" if ok else "", _fmt(r.get("val_bpb"), ".4f"), _fmt(r.get("val_bpb_se"), ".4f"),
                      "ok" if ok else f"failed: {r['error'][:70]}")
    console.print(table)


SUMMARY_COLUMNS = ("budget", "corpus", "planner bpb", "planner recipe", "grid best bpb", "grid best recipe",
                   "regret", "seed bpb", "grid runs", "failed")


def _summary_cells(s: dict) -> list[str]:
    return [s["budget"], s["corpus"], _fmt(s["planner_bpb"], ".4f", "failed"), s["planner_recipe"] or "",
            _fmt(s["grid_best_bpb"], ".4f", "-"), s["grid_best_recipe"] or "", _fmt(s["regret"], ".3f", "-"),
            _fmt(s["seed_bpb"], ".4f", "failed"), str(s["grid_runs"]), str(s["failed"])]


def print_summary(rows: list[dict], markdown: bool) -> None:
    summary = core.summarize(rows)
    if markdown:
        print("| " + " | ".join(SUMMARY_COLUMNS) + " |")
        print("|" + "---|" * len(SUMMARY_COLUMNS))
        for s in summary:
            print("| " + " | ".join(_summary_cells(s)) + " |")
        return
    table = Table(title="summary: regret = planner bpb / best fixed recipe's bpb")
    for column in SUMMARY_COLUMNS:
        table.add_column(column, justify="left" if "recipe" in column else "right")
    for s in summary:
        table.add_row(*_summary_cells(s))
    console.print(table)


def print_machine(info: dict | None) -> None:
    if info:
        console.print(f"CPU: {info.get('model')}; flags: {' '.join(info.get('flags', [])) or 'none of interest'}; "
                      f"{info.get('usable_cores')}/{info.get('cpu_count')} cores usable; "
                      f"jax {info.get('jax')} ({info.get('backend')})")


def oracle(args, out: Path) -> list[dict]:
    rows = []
    for budget in args.budgets.split(","):
        for corpus in corpora(args.corpus, out):
            if args.only_cell and args.only_cell not in (f"{budget}:{corpus[0]}", f"{budget}:{corpus[1]}"):
                continue
            cell = oracle_cell(out, budget, corpus, args.grid, args.extra)
            print_cell(cell)
            rows += cell
    if not rows:
        raise SystemExit(f"--only-cell {args.only_cell} matched no BUDGET:CORPUS of --budgets and --corpus")
    print_summary(rows, args.markdown)
    return rows


# ----------------------------------------------------------------------------- stress

@contextlib.contextmanager
def busy_core(report: dict):
    """A busy-loop Python process, pinned to core 0 when taskset exists, for the whole block; its
    CPU time (user + system, from the kernel's accounting at reaping) goes into report['busy_cpu_s']."""
    loop = [sys.executable, "-c", "while True: pass"]
    proc = subprocess.Popen((["taskset", "-c", "0"] if shutil.which("taskset") else []) + loop)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGKILL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = status
        report["busy_cpu_s"] = usage.ru_utime + usage.ru_stime


def stale_cache(cache: Path, factor: float) -> int:
    """Divides every measured step_s in cache/calibration.json by `factor`; returns how many."""
    path = cache / "calibration.json"
    table = json.loads(path.read_text())
    path.write_text(json.dumps(core.scale_step_times(table, factor), indent=1))
    return core.count_step_times(table)


def stress_budget(args, out: Path, budget: str, corpus: tuple[str, str]) -> list[dict]:
    rows, extra = [], args.extra
    if shutil.which("taskset"):
        rows.append(_run(out, budget, corpus, "one core", "taskset -c 0", f"stress-{budget}-onecore", [], extra,
                         prefix=("taskset", "-c", "0")))
    else:
        console.print("[yellow]skipping the one-core case: `taskset` is missing; install util-linux "
                      "(apt-get install util-linux)[/]")
    report: dict = {}
    with busy_core(report):
        row = _run(out, budget, corpus, "busy core", "busy loop on core 0", f"stress-{budget}-busy", [], extra)
    rows.append(row | {"label": f"{row['label']} (busy process: {report['busy_cpu_s']:.1f} CPU s)"})
    cache = out / "stale-cache"
    env = {"PUFFERFISH_CACHE": str(cache)}
    rows.append(_run(out, budget, corpus, "cache fill", "fresh cache", f"stress-{budget}-fill", [], extra, env=env))
    if (cache / "calibration.json").exists():
        n = stale_cache(cache, STRESS_FACTOR)
        console.print(f"[dim]divided {n} cached step times by {STRESS_FACTOR:g}[/]")
        rows.append(_run(out, budget, corpus, "stale cache", f"step_s / {STRESS_FACTOR:g} ({n} entries)",
                         f"stress-{budget}-stale", [], extra, env=env))
    else:
        console.print("[red]the fill run left no calibration.json; the stale-cache case is skipped[/]")
    return rows


def stress(args, out: Path) -> list[dict]:
    corpus = corpora(args.corpus[:1], out)[0]
    rows = []
    for budget in args.budgets.split(","):
        rows += stress_budget(args, out, budget, corpus)
    table = Table(title=f"stress on {corpus[0]}: pass = no error and wall within "
                        f"{PASS_RANGE[0]:.0%}-{PASS_RANGE[1]:.0%} of the budget")
    for column in ("case", "budget", "wall / budget", "pass", "val bpb", "detail"):
        table.add_column(column, justify="left" if column in ("case", "detail") else "right")
    for r in rows:
        fraction = r["wall"] / parse_duration(r["budget"])
        r["passed"] = r["status"] == "ok" and PASS_RANGE[0] <= fraction <= PASS_RANGE[1]
        table.add_row(r["kind"], r["budget"], f"{fraction:.1%}", "pass" if r["passed"] else "FAIL",
                      _fmt(r.get("val_bpb"), ".4f"), r["label"] if r["status"] == "ok" else r["error"][:80])
    console.print(table)
    return rows


# ----------------------------------------------------------------------------- default: measured vs seed

def planners(args, out: Path) -> list[dict]:
    corpus = corpora(args.corpus[:1], out)[0]
    table = Table(title=f"planner benchmark on {corpus[0]} (wall time from launch to exit)")
    for column in ("budget", "planner", "wall / budget", "model", "batch", "tokens", "val bpb", "seed / measured bpb"):
        table.add_column(column, justify="right")
    rows = []
    for budget in args.budgets.split(","):
        found = {}
        for planner in ("measured", "seed"):
            found[planner] = row = _run(out, budget, corpus, planner if planner == "seed" else "planner", planner,
                                        f"{budget}-{planner}", [f"budget.planner={planner}"], args.extra)
            rows.append(row)
            if row["status"] != "ok":
                table.add_row(budget, planner, "", "", "", "", f"failed: {row['error'][:50]}", "")
                continue
            layers, d_model = row["recipe"]["shape"][:2]
            both = planner == "seed" and found["measured"]["status"] == "ok"
            ratio = f"{row['val_bpb'] / found['measured']['val_bpb']:.3f}" if both else ""
            table.add_row(budget, planner, f"{row['wall'] / row['budget_s']:.1%}", f"{layers} x d{d_model}",
                          str(row["recipe"]["batch"]), f"{row['tokens']:,}", f"{row['val_bpb']:.4f}", ratio)
    console.print(table)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--oracle", action="store_true", help="planner vs a grid of fixed recipes vs seed, per cell")
    mode.add_argument("--stress", action="store_true", help="one core, a busy core, a 3x stale calibration cache")
    mode.add_argument("--combine", nargs="+", metavar="JSON", help="merge --json outputs and print the summary")
    parser.add_argument("--budgets", default=None, help="comma-separated (default 2m,5m,10m; --stress: 2m,5m)")
    parser.add_argument("--corpus", action="append", default=None,
                        help="a data.corpus value per cell, repeatable; @NAME = built-in NAME passed as a file "
                             "(default: wiki; --oracle: wiki and @shakespeare)")
    parser.add_argument("--out", default="", help="where the runs go (default: a temporary folder)")
    parser.add_argument("--grid", type=int, default=core.DEFAULT_GRID, help="at most this many fixed recipes per cell")
    parser.add_argument("--only-cell", default="", metavar="BUDGET:CORPUS",
                        help="run only this cell, e.g. 2m:wiki, or 2m:shakespeare-file for --corpus @shakespeare")
    parser.add_argument("--json", default="", metavar="PATH", help="write the machine and every row here")
    parser.add_argument("--markdown", action="store_true", help="print the summary as a markdown table")
    parser.add_argument("--extra", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every run, e.g. data.vocab_size=512 model.seq_len=64")
    args = parser.parse_args(argv)
    args.budgets = args.budgets or ("2m,5m" if args.stress else "2m,5m,10m")
    args.corpus = args.corpus or (["wiki", "@shakespeare"] if args.oracle else ["wiki"])
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.combine:
        merged = core.combine([json.loads(Path(p).read_text()) for p in args.combine])
        print_machine(merged["machine"])
        print_summary(merged["rows"], args.markdown)
        return
    info = core.machine()
    print_machine(info)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_planner_")).resolve()
    console.print(f"runs in {out}")
    rows = (oracle if args.oracle else stress if args.stress else planners)(args, out)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=info, rows=rows), indent=1, default=str))


if __name__ == "__main__":
    main()
