"""From a wall-clock budget to a plan: which model, how many steps, measured on this machine.

The rule (a first, honest planner; a later one scores candidates by predicted loss): time two
anchor shapes from a ladder of Llama-style models, fit step time = overhead + FLOPs / rate,
predict every rung, take the largest model whose tokens per non-embedding parameter stay at or
above `budget.tokens_per_param`, then measure that choice itself before committing to it. What
is not training (data preparation already spent, compilation, the final eval and checkpoint, the
interpreter's exit, a safety margin) is subtracted first, so the promise covers the whole command.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import ml_collections

from pufferfish_jax.budget.calibrate import CalibrationCache, Measurement
from pufferfish_jax.config import ConfigError
from pufferfish_jax.model.transformer import ModelSpec, count_params, flops_per_token

# (num_layers, d_model, num_heads, num_kv_heads): head width 32 below d 384, 64 from there.
LADDER = (
    (2, 64, 2, 1), (2, 128, 4, 2), (3, 128, 4, 2), (4, 128, 4, 2), (4, 192, 6, 2), (4, 256, 8, 4),
    (6, 256, 8, 4), (6, 384, 6, 2), (8, 512, 8, 4), (12, 768, 12, 4), (16, 1024, 16, 8),
    (24, 1536, 24, 8), (32, 2048, 32, 8),
)
ANCHORS = (1, 5)  # rungs timed to fit the step-time model
MIN_STEPS = 20
EXIT_S = 1.5  # interpreter and Orbax teardown after the last save, measured at ~1 s here
SAVE_BYTES_PER_S = 200e6


@dataclass(frozen=True)
class Plan:
    mode: str  # "budget" or "steps"
    model: dict  # the model section as resolved (shape chosen, vocab from the tokenizer)
    params: int
    non_embedding_params: int
    batch_size: int
    seq_len: int
    steps: int  # planned; a budgeted loop re-fits this against the clock
    tokens: int
    epochs: float
    tokens_per_param: float
    flops_per_token: float
    step_s: float = 0.0
    compile_s: float = 0.0
    reserve_s: float = 0.0  # final eval + final checkpoint + exit + margin
    train_s: float = 0.0
    budget_s: float = 0.0
    planning_s: float = 0.0  # command start to the end of planning
    candidates: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _spec(model_cfg: ml_collections.ConfigDict, rung=None) -> ModelSpec:
    model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    if rung is not None:
        model_cfg.num_layers, model_cfg.d_model, model_cfg.num_heads, model_cfg.num_kv_heads = rung
        model_cfg.head_dim = model_cfg.ffn_hidden = 0
    return ModelSpec.from_config(model_cfg)


def save_seconds(spec: ModelSpec) -> float:
    """Writing params and both Adam moments in float32, plus Orbax's fixed cost."""
    return 0.5 + 3 * 4 * count_params(spec) / SAVE_BYTES_PER_S


def reserve_seconds(spec: ModelSpec, step: Measurement, batch_size: int, val_tokens: int,
                    budget_s: float, margin: float) -> float:
    """Time kept after the last train step: the first and the final eval (a forward costs about a
    third of a train step per token, plus compiling it), the final save, exit and a margin."""
    eval_s = 1.5 * val_tokens * step.step_s / (3 * batch_size * spec.seq_len) + 0.5 * step.compile_s
    return 2 * eval_s + save_seconds(spec) + EXIT_S + margin * budget_s


def fixed_steps_plan(cfg: ml_collections.ConfigDict, *, train_tokens: int) -> Plan:
    spec = _spec(cfg.model)
    return _plan(cfg, spec, "steps", cfg.train.steps, train_tokens)


def _plan(cfg, spec: ModelSpec, mode: str, steps: int, train_tokens: int, **timing) -> Plan:
    tokens = steps * cfg.train.batch_size * spec.seq_len
    non_embedding = count_params(spec, embedding=False)
    return Plan(
        mode=mode, model={**cfg.model.to_dict(), **{k: getattr(spec, k) for k in ("num_layers", "d_model", "num_heads", "num_kv_heads")}},
        params=count_params(spec), non_embedding_params=non_embedding, batch_size=cfg.train.batch_size,
        seq_len=spec.seq_len, steps=steps, tokens=tokens, epochs=tokens / max(train_tokens, 1),
        tokens_per_param=tokens / non_embedding, flops_per_token=flops_per_token(spec, spec.seq_len), **timing)


def budget_plan(cfg: ml_collections.ConfigDict, *, budget_s: float, deadline: float, train_tokens: int,
                val_tokens: int, cache: CalibrationCache, fixed_shape: bool,
                log: Callable[[str], None] = lambda s: None, clock: Callable[[], float] = time.time) -> Plan:
    """Chooses the model and step count that fill the time left before `deadline`."""
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    margin = cfg.budget.margin

    def outlook(spec: ModelSpec, step: Measurement) -> dict:
        reserve = reserve_seconds(spec, step, cfg.train.batch_size, val_tokens, budget_s, margin)
        train_s = deadline - clock() - step.compile_s - reserve
        steps = max(0, math.floor(train_s / step.step_s))
        return dict(steps=steps, train_s=train_s, reserve_s=reserve,
                    ratio=steps * tokens_per_step / count_params(spec, embedding=False))

    if fixed_shape or cfg.budget.planner == "none":
        choice = _spec(cfg.model)
        measured, _ = cache.get(choice, cfg.train, log)
        candidates = []
    else:
        rungs = [_spec(cfg.model, rung) for rung in LADDER]
        anchors = [(rungs[i], cache.get(rungs[i], cfg.train, log)[0]) for i in ANCHORS]
        (s0, m0), (s1, m1) = anchors
        flops0, flops1 = (flops_per_token(s, s.seq_len) * tokens_per_step for s in (s0, s1))
        per_flop = max((m1.step_s - m0.step_s) / (flops1 - flops0), 1e-15)
        overhead = max(m0.step_s - per_flop * flops0, 0.0)
        candidates = []
        for spec in rungs:
            predicted = Measurement(compile_s=max(m0.compile_s, m1.compile_s),
                                    step_s=overhead + per_flop * flops_per_token(spec, spec.seq_len) * tokens_per_step)
            candidates.append(dict(num_layers=spec.num_layers, d_model=spec.d_model,
                                   non_embedding_params=count_params(spec, embedding=False),
                                   step_s=predicted.step_s, **outlook(spec, predicted)))
        fits = [i for i, c in enumerate(candidates) if c["ratio"] >= cfg.budget.tokens_per_param and c["steps"] >= MIN_STEPS]
        index = fits[-1] if fits else 0
        while True:  # confirm the prediction with a measurement of the chosen rung itself
            choice = rungs[index]
            measured, _ = cache.get(choice, cfg.train, log)
            if index == 0 or outlook(choice, measured)["ratio"] >= cfg.budget.tokens_per_param:
                break
            index -= 1
    final = outlook(choice, measured)
    if final["steps"] < MIN_STEPS:
        need = budget_s - final["train_s"] + MIN_STEPS * measured.step_s
        raise ConfigError(f"budget {budget_s:g}s is too small to train here: the smallest plan needs about "
                          f"{math.ceil(need)}s (data, compile, {MIN_STEPS} steps, eval, save); try budget={math.ceil(need / 60)}m")
    return _plan(cfg, choice, "budget", final["steps"], train_tokens, step_s=measured.step_s,
                 compile_s=measured.compile_s, reserve_s=final["reserve_s"], train_s=final["train_s"],
                 budget_s=budget_s, planning_s=budget_s - (deadline - clock()), candidates=candidates)


def apply_plan(cfg: ml_collections.ConfigDict, plan: Plan) -> ml_collections.ConfigDict:
    """The resolved config: the user's config with the planner's choices written in."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in plan.model.items():
        cfg.model[key] = value
    return cfg
