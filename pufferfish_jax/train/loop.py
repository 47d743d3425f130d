"""The training loop: it owns the clock.

A budgeted run does not trust the plan's step count. Every step it re-fits the total from the
measured step time and the time left before the deadline (less the final eval, the last
checkpoint and the exit), and the learning-rate schedule follows that total, so the run decays
fully and still finishes on time when the machine is slower or faster than planned.

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

from pufferfish_jax import config as config_lib
from pufferfish_jax import sharding
from pufferfish_jax.budget.calibrate import CalibrationCache
from pufferfish_jax.budget.planner import EXIT_S, Plan, save_seconds
from pufferfish_jax.data.pipeline import PreparedData, eval_batches, num_windows_available, train_batches, unigram_bpb
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.train import checkpoint
from pufferfish_jax.train.display import TrainDisplay
from pufferfish_jax.train.evaluate import EvalResult, evaluate
from pufferfish_jax.train.metrics import MetricsWriter
from pufferfish_jax.train.state import create_state, learning_rate, make_optimizer
from pufferfish_jax.train.step import make_eval_step, make_train_step

PERIODIC_EVALS = 6


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the last good checkpoint."""


@dataclass(frozen=True)
class Outcome:
    steps: int
    tokens: int
    final: EvalResult | None  # None when interrupted
    unigram_bpb: float
    interrupted: bool


def refit_total_steps(step: int, total: int, *, now: float, train_end: float, step_s: float,
                      eval_every: int, eval_s: float, in_flight: int = 0) -> int:
    """The step count that ends training by `train_end`, given the measured step time and the
    periodic evals the remaining steps will trigger. Called every step: the schedule follows it.

    `step` counts dispatched steps; `in_flight` of them may still be running on the device (the
    loop reads metrics one step late), and their time is spent before any new step starts.
    """
    evals_left = max(0, (total - step) // eval_every)
    return step + max(0, math.floor((train_end - evals_left * eval_s - now) / step_s) - in_flight)


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
        deadline: float | None, started_at: float, display_console, resumed: tuple | None = None) -> Outcome:
    """Trains into run_dir on `mesh`, from scratch or from `resumed` = (state, progress record of
    its checkpoint); returns the outcome after the final eval and save.

    A resumed run continues exactly: the data order is a function of (seed, step), the schedule's
    progress is restored, and nothing else carries state (no dropout, no RNG in the step).
    Every process runs this loop; decisions taken from the clock (re-fitted step count, save)
    are process 0's and a stop signal to any process stops all, so all run the same steps.
    """
    spec = ModelSpec.from_config(cfg.model, cfg.moe)
    optimizer = make_optimizer(cfg.train)
    batch_size, seq_len = cfg.train.batch_size, spec.seq_len
    sharding.check_batch(batch_size, cfg.train.grad_accum, mesh)
    if resumed is None:
        state = create_state(spec, optimizer, cfg.train.seed, mesh)
        progress, used_before = 0.0, 0.0
    else:
        state, record = resumed
        progress, used_before = record["progress"], record["elapsed_s"]
    train_step = make_train_step(spec, optimizer, cfg.train.grad_accum, mesh)
    eval_step = make_eval_step(spec, mesh)
    tokens_per_step = batch_size * seq_len

    def run_eval(state, max_tokens: int) -> EvalResult:
        return evaluate(eval_step, state.variables, data.val_tokens, data.val_bytes, seq_len=seq_len,
                        batch_size=batch_size, mesh=mesh, max_tokens=max_tokens)

    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=sharding.is_primary())
    manager = checkpoint.open_manager(run_dir / "checkpoints", cfg.train.keep_checkpoints)
    unigram = unigram_bpb(data.train_tokens, data.val_tokens, data.val_bytes, data.vocab_size)

    # The first eval gives the untrained loss (about ln V) and, once compiled, times evaluation on
    # this machine, which sizes the time kept for periodic evals and the final full one.
    window, mask = next(eval_batches(data.val_tokens, seq_len=seq_len, batch_size=batch_size))
    eval_started = time.time()
    jax.block_until_ready(eval_step(state.variables, sharding.shard_batch(window, mesh), sharding.shard_batch(mask, mesh)))
    eval_compile_s = time.time() - eval_started
    eval_started = time.time()
    first = run_eval(state, cfg.train.eval_tokens)
    eval_s_per_token = (time.time() - eval_started) / max(first.tokens, 1)
    step = int(state.step)
    metrics.write("eval", step=step, val_loss=first.loss, val_bpb=first.bpb, tokens=step * tokens_per_step)

    def reserve_s() -> float:
        final_eval_s = 1.3 * eval_s_per_token * len(data.val_tokens)
        return final_eval_s + save_seconds(spec) + EXIT_S + cfg.budget.margin * plan.budget_s

    total = plan.steps
    eval_every = cfg.train.eval_every or max(1, total // PERIODIC_EVALS)
    periodic_eval_s = eval_s_per_token * first.tokens
    peak_flops, peak_source = CalibrationCache(config_lib.cache_dir(cfg)).peak_flops(spec.dtype)
    display = TrainDisplay(display_console, total, started_at, deadline, cfg.train.log_every,
                           tokens_per_step=tokens_per_step, flops_per_token=plan.flops_per_token,
                           peak_flops=peak_flops, peak_source=peak_source)
    display.record_eval(step, first.loss, first.bpb)
    intervals = deque(maxlen=25)
    pending, last_loss, tick, compiling = None, float("nan"), None, True
    last_save, saved_step = time.time(), (step if resumed is not None else None)
    interrupted = False

    def save() -> bool:
        """Saves the state; a failed save (disk full, permissions) is reported, not fatal: Orbax
        writes to a temporary folder first, so the previous checkpoint is still intact."""
        record = {"step": step, "elapsed_s": used_before + time.time() - started_at, "progress": progress,
                  "data_fingerprint": data.fingerprint}
        try:
            manager.wait_until_finished()  # surfaces a failure of the previous async save
            checkpoint.save(manager, state, cfg, data.tokenizer_json, record)
            return True
        except Exception as e:
            kept = f"step {saved_step} is still intact" if saved_step is not None else "no earlier checkpoint exists"
            display.print(f"warning: saving the checkpoint at step {step} failed ({type(e).__name__}: {e}); {kept}")
            return False

    def settle(pending) -> float:
        """Reads a finished step's metrics; stops the run on a non-finite loss."""
        done_step, values, lr = pending
        loss, grad_norm = float(values["loss"]), float(values["grad_norm"])
        routing = {k: float(v) for k, v in values.items() if k.startswith("moe.")}
        display.observe_moe(routing)
        if not math.isfinite(loss):
            manager.wait_until_finished()
            kept = f"the last good checkpoint is step {saved_step}" if saved_step is not None else "no checkpoint was saved yet"
            raise TrainingDiverged(f"loss became {loss} at step {done_step + 1}; {kept} in {run_dir}; "
                                   f"lower train.lr (was {cfg.train.lr:g}) or set train.grad_clip")
        if (done_step + 1) % cfg.train.log_every == 0:
            step_s = float(np.median(intervals)) if intervals else float("nan")
            metrics.write("train", step=done_step + 1, loss=loss, grad_norm=grad_norm, lr=lr,
                          tokens=(done_step + 1) * tokens_per_step, step_s=step_s,
                          tokens_per_s=tokens_per_step / step_s if intervals else None,
                          elapsed_s=used_before + time.time() - started_at, **routing)
        return loss

    with _StopFlag() as stop:
        subset = 0 if plan.subset_fraction >= 1 else max(batch_size, round(plan.subset_fraction * num_windows_available(data.train_tokens, seq_len)))
        for rows in train_batches(data.train_tokens, seq_len=seq_len, batch_size=batch_size, seed=cfg.train.seed,
                                  start_step=step, num_windows=subset, part=sharding.process_part(mesh, batch_size)):
            now = time.time()
            if tick is not None:
                intervals.append(now - tick)
            tick = now
            if deadline is not None:
                step_s = float(np.median(intervals)) if len(intervals) >= 3 else plan.step_s
                total = refit_total_steps(step, total, now=now, train_end=deadline - reserve_s(), step_s=step_s,
                                          eval_every=eval_every, eval_s=periodic_eval_s,
                                          in_flight=int(pending is not None))
            seen = sharding.everyone([total, stop.raised])  # process 0's clock, anyone's Ctrl-C
            total, stop_now = int(seen[0, 0]), bool(seen[:, 1].any())
            if step >= total or stop_now:
                interrupted = stop_now
                break
            progress = max(progress, (step + 1) / max(total, 1))  # faster steps must not rewind the schedule
            lr = learning_rate(progress, cfg.train)
            state, values = train_step(state, sharding.global_batch(rows, mesh, batch_size), np.float32(lr))
            if compiling:  # jit compiles (or loads from the persistent cache) inside the first call
                compiling = False
                metrics.write("compile", train_step_s=time.time() - now, eval_step_s=eval_compile_s)
            if pending is not None:
                last_loss = settle(pending)
            pending = (step, values, lr)
            step += 1
            tokens_per_s = tokens_per_step / float(np.median(intervals)) if intervals else 0.0
            display.update(step, max(total, step), last_loss, tokens_per_s)

            if step % eval_every == 0 and step < total:
                last_loss = settle(pending)
                pending = None
                result = run_eval(state, cfg.train.eval_tokens)
                metrics.write("eval", step=step, val_loss=result.loss, val_bpb=result.bpb, tokens=step * tokens_per_step)
                display.record_eval(step, result.loss, result.bpb)
                tick = None  # the eval is not a step interval
            if sharding.agree(time.time() - last_save >= cfg.train.checkpoint_every_s):
                if pending is not None:
                    last_loss = settle(pending)
                    pending = None
                if save():
                    saved_step = step
                last_save, tick = time.time(), None

    if pending is not None:
        last_loss = settle(pending)
    display.update(step, step, last_loss, tokens_per_step / float(np.median(intervals)) if intervals else 0.0)
    display.close()
    final = None
    if not interrupted:  # an interrupted run is not finished: its final eval comes when it is
        final = run_eval(state, 0)
        metrics.write("eval", step=step, val_loss=final.loss, val_bpb=final.bpb, unigram_bpb=unigram,
                      tokens=step * tokens_per_step, final=True)
    try:
        if saved_step != step and not save():
            raise checkpoint.CheckpointError("the final checkpoint could not be written")
        manager.wait_until_finished()
    except Exception as e:
        raise checkpoint.CheckpointError(f"the final checkpoint at step {step} could not be saved ({e}); "
                                         f"free disk space or fix permissions under {run_dir}, then rerun the same command "
                                         "to resume from the last good checkpoint") from None
    manager.close()
    metrics.close()
    return Outcome(steps=step, tokens=step * tokens_per_step, final=final, unigram_bpb=unigram, interrupted=interrupted)
