"""The one owner of time around training: what is reserved after it, and how many steps fit.

The planner asks these questions before any step has run (with a prior for the eval speed, taken
from the measured step time), and the loop asks them again every step with what it measured.
Keeping both on the same functions means the plan's promise and the loop's control law cannot
drift apart.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.model.transformer import count_params

PERIODIC_EVALS = 6  # validation evals during a run whose train.eval_every is 0
EXIT_S = 1.0  # interpreter and Orbax teardown after the last save (0.6 s measured on a 2-core CPU)
SAVE_BYTES_PER_S = 200e6  # checkpoint write rate assumed for the final save
FINAL_EVAL_SLACK = 1.3  # the final eval reads the whole held-out split; its speed varies by this much
JITTER_FLOOR_S = 0.5  # the least margin: a stall from another process does not shrink with the budget
STEP_WINDOW = 25  # steps whose median time the re-fit plans with
RECENT_STEPS = 5  # ... or these last ones', where they are slower


def save_seconds(spec: ModelSpec) -> float:
    """Writing params and both Adam moments in float32, plus Orbax's fixed cost."""
    return 0.5 + 3 * 4 * count_params(spec) / SAVE_BYTES_PER_S


def eval_s_per_token_prior(step_s: float, tokens_per_step: int) -> float:
    """Eval seconds per token before any eval has been timed: a forward pass is about a third of
    a training step (forward + backward at twice the forward's FLOPs)."""
    return step_s / (3 * tokens_per_step)


def after_training_s(spec: ModelSpec, *, eval_s_per_token: float, val_tokens: int, budget_s: float,
                     margin: float) -> float:
    """Seconds kept after the last training step: the final eval over the whole held-out split,
    the final checkpoint, the interpreter's exit, and the safety margin (a fraction of the budget,
    but at least `JITTER_FLOOR_S`: a 20-second run on a busy 2-core CPU lost more than its 1 %)."""
    final_eval_s = FINAL_EVAL_SLACK * eval_s_per_token * val_tokens
    return final_eval_s + save_seconds(spec) + EXIT_S + max(margin * budget_s, JITTER_FLOOR_S)


def evals_during_training_s(*, eval_s_per_token: float, eval_tokens: int, val_tokens: int) -> float:
    """The first (untrained) eval and the periodic ones, each over at most `eval_tokens`."""
    return (1 + PERIODIC_EVALS) * eval_s_per_token * min(eval_tokens or val_tokens, val_tokens)


def planning_step_s(intervals: Sequence[float]) -> float:
    """The step time the re-fit plans with, from the last `STEP_WINDOW` step intervals: their
    median, or the median of the last `RECENT_STEPS` where that is slower. The median alone shrugs
    off a one-step stall but follows a machine that slowed down (another process started) only
    after half its window, and the steps run meanwhile overrun the deadline. Late breaks the
    promise while early costs a few steps, so the estimate follows a slowdown within a few steps
    and a speed-up at the median's pace."""
    window = list(intervals)[-STEP_WINDOW:]
    return max(statistics.median(window), statistics.median(window[-RECENT_STEPS:]))


def refit_total_steps(step: int, total: int, *, now: float, train_end: float, step_s: float,
                      eval_every: int, eval_s: float, in_flight: int = 0, max_steps: int = 0) -> int:
    """The step count that ends training by `train_end`, given the measured step time and the
    periodic evals the remaining steps will trigger, and at most `max_steps` (0 = no cap: the
    plan's budget.max_epochs of a small corpus). Called every step: the schedule follows it.

    `step` counts dispatched steps; `in_flight` of them may still be running on the device (the
    loop reads metrics one step late), and their time is spent before any new step starts.
    """
    evals_left = max(0, (total - step) // eval_every)
    fitted = step + max(0, math.floor((train_end - evals_left * eval_s - now) / step_s) - in_flight)
    return min(fitted, max_steps) if max_steps else fitted


def training_end(step: int, total: int, *, now: float, train_end: float, step_s: float, max_steps: int) -> float:
    """When training will end, for timing the warmdown: `train_end` on the clock, or, where the
    cap of `max_steps` is what ends the run, after the steps left at the measured step time (a
    capped run that kept the clock's end would never start its warmdown)."""
    if max_steps and total >= max_steps:
        return min(train_end, now + (total - step) * step_s)
    return train_end


def warmdown_due(*, now: float, train_start: float, train_end: float, fraction: float) -> bool:
    """Whether a WSD schedule's warmdown should have begun: the time left before `train_end` is at
    most `fraction` of the training time (`train_start` to `train_end`). On the clock, not on a
    step count, so a machine that slows down starts it on time; the step-count re-fit then makes
    the warmdown end exactly at the last step."""
    return train_end - now <= fraction * max(train_end - train_start, 0.0)
