"""Helpers of tools/bench_planner.py: the recipe grid, the timed train subprocess, the rows, the
summary (regret), the stale-calibration edit, merging --json outputs and the machine description.

Nothing here fits or tunes anything: the grid is a fixed pattern around the planner's choice plus
the earlier winners that docs/budget.md records, and every number printed comes from a run.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pufferfish_jax.budget.planner import BATCH_SIZES, LADDER  # noqa: E402
from pufferfish_jax.model.spec import DTYPES  # noqa: E402

# The earlier winners: docs/budget.md, "Measured: the planner against the white paper's tiers" (the
# measured planner chose 2 x d128 at batch 8 for 2m and batch 16 for 5m and 10m, seq 256, bf16, on
# the wiki corpus), and docs/perf.md ("the planner chose batch 8 over 16 ... 1.7315" at 2m).
WINNERS = (dict(shape=(2, 128, 4, 2), batch=8, dtype="bfloat16", seq_len=256),
           dict(shape=(2, 128, 4, 2), batch=16, dtype="bfloat16", seq_len=256))
DEFAULT_GRID = 8
SHAPE_KEYS = ("num_layers", "d_model", "num_heads", "num_kv_heads")
INTERESTING_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni",
                     "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve")


# ----------------------------------------------------------------------------- recipes and the grid

def recipe_label(r: dict) -> str:
    layers, d_model, heads, kv = r["shape"]
    seq = f" seq {r['seq_len']}" if r.get("seq_len") else ""
    dtype = {"bfloat16": "bf16", "float32": "f32"}.get(r["dtype"], r["dtype"])
    return f"{layers} x d{d_model} h{heads}/{kv} b{r['batch']} {dtype}{seq}"


def recipe_overrides(r: dict) -> list[str]:
    """The command-line keys that make a fixed recipe: the planner keeps them, fitting only steps."""
    out = [f"model.{k}={v}" for k, v in zip(SHAPE_KEYS, r["shape"])]
    out += [f"train.batch_size={r['batch']}", f"model.dtype={r['dtype']}"]
    return out + ([f"model.seq_len={r['seq_len']}"] if r.get("seq_len") else [])


def plan_recipe(plan: dict) -> dict:
    m = plan["model"]
    return dict(shape=tuple(m[k] for k in SHAPE_KEYS), batch=plan["batch_size"], dtype=m["dtype"])


def _rung(shape: tuple) -> int:
    """The ladder index of `shape`, or of the rung nearest in layers x width^2 if it is off the ladder."""
    if tuple(shape) in LADDER:
        return LADDER.index(tuple(shape))
    size = shape[0] * shape[1] ** 2
    return min(range(len(LADDER)), key=lambda i: abs(LADDER[i][0] * LADDER[i][1] ** 2 - size))


def _key(r: dict, seq_len: int) -> tuple:
    return tuple(r["shape"]), r["batch"], r["dtype"], r.get("seq_len") or seq_len


def grid_recipes(plan: dict, limit: int = DEFAULT_GRID) -> list[dict]:
    """Fixed recipes around the plan, most telling first, deduplicated, at most `limit`: the plan's
    own recipe, one ladder rung smaller/larger, batch halved/doubled, the other dtype, the earlier
    winners (so the default 8 always hold them), then the combinations and two rungs away."""
    center = plan_recipe(plan)
    rung = _rung(center["shape"])
    other = [d for d in DTYPES if d != center["dtype"]][:1]

    def vary(dr=0, bf=1.0, dtype=None):
        i, batch = rung + dr, int(center["batch"] * bf)
        if not 0 <= i < len(LADDER) or not 1 <= batch <= BATCH_SIZES[-1] or center["batch"] * bf != batch:
            return None
        return dict(shape=LADDER[i], batch=batch, dtype=dtype or center["dtype"])

    order = [center, vary(-1), vary(+1), vary(bf=0.5), vary(bf=2)]
    order += [vary(dtype=d) for d in other] + list(WINNERS)
    order += [vary(-1, 2), vary(+1, 0.5), vary(-1, 0.5), vary(+1, 2)]
    order += [vary(bf=b, dtype=d) for d in other for b in (0.5, 2)]
    order += [vary(-2), vary(+2), vary(bf=0.25), vary(bf=4)]
    seen, out = set(), []
    for r in order:
        if r is not None and (k := _key(r, plan.get("seq_len", 0))) not in seen:
            seen.add(k)
            out.append(dict(r, shape=tuple(r["shape"])))
    return out[:limit]


# ----------------------------------------------------------------------------- one timed run

def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def train_run(name: str, overrides: list[str], out: Path, *, prefix: tuple = (), env: dict | None = None,
              timeout_s: float | None = None) -> dict:
    """One real `python -m pufferfish_jax train` subprocess, timed from launch to exit with
    PUFFERFISH_T0 set at launch (as `just train` does). Its output goes to out/logs/NAME.log; a run
    dir of the same name left by an earlier benchmark is removed first, so nothing resumes."""
    run_dir = out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.time()
    full_env = {**os.environ, **(env or {}), "PUFFERFISH_T0": repr(started), "PYTHONPATH": str(ROOT)}
    cmd = [*prefix, sys.executable, "-m", "pufferfish_jax", "train", *overrides, f"run_dir={run_dir}"]
    try:
        result = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout_s)
        rc, stdout, stderr = result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = -9, e.stdout or "", f"killed after {timeout_s:.0f} s (timeout)"
        stdout = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout
    wall = time.time() - started
    (out / "logs" / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{stdout}\n--- stderr\n{stderr}")
    row = dict(name=name, run_dir=str(run_dir), wall=wall, rc=rc, overrides=overrides)
    return row | read_run(run_dir, rc, stderr)


def read_run(run_dir: Path, rc: int, stderr: str) -> dict:
    """What plan.json and outcome.json say; status 'failed' with the one-line error otherwise."""
    plan_path, outcome_path = run_dir / "plan.json", run_dir / "outcome.json"
    if rc != 0 or not outcome_path.exists():
        return dict(status="failed", error=_last_line(stderr) if rc != 0 else "no outcome.json")
    plan, outcome = json.loads(plan_path.read_text()), json.loads(outcome_path.read_text())
    return dict(status="ok", error="", recipe=plan_recipe(plan), seq_len=plan.get("seq_len"),
                budget_s=plan.get("budget_s") or outcome.get("budget_s"), planning_s=plan.get("planning_s"),
                tokens=outcome["tokens"], steps=outcome["steps"], val_bpb=outcome["val_bpb"],
                val_bpb_se=outcome.get("val_bpb_se"), unigram_bpb=outcome.get("unigram_bpb"))


# ----------------------------------------------------------------------------- summary and merging

def regret(planner_bpb: float | None, grid_best_bpb: float | None) -> float | None:
    """Planner bpb over the best fixed recipe's bpb: 1.0 = the planner found the grid's best,
    above 1 = it lost to some recipe, below 1 = it beat every recipe tried."""
    if not planner_bpb or not grid_best_bpb:
        return None
    return planner_bpb / grid_best_bpb


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (budget, corpus) cell, in first-seen order: planner, grid best, regret, seed."""
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["budget"], row["corpus"]), []).append(row)
    out = []
    for (budget, corpus), cell in cells.items():
        ok = [r for r in cell if r.get("status") == "ok"]
        first = lambda kind: next((r for r in ok if r["kind"] == kind), None)  # noqa: E731
        planner, seed = first("planner"), first("seed")
        grid = sorted((r for r in ok if r["kind"] == "grid"), key=lambda r: r["val_bpb"])
        best = grid[0] if grid else None
        out.append(dict(budget=budget, corpus=corpus,
                        planner_bpb=planner and planner["val_bpb"], planner_recipe=planner and planner["label"],
                        grid_best_bpb=best and best["val_bpb"], grid_best_recipe=best and best["label"],
                        regret=regret(planner and planner["val_bpb"], best and best["val_bpb"]),
                        seed_bpb=seed and seed["val_bpb"], grid_runs=len(grid),
                        failed=sum(r.get("status") != "ok" for r in cell)))
    return out


def combine(documents: list) -> dict:
    """Merges --json outputs (each {"machine": ..., "rows": [...]} or a bare list of rows): rows
    concatenated in order, a later row replacing an earlier one of the same budget, corpus, kind
    and slot (the label it was launched under: a cell run again); the first document's machine description is kept."""
    merged: dict[tuple, dict] = {}
    machine = None
    for doc in documents:
        rows = doc if isinstance(doc, list) else doc.get("rows", [])
        if machine is None and isinstance(doc, dict):
            machine = doc.get("machine")
        for row in rows:
            key = (row["budget"], row["corpus"], row["kind"], row.get("slot", row["label"]))
            merged.pop(key, None)
            merged[key] = row
    return dict(machine=machine, rows=list(merged.values()))


# ----------------------------------------------------------------------------- the stale calibration cache

def scale_step_times(table: dict, factor: float) -> dict:
    """A copy of calibration.json's table with every measured step time divided by `factor`:
    table[machine][family][shape]["measurement"]["step_s"]; nothing else changes (the matmul
    rates, compile times, FLOPs and keys stay)."""
    out = json.loads(json.dumps(table))
    for sections in out.values():
        for entries in sections.values() if isinstance(sections, dict) else ():
            for entry in entries.values() if isinstance(entries, dict) else ():
                measurement = entry.get("measurement") if isinstance(entry, dict) else None
                if isinstance(measurement, dict) and "step_s" in measurement:
                    measurement["step_s"] = measurement["step_s"] / factor
    return out


def count_step_times(table: dict) -> int:
    return sum(1 for sections in table.values() for entries in sections.values() if isinstance(entries, dict)
               for entry in entries.values() if isinstance(entry, dict) and "step_s" in entry.get("measurement", {}))


# ----------------------------------------------------------------------------- the machine

def parse_cpuinfo(text: str) -> dict:
    """Model name and the SIMD flags that decide bf16 vs float32 speed, from /proc/cpuinfo text."""
    model, flags = "", set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif name in ("flags", "features") and not flags:
            flags = set(value.split())
    return dict(model=model or platform.processor() or platform.machine(),
                flags=[f for f in INTERESTING_FLAGS if f in flags])


def machine() -> dict:
    """CPU model, SIMD flags, core counts and jax version; a hardware.cpu_info() is used if the
    package ever grows one, else /proc/cpuinfo is parsed here."""
    import jax

    from pufferfish_jax.budget import hardware
    info = None
    if callable(getattr(hardware, "cpu_info", None)):
        try:
            info = dict(hardware.cpu_info())
        except Exception:  # an optional helper; fall back to our own parser
            info = None
    if info is None:
        try:
            info = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
        except OSError:
            info = parse_cpuinfo("")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dict(info, cpu_count=os.cpu_count(), usable_cores=affinity, jax=jax.__version__,
                backend=jax.default_backend())
