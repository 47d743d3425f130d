"""The training display: a live dashboard on a terminal, plain log lines anywhere else.

On a terminal a rich Live panel shows progress, loss and validation-loss sparklines over the whole
run, tokens/s, MFU, memory now and at its peak, elapsed time against the budget with the time
left, and a summary of any `moe.*` metrics. Anything else (a pipe, a file, CI) gets one plain line
every train.log_every steps and no control codes, so logs stay readable and greppable.

The panel is redrawn at most a few times a second: steps of a small model take milliseconds, and
the display must not slow the run it reports on.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections import defaultdict

import jax
from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

# The terminal faces' output: results on stdout, errors and warnings on stderr; no markup
# highlighting of numbers (a run's figures must read the same on a terminal and in a log).
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

SPARK_LEVELS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 40
REDRAW_S = 0.25


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.0f} MiB"


class History:
    """A run-long series in bounded memory: when full, neighbours are averaged pairwise and later
    points are averaged over twice as many steps, so the sparkline always spans the whole run."""

    def __init__(self, capacity: int = 4 * SPARK_WIDTH):
        self.values: list[float] = []
        self._capacity, self._stride, self._pending = capacity, 1, []

    def add(self, value: float) -> None:
        if not math.isfinite(value):
            return
        self._pending.append(value)
        if len(self._pending) < self._stride:
            return
        self.values.append(sum(self._pending) / len(self._pending))
        self._pending = []
        if len(self.values) >= self._capacity:
            self.values = [(a + b) / 2 for a, b in zip(self.values[::2], self.values[1::2])]
            self._stride *= 2


def sparkline(values: list[float], width: int = SPARK_WIDTH) -> str:
    """Block characters scaled between the series' min and max, averaged down to `width`."""
    values = [v for v in values if math.isfinite(v)]
    if len(values) > width:
        edges = [round(i * len(values) / width) for i in range(width + 1)]
        values = [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:])]
    if not values:
        return ""
    low, high = min(values), max(values)
    scale = (len(SPARK_LEVELS) - 1) / (high - low) if high > low else 0.0
    return "".join(SPARK_LEVELS[round((v - low) * scale)] for v in values)


def memory_usage() -> tuple[int, int, int, str]:
    """(bytes in use, peak bytes, limit, what was measured): the fullest accelerator's memory
    stats, or the process's resident set on CPU (whose peak the OS keeps)."""
    devices = [d for d in jax.local_devices() if d.platform != "cpu"]
    stats = []
    for device in devices:
        try:
            stats.append(device.memory_stats() or {})
        except Exception:  # a backend without memory stats
            pass
    if stats and any("bytes_in_use" in s for s in stats):
        fullest = max(stats, key=lambda s: s.get("bytes_in_use", 0))
        return (fullest.get("bytes_in_use", 0), fullest.get("peak_bytes_in_use", 0), fullest.get("bytes_limit", 0),
                f"{devices[0].platform} memory")
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * page
    except OSError:  # no procfs (macOS): the peak is the best known figure
        rss = 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return rss or peak, peak, page * os.sysconf("SC_PHYS_PAGES"), "RSS"


def moe_summary(metrics: dict[str, float]) -> list[str]:
    """`moe.{layer}.{name}` keys -> one phrase per name: the mean over layers and the layers at
    either extreme (a hot expert shows as a high max_load, a collapsed router as a low entropy).
    Keys without a layer number are shown as they are."""
    by_name: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for key, value in sorted(metrics.items()):
        parts = key.split(".")
        if len(parts) == 3 and parts[1].isdigit():
            by_name[parts[2]].append((parts[1], value))
        else:
            by_name[key.removeprefix("moe.")].append(("", value))
    phrases = []
    for name, layers in by_name.items():
        if len(layers) == 1:
            phrases.append(f"{name} {layers[0][1]:.3g}")
            continue
        (low_layer, low), (high_layer, high) = min(layers, key=lambda i: i[1]), max(layers, key=lambda i: i[1])
        mean = sum(v for _, v in layers) / len(layers)
        phrases.append(f"{name} mean {mean:.3g}, min {low:.3g} (layer {low_layer}), max {high:.3g} (layer {high_layer})")
    return phrases


class TrainDisplay:
    """Progress of one training attempt; `deadline` None means a fixed-step run.

    `flops_per_token` (model/transformer.py) times tokens/s over `peak_flops` (all devices;
    budget/calibrate.py's peak_flops: the machine's best peak over dtypes, whatever the run's
    dtype, with `peak_source` saying what it is, e.g. "best measured matmul, float32") is the MFU.
    """

    def __init__(self, console: Console | None, total_steps: int, started_at: float, deadline: float | None, every: int,
                 *, tokens_per_step: int, flops_per_token: float, peak_flops: float, peak_source: str):
        console = console or Console(quiet=True)  # a caller with no console (a library user) sees nothing
        self._console, self._started_at, self._deadline, self._every = console, started_at, deadline, every
        self._tokens_per_step, self._flops_per_token = tokens_per_step, flops_per_token
        self._peak_flops, self._peak_source = peak_flops, peak_source
        self._step, self._total, self._loss, self._tokens_per_s = 0, total_steps, math.nan, 0.0
        self._losses, self._val_losses = History(), History()
        self._last_eval: tuple[int, float, float] | None = None
        self._moe: dict[str, float] = {}
        self._peak_memory, self._drawn_at, self._printed_step = 0, 0.0, -1
        self._live = Live(self._render(), console=console, auto_refresh=False) if console.is_terminal else None
        if self._live:
            self._live.start(refresh=True)

    def update(self, step: int, total_steps: int, loss: float, tokens_per_s: float) -> None:
        if step != self._step:
            self._losses.add(loss)
        self._step, self._total, self._loss, self._tokens_per_s = step, total_steps, loss, tokens_per_s
        now = time.time()
        if self._live:
            if now - self._drawn_at >= REDRAW_S or step == total_steps:
                self._drawn_at = now
                self._live.update(self._render(), refresh=True)
        elif (step % self._every == 0 or step == total_steps) and step != self._printed_step:
            self._printed_step = step
            self._console.print(self._line(), highlight=False)

    def observe_moe(self, metrics: dict[str, float]) -> None:
        """The latest step's `moe.*` metrics (per layer: max_load, dropped, entropy), summarised."""
        self._moe = metrics

    def record_eval(self, step: int, val_loss: float, val_bpb: float) -> None:
        self._val_losses.add(val_loss)
        self._last_eval = (step, val_loss, val_bpb)
        self.print(f"step {step}: val loss {val_loss:.3f}, val bpb {val_bpb:.3f}")

    def print(self, text: str) -> None:
        (self._live.console if self._live else self._console).print(text, highlight=False)

    def close(self) -> None:
        if self._live:
            self._live.update(self._render(), refresh=True)
            self._live.stop()

    # What is shown, computed from the latest values.

    def _mfu(self) -> float:
        return self._tokens_per_s * self._flops_per_token / self._peak_flops if self._peak_flops else math.nan

    def _memory(self) -> tuple[int, int, int, str]:
        used, peak, limit, what = memory_usage()
        self._peak_memory = max(self._peak_memory, peak, used)
        return used, self._peak_memory, limit, what

    def _time(self) -> tuple[str, str]:
        """(elapsed against the budget or the steps, time left)."""
        now = time.time()
        elapsed = now - self._started_at
        if self._deadline is not None:
            return (f"{_clock(elapsed)} elapsed of {_clock(self._deadline - self._started_at)} budget",
                    f"{_clock(self._deadline - now)} left")
        if not self._tokens_per_s:
            return f"{_clock(elapsed)} elapsed", "ETA --:--"
        left = (self._total - self._step) * self._tokens_per_step / self._tokens_per_s
        return f"{_clock(elapsed)} elapsed", f"ETA {_clock(left)}"

    def _line(self) -> str:
        used, peak, _, what = self._memory()
        elapsed, left = self._time()
        parts = [f"step {self._step}/{self._total}", f"loss {self._loss:.3f}", f"{self._tokens_per_s:,.0f} tok/s"]
        if math.isfinite(self._mfu()):
            parts.append(f"MFU {self._mfu():.1%}")
        parts += [f"mem {_gib(used)} (peak {_gib(peak)})", f"{elapsed}, {left}"]
        if self._moe:
            parts.append("moe " + "; ".join(moe_summary(self._moe)))
        return "  ".join(parts)

    def _render(self) -> Table:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        progress = Table.grid(padding=(0, 2))
        progress.add_row(ProgressBar(total=max(self._total, 1), completed=self._step, width=SPARK_WIDTH),
                         f"{self._step:,}/{self._total:,} steps" if self._step else "compiling the train step...")
        grid.add_row("train", progress)
        grid.add_row("loss", f"{self._loss:.3f}  [cyan]{sparkline(self._losses.values)}[/]" if self._losses.values else "-")
        if self._last_eval:
            step, val_loss, val_bpb = self._last_eval
            grid.add_row("val loss", f"{val_loss:.3f} ({val_bpb:.3f} bits/byte) at step {step:,}  "
                                     f"[magenta]{sparkline(self._val_losses.values)}[/]")
        mfu = self._mfu()
        mfu_text = f"MFU {mfu:.1%} of {self._peak_flops / 1e12:,.3g} TFLOP/s ({self._peak_source})" if math.isfinite(mfu) else ""
        grid.add_row("speed", f"{self._tokens_per_s:,.0f} tokens/s  {mfu_text}" if self._tokens_per_s else "measuring...")
        used, peak, limit, what = self._memory()
        grid.add_row("memory", f"{_gib(used)} {what}, peak {_gib(peak)}" + (f" of {_gib(limit)}" if limit else ""))
        grid.add_row("time", "  ".join(self._time()))
        if self._moe:
            grid.add_row("moe", "\n".join(moe_summary(self._moe)))
        return grid


def plan_table(plan) -> Table:
    """The plan as the train and plan commands show it."""
    table = Table(title="plan", show_header=False, title_justify="left")
    m = plan.model
    rows = [
        ("model", f"{m['num_layers']} layers, d {m['d_model']}, {m['num_heads']} heads ({m['num_kv_heads']} kv), "
                  f"vocab {m['vocab_size']}, remat {m['remat']}"),
        ("compute", _dtype_reason(plan)),
        ("params", f"{plan.params:,} ({plan.non_embedding_params:,} non-embedding"
                   + (f", {plan.active_params:,} active per token)" if 0 < plan.active_params < plan.params else ")")),
        ("batch", f"{plan.batch_size} x {plan.seq_len} tokens"),
        ("mesh", "data {} x fsdp {} x tensor {}".format(*plan.mesh)),
        ("steps", f"{plan.steps:,}" + (" (re-fitted to the clock as the run goes)" if plan.mode == "budget" else "")),
        ("tokens", f"{plan.tokens:,} ({plan.epochs:.2f} epochs of "
                   f"{'all' if plan.subset_fraction >= 1 else f'a {plan.subset_fraction:.0%} subset of'} the training text, "
                   f"{plan.tokens_per_param:.1f} per non-embedding param)"),
        ("memory", f"{plan.predicted_memory_bytes / 2**20:,.0f} MiB predicted peak per device"),
    ]
    if plan.mode == "budget":
        data_s = plan.planning_s - plan.measuring_s
        unused_s = plan.budget_s - plan.planning_s - plan.compile_s - plan.train_s - plan.reserve_s
        rows += [
            ("step time", f"{plan.step_s * 1000:.0f} ms measured ({plan.batch_size * plan.seq_len / plan.step_s:,.0f} tokens/s)"),
            ("time", f"budget {plan.budget_s:.0f}s = {data_s:.0f}s data + {plan.measuring_s:.0f}s planning + "
                     f"{plan.compile_s:.0f}s compile + {plan.train_s:.0f}s training + {plan.reserve_s:.0f}s evals, "
                     "save and margin" + (f" + {unused_s:.0f}s left unused" if plan.max_steps else "")),
            ("planner", plan.planner + (f" (chose among {len(plan.candidates)} shapes by predicted loss)"
                                        if plan.candidates else "")),
        ]
    if plan.epochs > 1:
        rows.append(("data", _repetition_note(plan)))
    for key, value in rows:
        table.add_row(key, value)
    return table


def _dtype_reason(plan) -> str:
    """The compute dtype, and what chose it: the step times of the chosen shape and batch in each
    dtype the planner considered (measured or predicted), or the user."""
    dtype = plan.model["dtype"]
    same = [c for c in plan.candidates if c["num_layers"] == plan.model["num_layers"]
            and c["d_model"] == plan.model["d_model"] and c["batch_size"] == plan.batch_size]
    if len({c.get("dtype") for c in same}) < 2:
        return f"{dtype} (params and optimizer state float32)"
    times = ", ".join(f"{c['dtype']} {c['step_s'] * 1000:.0f} ms/step {'measured' if c['measured'] else 'predicted'}"
                      for c in sorted(same, key=lambda c: c["step_s"]))
    return f"{dtype}, the faster here ({times}); params and optimizer state float32"


def _repetition_note(plan) -> str:
    """How often the plan repeats the training text, what that is worth by the repetition model,
    and, past about four repeats, that the corpus is what limits the run."""
    epochs, effective = plan.epochs, plan.effective_epochs
    note = f"repeats the training text {epochs:.1f}x; by the repetition model that is worth {effective:.1f} fresh epochs"
    if plan.max_steps:
        note += (". The run stops there, decayed, with time left (budget.max_epochs): past that many passes "
                 "the held-out loss rose")
    if epochs > 4:
        note += (". The corpus limits this run: more text would do more, e.g. data.corpus=wiki,shakespeare,kjv, "
                 "a local folder of .txt/.jsonl/.parquet, or hf:NAME")
    return note
