"""report.md: one page that says what was run, on what, how the run kept its plan, and how good it is.

Everything comes from the records the stages left in the run dir, so the report can be rewritten
at any time without touching the model, and it reads on its own (the loss-curve PNG sits beside it).
"""

from __future__ import annotations

import datetime
import json
import math
import re
import statistics
from pathlib import Path

import ml_collections

from pipelines.records import HELD_OUT, STAGE_NAMES, read_json
from pipelines.runner import load_manifest
from pufferfish_jax import config as config_lib
from pufferfish_jax import rundir
from pufferfish_jax.budget.planner import apply_plan
from pufferfish_jax.train.metrics import read_metrics

PLOT = "loss_curves.png"


def _cell(value) -> str:
    """A value as a markdown table cell."""
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows] + [""]


def _seconds(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:,.1f} s" if value < 600 else f"{value / 60:,.1f} min"


def _fenced(text: str, info: str = "") -> list[str]:
    """A code block whose fence is longer than any backtick run in `text`."""
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return [fence + info, text, fence, ""]


def elapsed_times(records: list[dict]) -> list[float]:
    """Seconds since the run started, for every metrics record.

    Train records carry `elapsed_s` (every attempt of a resumed run counted); other records only a
    wall-clock `time`, placed on the same axis through the train record nearest in time, so a gap
    between an interrupted attempt and its resumption does not show as training time.
    """
    anchors = [(r["time"], r["time"] - r["elapsed_s"]) for r in records if "elapsed_s" in r]
    start = records[0]["time"] if records else 0.0
    out = []
    for r in records:
        if "elapsed_s" in r:
            out.append(r["elapsed_s"])
        elif anchors:
            out.append(r["time"] - min(anchors, key=lambda a: abs(a[0] - r["time"]))[1])
        else:
            out.append(r["time"] - start)
    return out


def plot_curves(records: list[dict], path: Path) -> None:
    """Train and val loss against tokens seen and against wall time, side by side."""
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas for PNG

    elapsed = elapsed_times(records)
    train = [(r, t) for r, t in zip(records, elapsed) if r["event"] == "train"]
    val = [(r, t) for r, t in zip(records, elapsed) if r["event"] == "eval"]
    loss_key = {"train": "loss", "eval": "val_loss"}
    fig = Figure(figsize=(11, 4), dpi=110, layout="constrained")
    for ax, axis in zip(fig.subplots(1, 2), ("tokens", "wall")):
        for points, label, style in ((train, "train loss", "-"), (val, "val loss", "o-")):
            if points:
                xs = [r["tokens"] if axis == "tokens" else t for r, t in points]
                ax.plot(xs, [r[loss_key[r["event"]]] for r, _ in points], style, label=label, markersize=4)
        ax.set_xlabel("tokens seen" if axis == "tokens" else "wall time since the start (s)")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("training and validation loss")
    fig.savefig(path, format="png")


def _plan_rows(plan: dict, outcome: dict, records: list[dict]) -> list[list]:
    m = plan["model"]
    steps_s = [r["step_s"] for r in records if r["event"] == "train" and r.get("step_s") and math.isfinite(r["step_s"])]
    compile_s = next((r["train_step_s"] for r in records if r["event"] == "compile"), None)
    budgeted = plan["mode"] == "budget"
    shape = f"{m['num_layers']} layers, d {m['d_model']}, {m['num_heads']} heads ({m['num_kv_heads']} kv), {m['dtype']}"
    tokens_per_step = plan["batch_size"] * plan["seq_len"]
    rows = [
        ["model", shape, shape],
        ["params", f"{plan['params']:,} ({plan['non_embedding_params']:,} non-embedding)", "same"],
        ["batch", f"{plan['batch_size']} x {plan['seq_len']} tokens", "same"],
        ["steps", f"{plan['steps']:,}", f"{outcome['steps']:,}"],
        ["tokens", f"{plan['tokens']:,}", f"{outcome['tokens']:,}"],
        ["step time", f"{plan['step_s'] * 1000:.0f} ms" if budgeted else "not predicted",
         f"{statistics.median(steps_s) * 1000:.0f} ms (median)" if steps_s else "n/a"],
        ["throughput", f"{tokens_per_step / plan['step_s']:,.0f} tokens/s" if budgeted else "not predicted",
         f"{tokens_per_step / statistics.median(steps_s):,.0f} tokens/s" if steps_s else "n/a"],
        ["compile", _seconds(plan["compile_s"]) if budgeted else "not predicted", _seconds(compile_s)],
    ]
    if budgeted:
        rows += [
            ["data and planning", _seconds(plan["planning_s"]), _seconds(plan["planning_s"])],
            ["training", _seconds(plan["train_s"]), "(re-fitted to the clock every step)"],
            ["evals, final save, margin", _seconds(plan["reserve_s"]), ""],
            ["**wall time**", f"budget {_seconds(plan['budget_s'])}",
             f"{_seconds(outcome['wall_s'])} ({outcome['wall_s'] / plan['budget_s']:.1%} of the budget)"],
        ]
    else:
        rows.append(["**wall time**", "no budget (fixed steps)", _seconds(outcome["wall_s"])])
    rows += [["val loss (nats/token)", "", f"{outcome['val_loss']:.4f}"],
             ["val bits per byte", "", f"{outcome['val_bpb']:.4f} (unigram {outcome['unigram_bpb']:.4f})"]]
    return rows


def write_report(run_dir: Path, cfg: ml_collections.ConfigDict) -> Path:
    manifest = load_manifest(run_dir)["stages"]
    corpus, tokens = read_json(run_dir, "corpus.json"), read_json(run_dir, "tokens.json")
    plan, outcome = read_json(run_dir, "train/plan.json"), read_json(run_dir, "train/outcome.json")
    records = read_metrics(run_dir / "train" / "metrics.jsonl")
    plot_curves(records, run_dir / PLOT)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Pipeline report: {run_dir.name}", "",
             f"Run dir `{run_dir}`, written {now}. Every figure below comes from the files beside this one.", ""]
    lines += _summary(plan, outcome, corpus)
    lines += _stages(manifest)
    lines += _hardware(read_json(run_dir, "hardware.json"))
    lines += _data(manifest, corpus, tokens)
    lines += _plan_and_outcome(plan, outcome, records)
    lines += _evaluation(read_json(run_dir, "eval.json"))
    lines += _samples(read_json(run_dir, "samples.json"))
    lines += _config(apply_plan(cfg, rundir.plan_from_dict(plan, str(run_dir / "train" / "plan.json"))))
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _summary(plan: dict, outcome: dict, corpus: dict) -> list[str]:
    """What was trained, how good it is, and whether it kept its budget."""
    lines: list[str] = []
    gain = 1 - outcome["val_bpb"] / outcome["unigram_bpb"]
    m = plan["model"]
    lines += ["## Summary", "",
              f"- A {m['num_layers']}-layer, d {m['d_model']} Llama-style model ({plan['params']:,} parameters) "
              f"trained on `{corpus['corpus']}` for {outcome['steps']:,} steps ({outcome['tokens']:,} tokens).",
              f"- Held-out: {outcome['val_loss']:.4f} nats/token, **{outcome['val_bpb']:.4f} bits per byte**, "
              f"{abs(gain):.0%} {'below' if gain >= 0 else 'above'} the unigram baseline ({outcome['unigram_bpb']:.4f}).",
              f"- Training ended {_seconds(outcome['wall_s'])} after the pipeline started (data, planning and "
              "compilation included)" + (f", within a {_seconds(plan['budget_s'])} budget." if plan["mode"] == "budget"
                                         else "; a fixed number of steps, no budget."),
              ""]
    return lines


def _stages(manifest: dict) -> list[str]:
    """Each stage: ran or skipped, how long it took."""
    lines: list[str] = []
    lines += ["## Stages", ""]
    stage_rows = []
    for name in STAGE_NAMES:
        entry = manifest.get(name, {})
        finished = entry.get("finished")
        when = datetime.datetime.fromtimestamp(finished, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if finished else ""
        status = "writing this report" if name == "report" else entry.get("status", "not run")
        stage_rows.append([name, status, _seconds(entry.get("seconds")) if entry.get("seconds") is not None else "", when])
    lines += _table(["stage", "status", "took", "finished (UTC)"], stage_rows)
    lines += ["A stage whose config keys and inputs are unchanged is skipped on the next run; `pipeline.json` "
              "holds the fingerprints.", ""]
    return lines


def _hardware(hw: dict) -> list[str]:
    """The machine the run trained on."""
    lines: list[str] = []
    lines += ["## Hardware", ""]
    lines += _table(["", ""], [
        ["devices", f"{hw['device_count']} x {hw['platform']} ({hw['device_kind']})"],
        ["memory", f"{hw['memory_bytes'] / 2**30:.1f} GiB per device" + (" (host RAM)" if hw["platform"] == "cpu" else "")],
        ["host", f"{hw['cpu']}" + (f" ({' '.join(hw['cpu_features'])})" if hw.get("cpu_features") else "")
                 + f", {hw['host_cores']} cores"],
        ["software", f"Python {hw['python']}, JAX {hw['jax']}, {hw['os']}"],
    ])
    return lines


def _data(manifest: dict, corpus: dict, tokens: dict) -> list[str]:
    """The corpus, its split and the tokenizer."""
    lines: list[str] = []
    tok_summary = manifest.get("tokenizer", {}).get("summary", {})
    lines += ["## Data", ""]
    lines += _table(["", "train", "held out"], [
        ["source", corpus["corpus"], corpus["val_source"]],
        ["documents", f"{corpus['train_documents']:,}", f"{corpus['val_documents']:,}"],
        ["characters", f"{corpus['train_chars']:,}", f"{corpus['val_chars']:,}"],
        ["tokens", f"{tokens['train_tokens']:,}", f"{tokens['val_tokens']:,}"],
        ["tokenizer", f"{tok_summary.get('source', '')}, vocab {tokens['vocab_size']:,}, "
                      f"{tokens['bytes_per_token']:.2f} bytes per token", ""],
    ])
    return lines


def _plan_and_outcome(plan: dict, outcome: dict, records: list[dict]) -> list[str]:
    """The plan against what happened, and the loss curves."""
    lines: list[str] = []
    lines += ["## Plan and outcome", "",
              f"Planner `{plan['planner']}`. " + ("The budget counts from the start of the pipeline to the end of "
              "training. The loop re-fits the step count to the clock every step, so planned and actual steps "
              "differ by how far the real step time drifted from the measured one." if plan["mode"] == "budget"
              else "A fixed number of steps: nothing about time was predicted."), ""]
    lines += _table(["", "planned", "actual"], _plan_rows(plan, outcome, records))

    train_losses = [r["loss"] for r in records if r["event"] == "train"]
    lines += ["## Loss curves", "", f"![train and val loss against tokens and wall time]({PLOT})", "",
              f"Train loss {train_losses[0]:.3f} -> {train_losses[-1]:.3f} over the run; "
              f"held-out loss {outcome['val_loss']:.3f} at the end." if train_losses else "", ""]
    return lines


def _evaluation(evals: list[dict]) -> list[str]:
    """Bits per byte on every eval set against the unigram baseline."""
    lines: list[str] = []
    lines += ["## Evaluation", "",
              "Bits per byte = loss x tokens / (bytes x ln 2): comparable across tokenizers. The unigram baseline "
              "knows only the training split's token frequencies; a model must beat it. ± is the standard error "
              "over eval windows (taken as independent).", ""]
    lines += _table(["set", "source", "tokens", "loss (nats/token)", "bits per byte", "unigram bpb", "below unigram"],
                    [[r["name"], "the held-out split" if r["source"] == HELD_OUT else r["source"], f"{r['tokens']:,}",
                      f"{r['val_loss']:.4f}", _with_se(r), f"{r['unigram_bpb']:.4f}",
                      f"{1 - r['val_bpb'] / r['unigram_bpb']:.0%}"] for r in evals])
    return lines


def _with_se(row: dict) -> str:
    """bits per byte ± its standard error (an eval.json written before it had one: the value alone)."""
    se = row.get("val_bpb_se")
    return f"{row['val_bpb']:.4f}" + (f" ± {se:.4f}" if se is not None else "")


def _samples(samples: dict) -> list[str]:
    """The sampled continuations and their settings."""
    lines: list[str] = []
    s = samples["settings"]
    lines += ["## Samples", "",
              f"{s['max_new_tokens']} new tokens at most, temperature {s['temperature']}, top-k {s['top_k']}, "
              f"top-p {s['top_p']}, seed {s['seed']}. The prompt is in bold.", ""]
    for number, item in enumerate(samples["samples"], 1):
        lines += [f"**{number}. {_cell(item['prompt'])}**", ""] + _fenced(item["prompt"] + item["continuation"], "text")
    return lines


def _config(resolved: ml_collections.ConfigDict) -> list[str]:
    """The keys that differ from the defaults, and the whole resolved config."""
    lines: list[str] = []
    defaults = config_lib.flatten(config_lib.defaults())
    chosen = {k: v for k, v in config_lib.flatten(resolved).items() if v != defaults[k]}
    lines += ["## Config", "", "Keys that differ from the defaults (the planner's choices written in):", ""]
    lines += _table(["key", "value", "default"], [[f"`{k}`", repr(v), repr(defaults[k])] for k, v in chosen.items()])
    lines += ["<details><summary>The whole resolved config</summary>", ""] + \
        _fenced(json.dumps(resolved.to_dict(), indent=2), "json") + ["</details>", ""]
    return lines
