#!/usr/bin/env python
"""Each recipe change of issue 17 against the recipe the issue started from, at equal wall-clock.

    python tools/bench_recipe.py [--budgets 2m,5m] [--seeds 3] [--variants muon,wsd,...]
                                 [--corpus wiki] [--second kjv] [--second-chars 400000]
                                 [--pin KEY=VALUE ...] [--out DIR] [--json PATH]
    python tools/bench_recipe.py --step-cost [2x128:8192:16:256] [--steps 10]

For each budget: the planner chooses the shape once for the baseline recipe (in this process, as
`just plan` would); that shape (layers, width, heads, batch, dtype, context) is then pinned on
the command line of every run, so every variant trains the same model for the same budget and
only the recipe differs (the planner still fits the step count to the clock). `--pin` gives the
shape instead of planning it. Two rows are planned by each run itself, as `just train` would plan
them: `default` (today's recipe, whose planner knows Muon's larger critical batch) and
`best_replan`. Every run is a real `python -m pufferfish_jax train budget=B`
subprocess timed from launch to exit (tools/bench_planner_core.train_run), seeds 0..N-1.

Each run is scored twice: the final val bpb on the corpus's held-out split (outcome.json), and the
bpb on the first --second-chars characters of a second text it never trained on (--second, default
the King James Bible against a Wikipedia-trained model). The table gives, per budget and variant,
the median over seeds, the spread (max - min) and the ratio of the medians to the `baseline`'s
measured in the same invocation: the issue's starting recipe (AdamW at 3e-3, cosine decay, SwiGLU,
tied embeddings), its keys pinned, so that it stays the reference as the defaults move. The
`default` variant is today's default recipe: the baseline's pinned keys set back to their defaults.

After the single changes (in --variants order) come `best`, every single change whose median beat
the baseline on both texts (the better of exclusive ones such as the two vocabularies), combined,
at the pinned shape, and `best_replan`, the same recipe with the planner free to re-choose the
shape. Nothing is fitted or tuned here; every number is a run's. Needs a quiet machine: the
budget is wall-clock, so anything else running skews the step counts (docs/recipe.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_planner_core as core  # noqa: E402

from pufferfish_jax.config import defaults, flatten, parse_duration  # noqa: E402

console = Console(width=170)

# The starting recipe, where today's defaults differ from it.
BASELINE_KEYS = ["train.schedule=cosine", "train.optimizer=adamw", "train.lr=0.003"]

# name -> (overrides, the key it sets: variants that set the same key exclude each other in `best`)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "baseline": (BASELINE_KEYS, ""),
    "default": ([f"{key}={flatten(defaults())[key]}" for key, _ in (k.split("=") for k in BASELINE_KEYS)], ""),
    "muon": (["train.optimizer=muon", "train.lr=0"], "train.optimizer"),
    "wsd": (["train.schedule=wsd"], "train.schedule"),
    "qk_norm": (["model.qk_norm=true"], "model.qk_norm"),
    "zero_init": (["model.zero_init_out=true"], "model.zero_init_out"),
    "relu2": (["model.mlp=relu2"], "model.mlp"),
    "softcap": (["model.logit_softcap=15"], "model.logit_softcap"),
    "untied": (["model.tie_embeddings=false"], "model.tie_embeddings"),
    "vocab2048": (["data.vocab_size=2048"], "data.vocab_size"),
    "vocab4096": (["data.vocab_size=4096"], "data.vocab_size"),
}
BASELINE, DEFAULT = "baseline", "default"
COMBINED = ("best", "best_replan")


def variant(name: str) -> tuple[list[str], str]:
    """(overrides, key) of a named variant, or of an ad-hoc one written as its overrides,
    `KEY=VALUE[+KEY=VALUE...]` (e.g. `model.init_std=0.05+train.schedule=wsd`), so a lead can be
    measured before it earns a name."""
    if name in VARIANTS:
        return VARIANTS[name]
    overrides = name.split("+")
    return overrides, overrides[0].split("=", 1)[0]


def on_baseline(overrides: list[str]) -> list[str]:
    """`overrides` on top of the baseline's keys (a later override wins): every change is measured
    against the recipe the issue started from, whatever today's defaults are."""
    return [*VARIANTS[BASELINE][0], *overrides]


def plan_shape(budget: str, corpus: str, recipe: list[str]) -> list[str]:
    """The planner's shape at this budget for `recipe`'s overrides, as pinning overrides. Planning
    also fills the calibration cache for that recipe's step, so a timed run that plans for itself
    measures nothing, as a second `just train` on the same machine would."""
    from pufferfish_jax import config as config_lib, session

    cfg, user_keys = config_lib.from_command_line([f"budget={budget}", f"data.corpus={corpus}", *recipe])
    _, plan = session.prepare(cfg, user_keys, time.time(), session.start(cfg))
    chosen = core.plan_recipe(plan.to_dict())
    console.print(f"[bold]{budget}[/]: for {' '.join(recipe) or 'the defaults'}, the planner chose "
                  f"{core.recipe_label(dict(chosen, seq_len=plan.seq_len))}")
    return core.recipe_overrides(dict(chosen, seq_len=plan.seq_len))


def warm_data(corpus: str, variants: list[str]) -> None:
    """Tokenizer and token stream of every vocabulary the variants use, before any timed run: the
    budget counts data preparation, and a tokenizer trained inside one seed's budget would cost that
    seed alone (the cache serves the rest)."""
    from pufferfish_jax import config as config_lib
    from pufferfish_jax.data.prepare import prepare_data

    for name in variants:
        data_keys = [o for o in variant(name)[0] if o.startswith("data.")]
        cfg, _ = config_lib.from_command_line(["steps=1", f"data.corpus={corpus}", *data_keys])
        prepare_data(cfg.data, config_lib.cache_dir(cfg))


def second_text_bpb(run_dir: str, source: str, max_chars: int) -> float | None:
    """bpb of the run's final checkpoint on `source` (its first max_chars characters)."""
    from pufferfish_jax import session

    restored = session.restore(run_dir)
    train_tokens = session.training_data(restored).train_tokens
    return session.evaluate_text(restored, source, train_tokens=train_tokens, max_chars=max_chars).val_bpb


def run_seed(args, out: Path, budget: str, name: str, overrides: list[str], pin: list[str], seed: int) -> dict:
    """One seed of one variant: its row, with both bpbs (None where the run failed)."""
    label = f"{budget}-{name}-s{seed}"
    console.print(f"[dim]running {label} ...[/]")
    row = core.train_run(label, [f"budget={budget}", f"data.corpus={args.corpus}", f"train.seed={seed}", *pin,
                                 *overrides], out, timeout_s=2 * parse_duration(budget) + 300)
    row.update(budget=budget, variant=name, seed=seed, second_bpb=None)
    if row["status"] == "ok":
        row["second_bpb"] = second_text_bpb(row["run_dir"], args.second, args.second_chars)
    console.print(f"[dim]  -> {row['status']} in {row['wall']:.1f} s, val bpb {row.get('val_bpb')}, "
                  f"{args.second} bpb {row['second_bpb']} {row.get('error', '')}[/]")
    return row


def interleaved(args, out: Path, budget: str, variants: dict[str, list[str]], pin: dict[str, list[str]]) -> list[dict]:
    """Every seed of every variant, seed by seed (seed 0 of each variant, then seed 1, ...): a
    machine whose speed drifts over the hours slows every arm alike, where running one variant's
    seeds together charged the drift to whichever ran later (at 5m the WSD runs, which ran after
    the baseline's, trained 12-17 % fewer steps)."""
    return [run_seed(args, out, budget, name, overrides, pin[name], seed)
            for seed in range(args.seeds) for name, overrides in variants.items()]


def medians(rows: list[dict], budget: str, variant: str) -> dict:
    """Median and spread (max - min) over the seeds that finished, per score."""
    ok = [r for r in rows if r["budget"] == budget and r["variant"] == variant and r["status"] == "ok"]
    out = dict(n=len(ok), failed=sum(1 for r in rows if r["budget"] == budget and r["variant"] == variant) - len(ok))
    for score in ("val_bpb", "second_bpb"):
        values = [r[score] for r in ok if r[score] is not None]
        out[score] = statistics.median(values) if values else None
        out[f"{score}_spread"] = max(values) - min(values) if values else None
    walls = [r["wall"] / parse_duration(budget) for r in ok]
    out["wall_fraction"] = statistics.median(walls) if walls else None
    return out


def winners(rows: list[dict], budget: str, singles: list[str]) -> list[str]:
    """The single changes whose median beat the baseline's on both texts, the best of each key
    (`default` is today's recipe, not a single change)."""
    base = medians(rows, budget, BASELINE)
    best_by_key: dict[str, tuple[float, str]] = {}
    for name in singles:
        m = medians(rows, budget, name)
        if name in (BASELINE, DEFAULT) or None in (m["val_bpb"], m["second_bpb"], base["val_bpb"], base["second_bpb"]):
            continue
        if m["val_bpb"] < base["val_bpb"] and m["second_bpb"] < base["second_bpb"]:
            key = variant(name)[1]
            if key not in best_by_key or m["val_bpb"] < best_by_key[key][0]:
                best_by_key[key] = (m["val_bpb"], name)
    return [name for _, name in best_by_key.values()]


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def print_table(rows: list[dict], budgets: list[str], variants: list[str], second: str, combos: dict) -> None:
    table = Table(title="Recipe changes at equal wall-clock (median over seeds; spread = max - min)")
    for column in ("budget", "variant", "runs", "wall/budget", "val bpb", "spread", "ratio",
                   f"{second} bpb", "spread", "ratio"):
        table.add_column(column, justify="left" if column in ("budget", "variant") else "right")
    for budget in budgets:
        base = medians(rows, budget, BASELINE)
        for name in variants:
            m = medians(rows, budget, name)
            if not m["n"] and not m["failed"]:
                continue
            ratio = {s: m[s] / base[s] if m[s] and base[s] else None for s in ("val_bpb", "second_bpb")}
            label = f"{name} ({', '.join(combos[budget])})" if name in COMBINED and combos.get(budget) else name
            table.add_row(budget, label, f"{m['n']}" + (f" ({m['failed']} failed)" if m["failed"] else ""),
                          _fmt(m["wall_fraction"], ".1%"), _fmt(m["val_bpb"], ".4f"), _fmt(m["val_bpb_spread"], ".4f"),
                          _fmt(ratio["val_bpb"], ".3f"), _fmt(m["second_bpb"], ".4f"),
                          _fmt(m["second_bpb_spread"], ".4f"), _fmt(ratio["second_bpb"], ".3f"))
    console.print(table)


def step_cost(shape: str, steps: int) -> None:
    """Median seconds per train step, AdamW against Muon, at one shape LxD:vocab:batch:seq (the
    planner's small shapes by default): Muon's Newton-Schulz iterations are a fixed cost per
    matrix that the small models of short budgets feel most. The two steps alternate, so a load
    that comes and goes on a shared machine hits both alike."""
    import jax
    import numpy as np

    from pufferfish_jax import sharding
    from pufferfish_jax.config import apply_overrides, defaults
    from pufferfish_jax.model.spec import ModelSpec
    from pufferfish_jax.train.state import create_state, make_optimizer
    from pufferfish_jax.train.step import make_train_step

    layers_width, vocab, batch, seq = shape.split(":")
    layers, width = layers_width.split("x")
    mesh, runs = sharding.single_device_mesh(), {}
    window = None
    for optimizer in ("adamw", "muon"):
        cfg = apply_overrides(defaults(), [f"model.num_layers={layers}", f"model.d_model={width}", "model.num_heads=4",
                                           "model.num_kv_heads=2", f"model.vocab_size={vocab}", f"model.seq_len={seq}",
                                           f"train.batch_size={batch}", f"train.optimizer={optimizer}"])
        spec, opt = ModelSpec.from_config(cfg.model), make_optimizer(cfg.train)
        window = np.random.default_rng(0).integers(0, spec.vocab_size, (int(batch), spec.seq_len + 1)).astype(np.int32)
        state, step = create_state(spec, opt, 0, mesh), make_train_step(spec, opt, 1, mesh)
        state, _ = jax.block_until_ready(step(state, window, np.float32(1e-3)))  # compile
        runs[optimizer] = [state, step, []]
    for _ in range(steps):
        for run in runs.values():
            started = time.perf_counter()
            run[0], _ = jax.block_until_ready(run[1](run[0], window, np.float32(1e-3)))
            run[2].append(time.perf_counter() - started)
    times = {name: statistics.median(run[2]) for name, run in runs.items()}
    for name, run in runs.items():
        console.print(f"{shape} {name}: median {times[name] * 1e3:.1f} ms/step over {steps} steps "
                      f"(min {min(run[2]) * 1e3:.1f}, max {max(run[2]) * 1e3:.1f})")
    console.print(f"Muon / AdamW step time: {times['muon'] / times['adamw']:.3f} (medians); "
                  f"{min(runs['muon'][2]) / min(runs['adamw'][2]):.3f} (fastest steps)")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", default="2m,5m")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default=",".join([*VARIANTS, *COMBINED]),
                        help=f"comma-separated, from {', '.join([*VARIANTS, *COMBINED])}, or KEY=VALUE[+KEY=VALUE] "
                             "overrides as a variant of their own; the baseline always runs")
    parser.add_argument("--corpus", default="wiki")
    parser.add_argument("--second", default="kjv", help="the second evaluation text (never trained on)")
    parser.add_argument("--second-chars", type=int, default=400_000)
    parser.add_argument("--pin", nargs="*", default=None, help="KEY=VALUE shape overrides instead of planning once")
    parser.add_argument("--out", default="runs/bench_recipe")
    parser.add_argument("--json", default="", help="also write every row and the machine here")
    parser.add_argument("--step-cost", nargs="?", const="2x128:8192:16:256", default=None, metavar="LxD:V:B:T",
                        help="instead of the benchmark: median step time of AdamW against Muon at this shape")
    parser.add_argument("--steps", type=int, default=10, help="--step-cost: timed steps per optimizer")
    args = parser.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS and v not in COMBINED and "=" not in v]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}")
    args.variants = [BASELINE] + [v for v in names if v != BASELINE]
    return args


def main(argv=None) -> int:
    from pufferfish_jax.errors import UserError

    try:
        return bench(parse_args(argv))
    except UserError as e:  # a budget too small to plan, a bad corpus: one line, as the CLI does
        console.print(f"[red]error:[/] {e}")
        return 2


def bench(args) -> int:
    out, budgets = Path(args.out), [b.strip() for b in args.budgets.split(",")]
    host = core.machine()
    console.print(f"CPU: {host['model']} ({host['usable_cores']} usable cores); flags: {' '.join(host['flags'])}; "
                  f"jax {host['jax']} on {host['backend']}")
    if args.step_cost:
        step_cost(args.step_cost, args.steps)
        return 0
    warm_data(args.corpus, args.variants)
    rows, combos = [], {}
    for budget in budgets:
        pin = args.pin if args.pin is not None else plan_shape(budget, args.corpus, on_baseline([]))
        singles = [v for v in args.variants if v not in COMBINED]
        free = DEFAULT in singles and args.pin is None  # today's recipe as `just train` runs it: planned
        if free:
            plan_shape(budget, args.corpus, [])
        rows += interleaved(args, out, budget, {name: on_baseline(variant(name)[0]) for name in singles},
                            {name: [] if free and name == DEFAULT else pin for name in singles})
        if set(COMBINED) & set(args.variants):
            combos[budget] = winners(rows, budget, singles)
            overrides = on_baseline([o for name in combos[budget] for o in variant(name)[0]])
            console.print(f"[bold]{budget}[/]: best combination: {', '.join(combos[budget]) or 'none beat the baseline'}")
            chosen = [c for c in COMBINED if c in args.variants and combos[budget]]
            rows += interleaved(args, out, budget, {name: overrides for name in chosen},
                                {"best": pin, "best_replan": []})
        print_table(rows, budgets, args.variants, args.second, combos)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(machine=host, combos=combos, rows=rows), indent=1, default=str))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
