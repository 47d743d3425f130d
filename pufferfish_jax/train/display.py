"""The progress display: a live rich bar on a terminal, plain log lines anywhere else."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class TrainDisplay:
    """Shows step, loss, tokens/s, elapsed and remaining time; `deadline` None means a fixed-step run."""

    def __init__(self, console: Console, total_steps: int, started_at: float, deadline: float | None, every: int):
        self._console, self._started_at, self._deadline, self._every = console, started_at, deadline, every
        self._live = console.is_terminal
        self._printed_step = -1
        self._routing = ""
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), TextColumn("{task.fields[text]}"), console=console, transient=False)
        self._task = self._progress.add_task("train", total=total_steps, text="compiling...")
        if self._live:
            self._progress.start()

    def update(self, step: int, total_steps: int, loss: float, tokens_per_s: float) -> None:
        now = time.time()
        elapsed = now - self._started_at
        if self._deadline is not None:
            timing = f"{_clock(elapsed)} elapsed, {_clock(self._deadline - now)} left of budget"
        else:
            rate = step / max(elapsed, 1e-9)
            timing = f"{_clock(elapsed)} elapsed, ETA {_clock((total_steps - step) / max(rate, 1e-9))}"
        text = f"step {step}/{total_steps}  loss {loss:.3f}  {tokens_per_s:,.0f} tok/s{self._routing}  {timing}"
        if self._live:
            self._progress.update(self._task, completed=step, total=total_steps, text=text)
        elif (step % self._every == 0 or step == total_steps) and step != self._printed_step:
            self._printed_step = step
            self._console.print(text, highlight=False)

    def show_routing(self, metrics: dict[str, float]) -> None:
        """Summarises the per-layer `moe.{i}.*` metrics over the MoE layers: the worst layer's
        max/mean expert load, its dropped fraction (when any) and the mean router entropy."""
        def over_layers(name: str) -> list[float]:
            return [v for k, v in metrics.items() if k.startswith("moe.") and k.endswith(f".{name}")]

        loads, dropped, entropy = over_layers("max_load"), over_layers("dropped"), over_layers("entropy")
        if not loads:
            return
        self._routing = f"  load max/mean {max(loads):.2f}"
        if max(dropped) > 0:
            self._routing += f", dropped {max(dropped):.1%}"
        self._routing += f", router entropy {sum(entropy) / len(entropy):.2f}"

    def print(self, text: str) -> None:
        (self._progress.console if self._live else self._console).print(text, highlight=False)

    def close(self) -> None:
        if self._live:
            self._progress.stop()
