"""The training loop: it owns the clock.

A budgeted run does not trust the plan's step count. Every step it re-fits the total from the
measured step time and the time left before the deadline (less what `budget.deadline` reserves
after training), and the learning-rate schedule follows that total, so the run decays fully and
still finishes on time when the machine is slower or faster than planned.

Metrics are read one step late (nanodo style): the host fetches step k's loss after dispatching
step k+1, so the device never waits on Python.
"""

from __future__ import annotations

import math
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from pufferfish_jax import sharding
from pufferfish_jax.budget import deadline as deadline_lib
from pufferfish_jax.budget.planner import Plan
from pufferfish_jax.config import peak_lr
from pufferfish_jax.data import background, growing
from pufferfish_jax.data.cache import PreparedData
from pufferfish_jax.data.pipeline import eval_batches, num_windows_available, train_batches, unigram_bpb
from pufferfish_jax.display import TrainDisplay, memory_usage
from pufferfish_jax.errors import CheckpointError, TrainingDiverged
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.train import checkpoint
from pufferfish_jax.train.evaluate import EvalResult, evaluate
from pufferfish_jax.train.metrics import MetricsWriter
from pufferfish_jax.train.state import create_state, learning_rate, make_optimizer, with_params
from pufferfish_jax.train.step import make_eval_step, make_train_step


@dataclass(frozen=True)
class Outcome:
    steps: int
    tokens: int
    final: EvalResult | None  # None when interrupted
    unigram_bpb: float
    interrupted: bool
    step_s: float  # median seconds per step this attempt (nan if it took none)


class _StopFlag:
    """SIGINT/SIGTERM finish the current step, save, and exit instead of killing the run."""

    def __init__(self):
        self.raised = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.raised:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run(cfg: ml_collections.ConfigDict, plan: Plan, data: PreparedData, run_dir: Path, *, mesh: Mesh,
        deadline: float | None, started_at: float, display_console, peak_flops: tuple[float, str],
        resumed: tuple | None = None, initial_params: dict | None = None) -> Outcome:
    """Trains into run_dir on `mesh`, from scratch or from `resumed` = (state, progress record of
    its checkpoint); returns the outcome after the final eval and save. `peak_flops` is the MFU
    denominator and its source, for the display. `initial_params` (a fresh run only: imported
    weights) replace the initialisation.

    A resumed run continues exactly: the data order is a function of (seed, step), the schedule's
    progress is restored, and nothing else carries state (no dropout, no RNG in the step).
    Every process runs this loop; decisions taken from the clock (re-fitted step count, save)
    are process 0's and a stop signal to any process stops all, so all run the same steps.
    """
    background.pause(data)  # until the first eval is done: the compiles below take every core, the eval is timed
    return _Run(cfg, plan, data, run_dir, mesh=mesh, deadline=deadline, started_at=started_at,
                display_console=display_console, peak_flops=peak_flops, resumed=resumed,
                initial_params=initial_params).train()


class _Run:
    """One attempt of a run: what is fixed for it, and the few values that move step by step
    (the state, the step, the re-fitted total, the schedule's progress, the pending metrics)."""

    def __init__(self, cfg, plan: Plan, data: PreparedData, run_dir: Path, *, mesh: Mesh, deadline: float | None,
                 started_at: float, display_console, peak_flops: tuple[float, str], resumed: tuple | None,
                 initial_params: dict | None = None):
        self.cfg, self.plan, self.data, self.run_dir, self.mesh = cfg, plan, data, run_dir, mesh
        self.deadline, self.started_at = deadline, started_at
        self.spec = ModelSpec.from_config(cfg.model, cfg.moe)
        self.optimizer = make_optimizer(cfg.train)
        self.batch_size, self.seq_len = cfg.train.batch_size, self.spec.seq_len
        self.tokens_per_step = self.batch_size * self.seq_len
        sharding.check_batch(self.batch_size, cfg.train.grad_accum, mesh)
        if resumed is None:
            self.state = create_state(self.spec, self.optimizer, cfg.train.seed, mesh)
            if initial_params is not None:
                self.state = with_params(self.state, initial_params)
            self.progress, self.used_before, self.saved_step, record = 0.0, 0.0, None, {}
        else:
            self.state, record = resumed
            self.progress, self.used_before, self.saved_step = record["progress"], record["elapsed_s"], int(self.state.step)
        self.imported = resumed is None and initial_params is not None
        # wsd in a budgeted run: the progress at which the clock started the warmdown (None: not
        # yet), and when training began on the run's clock (seconds of the budget used by then).
        self.warmdown_from, self.train_began_s = record.get("warmdown_from"), record.get("train_began_s")
        self.step = int(self.state.step)
        self.total = plan.steps
        self.eval_every = cfg.train.eval_every or max(1, self.total // deadline_lib.PERIODIC_EVALS)
        self.train_step = make_train_step(self.spec, self.optimizer, cfg.train.grad_accum, mesh)
        self.eval_step = make_eval_step(self.spec, mesh)
        self.metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=sharding.is_primary())
        self.manager = checkpoint.open_manager(run_dir / "checkpoints", cfg.train.keep_checkpoints)
        self.unigram = unigram_bpb(data.train_tokens, data.val_tokens, data.val_bytes, data.vocab_size)
        self.display = TrainDisplay(display_console, self.total, started_at, deadline, cfg.train.log_every,
                                    tokens_per_step=self.tokens_per_step, flops_per_token=plan.flops_per_token,
                                    peak_flops=peak_flops[0], peak_source=peak_flops[1])
        self.peak_flops = peak_flops[0]
        self.intervals: deque[float] = deque(maxlen=deadline_lib.STEP_WINDOW)
        self.pending = None  # (step, metrics, lr) of the last dispatched step, not read yet
        self.last_loss = float("nan")

    # -- evaluation and time ------------------------------------------------------------------
    def evaluate(self, max_tokens: int) -> EvalResult:
        return evaluate(self.eval_step, self.state.variables, self.data.val_tokens, self.data.val_bytes,
                        seq_len=self.seq_len, batch_size=self.batch_size, mesh=self.mesh, max_tokens=max_tokens)

    def first_eval(self) -> None:
        """The untrained loss (about ln V), which also times evaluation on this machine: that sizes
        the time kept for periodic evals and the final full one. A run from imported weights
        scores them on the whole held-out set, like the final eval, so the two compare."""
        window, mask = next(eval_batches(self.data.val_tokens, seq_len=self.seq_len, batch_size=self.batch_size))
        started = time.time()
        jax.block_until_ready(self.eval_step(self.state.variables, sharding.shard_batch(window, self.mesh),
                                             sharding.shard_batch(mask, self.mesh)))
        self.eval_compile_s = time.time() - started
        started = time.time()
        first = self.evaluate(0 if self.imported else self.cfg.train.eval_tokens)
        self.eval_s_per_token = (time.time() - started) / max(first.tokens, 1)
        self.periodic_eval_s = self.eval_s_per_token * (min(first.tokens, self.cfg.train.eval_tokens) if self.imported
                                                         else first.tokens)
        self.record_eval(first)

    def record_eval(self, result: EvalResult, **extra) -> None:
        self.metrics.write("eval", step=self.step, val_loss=result.loss, val_bpb=result.bpb, val_bpb_se=result.bpb_se,
                           tokens=self.step * self.tokens_per_step, **extra)
        if not extra.get("final"):  # the dashboard is closed before the final eval
            self.display.record_eval(self.step, result.loss, result.bpb)

    def step_s(self) -> float:
        return float(np.median(self.intervals)) if self.intervals else float("nan")

    def refit(self, now: float) -> None:
        """Re-fits the total step count to the clock (budgeted runs only)."""
        step_s = deadline_lib.planning_step_s(self.intervals) if len(self.intervals) >= 3 else self.plan.step_s
        reserve = deadline_lib.after_training_s(self.spec, eval_s_per_token=self.eval_s_per_token,
                                                val_tokens=len(self.data.val_tokens), budget_s=self.plan.budget_s,
                                                margin=self.cfg.budget.margin)
        train_end = self.deadline - reserve
        self.total = deadline_lib.refit_total_steps(self.step, self.total, now=now, train_end=train_end,
                                                    step_s=step_s, eval_every=self.eval_every,
                                                    eval_s=self.periodic_eval_s, in_flight=int(self.pending is not None),
                                                    max_steps=self.plan.max_steps)
        train_end = deadline_lib.training_end(self.step, self.total, now=now, train_end=train_end, step_s=step_s,
                                              max_steps=self.plan.max_steps)
        if self.train_began_s is None:
            self.train_began_s = self.used_before + now - self.started_at
        train_start = self.started_at - self.used_before + self.train_began_s
        self.warmdown_now = self.warmdown_from is None and self.cfg.train.schedule == "wsd" and deadline_lib.warmdown_due(
            now=now, train_start=train_start, train_end=train_end, fraction=self.cfg.train.warmdown_fraction)

    def scheduled_lr(self) -> float:
        """This step's learning rate, from the recorded schedule state only (progress, and in a
        budgeted wsd run the progress its warmdown began at), so a resumed run gets the same."""
        warmdown_from = None
        if self.deadline is not None:
            warmdown_from = math.inf if self.warmdown_from is None else self.warmdown_from
        return learning_rate(self.progress, self.cfg.train, warmdown_from)

    # -- metrics and checkpoints --------------------------------------------------------------
    def settle(self) -> None:
        """Reads the pending step's metrics; stops the run on a non-finite loss."""
        if self.pending is None:
            return
        (done_step, values, lr), self.pending = self.pending, None
        loss, grad_norm = float(values["loss"]), float(values["grad_norm"])
        routing = {k: float(v) for k, v in values.items() if k.startswith("moe.")}
        self.display.observe_moe(routing)
        if not math.isfinite(loss):
            self.manager.wait_until_finished()
            kept = (f"the last good checkpoint is step {self.saved_step}" if self.saved_step is not None
                    else "no checkpoint was saved yet")
            raise TrainingDiverged(f"loss became {loss} at step {done_step + 1}; {kept} in {self.run_dir}; "
                                   f"lower train.lr (was {peak_lr(self.cfg.train):g}) or set train.grad_clip")
        if (done_step + 1) % self.cfg.train.log_every == 0:
            step_s = self.step_s()
            tokens_per_s = self.tokens_per_step / step_s if self.intervals else None
            mfu = tokens_per_s * self.plan.flops_per_token / self.peak_flops if tokens_per_s and self.peak_flops else None
            memory_bytes, memory_peak_bytes, _, _ = memory_usage()
            self.metrics.write("train", step=done_step + 1, loss=loss, grad_norm=grad_norm, lr=lr,
                               tokens=(done_step + 1) * self.tokens_per_step, step_s=step_s,
                               tokens_per_s=tokens_per_s, mfu=mfu, memory_bytes=memory_bytes,
                               memory_peak_bytes=memory_peak_bytes,
                               elapsed_s=self.used_before + time.time() - self.started_at, **routing)
        self.last_loss = loss

    def save(self) -> bool:
        """Saves the state; a failed save (disk full, permissions) is reported, not fatal: Orbax
        writes to a temporary folder first, so the previous checkpoint is still intact."""
        record = {"step": self.step, "elapsed_s": self.used_before + time.time() - self.started_at,
                  "progress": self.progress, "data_fingerprint": self.data.fingerprint}
        schedule = {"warmdown_from": self.warmdown_from, "train_began_s": self.train_began_s}
        record |= {key: value for key, value in schedule.items() if value is not None}  # budgeted runs only
        try:
            self.manager.wait_until_finished()  # surfaces a failure of the previous async save
            checkpoint.save(self.manager, self.state, self.cfg, self.data.tokenizer_json, record)
        except Exception as e:
            kept = f"step {self.saved_step} is still intact" if self.saved_step is not None else "no earlier checkpoint exists"
            self.display.print(f"warning: saving the checkpoint at step {self.step} failed ({type(e).__name__}: {e}); {kept}")
            return False
        self.saved_step = self.step
        return True

    # -- the run --------------------------------------------------------------------------------
    def batches(self):
        plan, data = self.plan, self.data
        if data.schedule is not None:  # a stream still growing when the run began: its own rule
            return growing.train_batches(data.growing, data.schedule, seq_len=self.seq_len, batch_size=self.batch_size,
                                         seed=self.cfg.train.seed, start_step=self.step,
                                         part=sharding.process_part(self.mesh, self.batch_size),
                                         last_step=self.total - 1 if self.deadline is None else None,
                                         on_wait=lambda step, s: self.metrics.write("data_wait", step=step, wait_s=s))
        subset = 0 if plan.subset_fraction >= 1 else max(
            self.batch_size, round(plan.subset_fraction * num_windows_available(data.train_tokens, self.seq_len)))
        return train_batches(data.train_tokens, seq_len=self.seq_len, batch_size=self.batch_size,
                             seed=self.cfg.train.seed, start_step=self.step, num_windows=subset,
                             part=sharding.process_part(self.mesh, self.batch_size))

    def train(self) -> Outcome:
        growing = self.data.growing  # a corpus still being tokenized: paused by `run` until here and
        self.first_eval()            # ended before the final eval, so both evals (which size and spend
        if growing is not None:      # the time kept at the end) run alone
            growing.resume()
        interrupted = self.loop()
        if growing is not None:
            growing.stop()
        self.settle()
        self.display.update(self.step, self.step, self.last_loss, self.tokens_per_step / self.step_s() if self.intervals else 0.0)
        self.display.close()
        final = None
        if not interrupted:  # an interrupted run is not finished: its final eval comes when it is
            final = self.evaluate(0)
            self.record_eval(final, unigram_bpb=self.unigram, final=True)
        self.final_save()
        return Outcome(steps=self.step, tokens=self.step * self.tokens_per_step, final=final,
                       unigram_bpb=self.unigram, interrupted=interrupted, step_s=self.step_s())

    def loop(self) -> bool:
        """Steps until the (re-fitted) total or a stop signal; True if stopped by a signal."""
        cfg, tick, compiling, last_save = self.cfg, None, True, time.time()
        with _StopFlag() as stop:
            for rows in self.batches():
                now = time.time()
                if tick is not None:
                    self.intervals.append(now - tick)
                tick = now
                self.warmdown_now = False
                if self.deadline is not None:
                    self.refit(now)
                seen = sharding.everyone([self.total, stop.raised, self.warmdown_now])  # process 0's clock, anyone's Ctrl-C
                self.total, stop_now = int(seen[0, 0]), bool(seen[:, 1].any())
                if self.step >= self.total or stop_now:
                    return stop_now
                if seen[0, 2]:  # the warmdown starts with this step
                    self.warmdown_from = self.progress
                self.progress = max(self.progress, (self.step + 1) / max(self.total, 1))  # never rewind the schedule
                lr = self.scheduled_lr()
                self.state, values = self.train_step(self.state, sharding.global_batch(rows, self.mesh, self.batch_size),
                                                     np.float32(lr))
                if compiling:  # jit compiles (or loads from the persistent cache) inside the first call
                    compiling = False
                    self.metrics.write("compile", train_step_s=time.time() - now, eval_step_s=self.eval_compile_s)
                    tick = time.time()  # the first step interval starts after the compile, not before it
                self.settle()
                self.pending = (self.step, values, lr)
                self.step += 1
                self.display.update(self.step, max(self.total, self.step), self.last_loss,
                                    self.tokens_per_step / self.step_s() if self.intervals else 0.0)
                if self.step % self.eval_every == 0 and self.step < self.total:
                    self.settle()
                    self.record_eval(self.evaluate(cfg.train.eval_tokens))
                    tick = None  # the eval is not a step interval
                if sharding.agree(time.time() - last_save >= cfg.train.checkpoint_every_s):
                    self.settle()
                    self.save()
                    last_save, tick = time.time(), None
        return False

    def final_save(self) -> None:
        try:
            if self.saved_step != self.step and not self.save():
                raise CheckpointError("the final checkpoint could not be written")
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"the final checkpoint at step {self.step} could not be saved ({e}); "
                                  f"free disk space or fix permissions under {self.run_dir}, then rerun the same "
                                  "command to resume from the last good checkpoint") from None
        self.manager.close()
        self.metrics.close()
