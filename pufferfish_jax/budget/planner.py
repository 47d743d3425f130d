"""From a wall-clock budget to a plan: which model, how many steps, measured on this machine.

`measured` (the default) walks a ladder of Llama-style shapes. For each rung it predicts the step
time (measured when cached, else from the fitted time model), hence the tokens the time left can
buy, and scores the pair with a Chinchilla-form loss L(N, D) = E + A/N^a + B/D^b (Hoffmann et al.
2022). N counts all parameters, embedding included, as Hoffmann et al. do: at these sizes the tied
embedding is most of the model and, through the LM head, most of the compute (with non-embedding
N the score preferred 4-layer models that lost to 2-layer ones by 0.07 bpb in 2-minute CPU runs).
D is discounted for repeated epochs (Muennighoff et al. 2023) and for batches far from the
critical batch (`batch_efficiency`). Only the argmin matters. It then measures the leader and the runner-up for real,
refitting and re-ranking after each, so the promise never rests on an extrapolation. With
`budget.tokens_per_param` > 0 the rule is instead "the largest model that still gets that many
tokens per parameter".

Everything that is not training is subtracted first: the time already spent (data preparation,
planning), compilation, the evals, the final checkpoint, the interpreter's exit and a safety
margin, so the promise covers the whole command.

`seed` reproduces the white paper's fixed tiers (model size and dataset percentage by budget),
for comparison on the same hardware and data.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import ml_collections
import jax
from jax.sharding import Mesh

from pufferfish_jax import sharding
from pufferfish_jax.budget import deadline as deadline_lib
from pufferfish_jax.budget.calibrate import PROBES_S, CalibrationCache, Measurement, flops_per_step
from pufferfish_jax.budget.loss_model import batch_efficiency, effective_tokens, predicted_loss
from pufferfish_jax.budget.memory import memory_bytes
from pufferfish_jax.config import MODEL_SHAPE_KEYS, peak_lr
from pufferfish_jax.errors import ConfigError
from pufferfish_jax.model.transformer import count_params, flops_per_token
from pufferfish_jax.model.spec import DTYPES, ModelSpec

# (num_layers, d_model, num_heads, num_kv_heads): head width 32 below d 384, 64 from there. It
# starts at d 128: narrower models cannot use a byte-level BPE vocabulary (2 layers x d 64 ended
# 0.5 bpb behind 2 x 128 in a 2-minute CPU run), and the loss score, fitted on far larger models,
# does not see that.
LADDER = (
    (2, 128, 4, 2), (3, 128, 4, 2), (4, 128, 4, 2),
    (3, 192, 6, 2), (4, 192, 6, 2), (4, 256, 8, 4), (6, 256, 8, 4), (6, 320, 10, 2), (6, 384, 6, 2),
    (8, 384, 6, 2), (8, 512, 8, 4), (10, 640, 10, 2), (12, 768, 12, 4), (16, 1024, 16, 8),
    (20, 1280, 20, 4), (24, 1536, 24, 8), (28, 1792, 28, 4), (32, 2048, 32, 8),
)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # sequences per data-parallel device per step considered
MIN_STEPS = 20
MAX_MEASUREMENTS = 5
CONTENDERS = 2  # the leader and runner-up are measured before a plan is final, while time allows
# The start-up (imports, data, planning) may spend this share of the budget on measurements beyond
# the first. The first (the leader's) is always taken: its compile is the run's own (it lands in the
# persistent compilation cache), so the promise rests on a measured step. Each further one costs a
# cold compile and timed steps, and the user waits for it before the first step.
PLANNING_SHARE = 0.04
# ...unless a measured candidate is predicted within this fraction of the unmeasured leader's loss:
# closer than the time model's error moves a prediction (its step times are off by 10-30 % before
# a measurement, a few tenths of a percent of loss), so measuring would buy planning time, not a
# better model. A warm rerun with a few seconds more left than the cold plan had (no data to
# prepare) keeps the cold plan's measured choice instead of compiling its neighbour.
LEADER_MARGIN = 0.005
MEMORY_HEADROOM = 0.7  # plan to use at most this fraction of device memory
# The white paper's tiers (its 3.1.2 and 3.1.3): (hours below, shape, dataset fraction).
SEED_TIERS = (
    (0.01, (1, 64, 4, 4), 0.05), (0.1, (4, 256, 8, 8), 0.05), (0.5, (4, 256, 8, 8), 0.1),
    (1.0, (12, 512, 8, 8), 0.2), (3.0, (12, 768, 12, 12), 0.3), (6.0, (30, 768, 16, 16), 0.5),
    (12.0, (30, 768, 16, 16), 0.7), (math.inf, (30, 768, 16, 16), 0.9),
)


@dataclass(frozen=True)
class Plan:
    mode: str  # "budget" or "steps"
    planner: str
    model: dict  # the model section as resolved (shape chosen, vocab from the tokenizer)
    params: int
    non_embedding_params: int
    batch_size: int
    seq_len: int
    steps: int  # planned; a budgeted loop re-fits this against the clock
    tokens: int
    epochs: float
    subset_fraction: float  # of the training windows; 1.0 = all of them
    tokens_per_param: float
    flops_per_token: float  # active parameters only, for a MoE model
    predicted_memory_bytes: int  # every parameter, for a MoE model
    step_s: float = 0.0
    compile_s: float = 0.0
    reserve_s: float = 0.0  # evals + final checkpoint + exit + margin
    train_s: float = 0.0
    budget_s: float = 0.0
    planning_s: float = 0.0  # command start to the end of planning
    measuring_s: float = 0.0  # of which the planner's own compiles and step timings
    predicted_loss: float = 0.0  # the Chinchilla-form score (nats); only comparisons mean anything
    candidates: list = field(default_factory=list)
    mesh: list = field(default_factory=lambda: [1, 1, 1])  # (data, fsdp, tensor) planned for; memory is per device
    active_params: int = 0  # the parameters one token uses (all of them for a dense model)
    max_steps: int = 0  # budget.max_epochs of the training text, where the budget could buy more; 0 = no cap

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def effective_epochs(self) -> float:
        """The epochs the plan is worth by the repetition model (Muennighoff et al. 2023)."""
        unique = self.tokens / max(self.epochs, 1e-9)
        return effective_tokens(self.tokens, unique) / max(unique, 1.0)


def spec_for(cfg: ml_collections.ConfigDict, shape=None) -> ModelSpec:
    """The config's model (with its MoE section), with a ladder shape written in when given."""
    model_cfg = ml_collections.ConfigDict(cfg.model.to_dict())
    if shape is not None:
        model_cfg.num_layers, model_cfg.d_model, model_cfg.num_heads, model_cfg.num_kv_heads = shape
        model_cfg.head_dim = model_cfg.ffn_hidden = 0
    return ModelSpec.from_config(model_cfg, cfg.moe)


def ladder_specs(cfg: ml_collections.ConfigDict) -> list[ModelSpec]:
    """The ladder's shapes for this config; explicit moe.layers indices skip the shallower rungs."""
    specs = []
    for shape in LADDER:
        try:
            specs.append(spec_for(cfg, shape))
        except ConfigError:
            continue
    return specs


def fixed_steps_plan(cfg: ml_collections.ConfigDict, *, train_tokens: int, mesh: tuple[int, int, int] = (1, 1, 1)) -> Plan:
    return _plan(cfg, spec_for(cfg), cfg.train.batch_size, "steps", "none", cfg.train.steps, train_tokens,
                 mesh=list(mesh))


def _plan(cfg, spec: ModelSpec, batch_size: int, mode: str, planner: str, steps: int, train_tokens: int,
          subset_fraction: float = 1.0, mesh: list = (1, 1, 1), **timing) -> Plan:
    tokens = steps * batch_size * spec.seq_len
    non_embedding = count_params(spec, embedding=False)
    shape = {k: getattr(spec, k) for k in ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden", "remat",
                                       "dtype")}
    return Plan(
        mode=mode, planner=planner, model={**cfg.model.to_dict(), **shape},
        params=count_params(spec), non_embedding_params=non_embedding, active_params=count_params(spec, active=True),
        batch_size=batch_size,
        seq_len=spec.seq_len, steps=steps, tokens=tokens, epochs=tokens / max(train_tokens * subset_fraction, 1),
        subset_fraction=subset_fraction, tokens_per_param=tokens / non_embedding,
        flops_per_token=flops_per_token(spec, spec.seq_len),
        predicted_memory_bytes=memory_bytes(spec, batch_size, cfg.train.grad_accum, tuple(mesh)), mesh=list(mesh), **timing)


def seed_tier(budget_s: float) -> tuple[tuple[int, int, int, int], float]:
    hours = budget_s / 3600
    return next((shape, fraction) for limit, shape, fraction in SEED_TIERS if hours < limit)


def _candidates(cfg: ml_collections.ConfigDict, user_keys: set[str], budget_s: float, mesh: Mesh,
                memory_limit: int) -> tuple[list[tuple[ModelSpec, int]], float]:
    """(spec, global batch) pairs to choose from that fit in memory, and the subset of the training
    text the planner allows (the seed's tiers use a fraction of it)."""
    mesh_shape, dp = sharding.shape_of(mesh), sharding.data_parallel_size(mesh)
    subset_fraction, batches = 1.0, [cfg.train.batch_size]
    if cfg.budget.planner == "seed":
        shape, subset_fraction = seed_tier(budget_s)
        shapes = [spec_for(cfg, shape)]
    else:
        shapes = [spec_for(cfg)] if set(MODEL_SHAPE_KEYS) & user_keys or cfg.budget.planner == "none" \
            else ladder_specs(cfg)
        if cfg.budget.planner == "measured" and "train.batch_size" not in user_keys:
            batches = [b * dp for b in BATCH_SIZES if b % cfg.train.grad_accum == 0]
    limit = MEMORY_HEADROOM * memory_limit

    def fitting(spec: ModelSpec, batch: int) -> ModelSpec | None:
        """The shape as is if it fits in memory, else with full remat if that fits (and the user
        left remat to the planner), else None."""
        if memory_bytes(spec, batch, cfg.train.grad_accum, mesh_shape) <= limit:
            return spec
        rematted = dataclasses.replace(spec, remat="full")
        if "model.remat" not in user_keys and memory_bytes(rematted, batch, cfg.train.grad_accum, mesh_shape) <= limit:
            return rematted
        return None

    dtypes = compute_dtypes(cfg, user_keys)
    shapes = [dataclasses.replace(s, dtype=d) for s in shapes for d in dtypes]
    pairs = [(s, b) for s in shapes for b in batches]
    fits = [(fit, b) for s, b in pairs if (fit := fitting(s, b)) is not None]
    if not fits:
        need = memory_bytes(*pairs[0], cfg.train.grad_accum, mesh_shape)
        raise ConfigError(f"the model needs about {need / 2**30:.1f} GiB, more than {MEMORY_HEADROOM:.0%} of this device's "
                          f"{memory_limit / 2**30:.1f} GiB; lower train.batch_size, raise train.grad_accum or set model.remat=full")
    return fits, subset_fraction


def compute_dtypes(cfg: ml_collections.ConfigDict, user_keys: set[str]) -> list[str]:
    """The compute dtypes the planner chooses between: the user's, if set; bfloat16 on accelerators
    (their matmul units are built for it); both on CPU, where it depends on the chip (native bf16
    dot products on AVX512_BF16 and AMX, emulated and slower than float32 on AVX2): there the
    measured step times decide, and before any measurement the measured matmul rates."""
    if "model.dtype" in user_keys or cfg.budget.planner != "measured":
        return [cfg.model.dtype]
    if jax.default_backend() != "cpu":
        return ["bfloat16"]
    return list(DTYPES)


@dataclass(frozen=True)
class _Budget:
    """What every candidate is scored against: the time left and the data it can see."""

    budget_s: float
    time_left_s: float
    unique_tokens: float
    val_tokens: int


def _outlook(cfg: ml_collections.ConfigDict, spec: ModelSpec, batch_size: int, step: Measurement, b: _Budget,
             max_steps: int = 0) -> dict:
    """Steps, tokens and predicted loss of one candidate in the time left, or in `max_steps` where
    that comes first (`capped`: the run would end early; 0 = no cap)."""
    tokens_per_step = batch_size * spec.seq_len
    eval_s_per_token = deadline_lib.eval_s_per_token_prior(step.step_s, tokens_per_step)
    reserve = (deadline_lib.after_training_s(spec, eval_s_per_token=eval_s_per_token, val_tokens=b.val_tokens,
                                         budget_s=b.budget_s, margin=cfg.budget.margin)
               + deadline_lib.evals_during_training_s(eval_s_per_token=eval_s_per_token, eval_tokens=cfg.train.eval_tokens,
                                                  val_tokens=b.val_tokens))
    train_s = b.time_left_s - step.compile_s - reserve
    steps = max(0, math.floor(train_s / step.step_s))
    capped = 0 < max_steps < steps
    if capped:
        steps, train_s = max_steps, max_steps * step.step_s
    tokens = steps * tokens_per_step
    useful = effective_tokens(tokens, b.unique_tokens) * batch_efficiency(tokens_per_step, tokens, cfg.train.optimizer)
    return dict(steps=steps, train_s=train_s, reserve_s=reserve, tokens=tokens, capped=capped,
                loss=predicted_loss(count_params(spec), useful), ratio=tokens / count_params(spec, embedding=False))


def _ranking(rows: list[dict], limit: float, tokens_per_param: float) -> list[int]:
    """Feasible candidates, best first: lowest predicted loss, or with `tokens_per_param` > 0 the
    largest model that still gets that many tokens per parameter."""
    feasible = [i for i, r in enumerate(rows) if r["steps"] >= MIN_STEPS and r["memory_bytes"] <= limit] or [0]
    by_loss = sorted(feasible, key=lambda i: rows[i]["loss"])
    if tokens_per_param > 0:
        enough = [i for i in feasible if rows[i]["ratio"] >= tokens_per_param]
        best = max(enough, key=lambda i: (rows[i]["non_embedding_params"], rows[i]["tokens"])) if enough else feasible[0]
        return [best] + [i for i in by_loss if i != best]
    return by_loss


def _score_all(cfg, candidates: list[tuple[ModelSpec, int]], cache: CalibrationCache, mesh: Mesh, b: _Budget) -> list[dict]:
    """Every candidate scored, from its measurement where cached, else from its family's fitted
    time model (one per dtype and remat policy: they cost differently)."""
    models: dict[tuple[str, str], object] = {}
    rows = []
    for spec, batch in candidates:
        measured = cache.cached(spec, cfg.train, batch, mesh)
        if measured is None and (spec.dtype, spec.remat) not in models:
            models[spec.dtype, spec.remat] = cache.time_model(spec, cfg.train, mesh)
        timing = measured or models[spec.dtype, spec.remat].predict(flops_per_step(spec, batch))
        rows.append(dict(num_layers=spec.num_layers, d_model=spec.d_model, batch_size=batch, remat=spec.remat,
                         dtype=spec.dtype,
                         non_embedding_params=count_params(spec, embedding=False), step_s=timing.step_s,
                         measured=measured is not None, **_outlook(cfg, spec, batch, timing, b),
                         # the compiled executable's own figure, once measured, overrides the model
                         memory_bytes=(measured and measured.memory_bytes)
                         or memory_bytes(spec, batch, cfg.train.grad_accum, sharding.shape_of(mesh))))
    return rows


def _contenders(candidates: list[tuple[ModelSpec, int]], ranked: list[int]) -> list[int]:
    """The leader, then the leader in the other compute dtype (it decides every shape's dtype;
    unmeasured, a dtype is predicted from square matmul peaks, which overstate bf16 for thin
    products: docs/perf.md), then the runner-up."""
    leader, batch = candidates[ranked[0]]
    twins = [i for i in ranked if candidates[i][1] == batch and candidates[i][0].dtype != leader.dtype
             and dataclasses.replace(candidates[i][0], dtype=leader.dtype) == leader]
    return list(dict.fromkeys([ranked[0], *twins, *ranked[1:CONTENDERS]]))


def _measure_contenders(cfg, candidates, cache: CalibrationCache, mesh: Mesh, budget: Callable[[], _Budget],
                        limit: float, *, log, allowance_s: float, spent: Callable[[], float],
                        startup_s: float) -> list[dict]:
    """Measures until the `_contenders` are all measured, not predicted (a candidate the time
    model wrongly thinks slow would otherwise never get the chance to win), the
    planning allowance is spent, or MAX_MEASUREMENTS were taken; returns the final scores.

    An unmeasured leader is measured first whatever it costs (its compile is the run's own),
    unless a measured candidate is within LEADER_MARGIN of it. Any other measurement costs what the
    last one cost, and is taken only if it still fits in the allowance, after the `startup_s`
    before planning. Measurements that earlier plans on this machine paid for count against it as
    if paid now, and so do the first one's `PROBES_S`, so a warm rerun reaches the state the first
    run stopped in and measures nothing."""
    charged_s, last_cost_s, first = startup_s, 0.0, True
    for _ in range(MAX_MEASUREMENTS):
        rows = _score_all(cfg, candidates, cache, mesh, budget())
        ranked = _ranking(rows, limit, cfg.budget.tokens_per_param)
        if first:  # what earlier plans on this machine already measured counts as if paid now
            cached = [cache.cached(spec, cfg.train, batch, mesh) for (spec, batch), r in zip(candidates, rows) if r["measured"]]
            charged_s += sum(m.cost_s for m in cached) + (PROBES_S if cached else 0.0)
            last_cost_s = max((m.cost_s for m in cached), default=0.0)
        unmeasured = [i for i in _contenders(candidates, ranked) if not rows[i]["measured"]]
        if not unmeasured:
            return rows
        close = any(rows[i]["measured"] and rows[i]["loss"] <= (1 + LEADER_MARGIN) * rows[ranked[0]]["loss"] for i in ranked)
        free = first and unmeasured[0] == ranked[0] and not close
        if not free and charged_s + spent() + last_cost_s > allowance_s:
            return rows
        first = False
        spec, batch = candidates[unmeasured[0]]
        last_cost_s = cache.get(spec, cfg.train, batch, mesh, log=log).cost_s
    return _score_all(cfg, candidates, cache, mesh, budget())


def budget_plan(cfg: ml_collections.ConfigDict, *, budget_s: float, deadline: float, train_tokens: int,
                val_tokens: int, cache: CalibrationCache, user_keys: set[str], memory_limit: int,
                mesh: Mesh | None = None, log: Callable[[str], None] = lambda s: None,
                clock: Callable[[], float] = time.time, corpus: str | None = None) -> Plan:
    """Chooses the model, global batch and step count that fill the time left before `deadline`
    on `mesh` (default: one device); `memory_limit` is one device's memory. With `corpus` (the
    data's fingerprint), the start-up charged is the longest any run on it paid here (`startup_s`)."""
    mesh = mesh or sharding.single_device_mesh()
    candidates, subset_fraction = _candidates(cfg, user_keys, budget_s, mesh, memory_limit)
    limit = MEMORY_HEADROOM * memory_limit

    def budget() -> _Budget:
        return _Budget(budget_s, deadline - clock(), train_tokens * subset_fraction, val_tokens)

    started = clock()
    startup_s = budget_s - (deadline - started)
    if corpus is not None:
        startup_s = cache.startup_s(corpus, startup_s)
    rows = _measure_contenders(cfg, candidates, cache, mesh, budget, limit, log=log,
                               allowance_s=PLANNING_SHARE * budget_s, spent=lambda: clock() - started,
                               startup_s=startup_s)
    ranked = _ranking(rows, limit, cfg.budget.tokens_per_param)
    # The leader if it was measured; else (the allowance ran out) the best measured candidate:
    # a promise never rests on an extrapolation.
    index = next((i for i in ranked if rows[i]["measured"]), ranked[0])
    choice, batch = candidates[index]
    measured = cache.get(choice, cfg.train, batch, mesh, log=log)
    final = _outlook(cfg, choice, batch, measured, budget(),
                     max_steps=_epoch_cap(cfg, batch * choice.seq_len, train_tokens * subset_fraction))
    if final["steps"] < MIN_STEPS:
        # what the non-training parts took, plus 20 steps, with a quarter more for their variance
        need = math.ceil(1.25 * (budget_s - final["train_s"] + MIN_STEPS * measured.step_s))
        raise ConfigError(f"budget {budget_s:g}s is too small to train here: the smallest plan needs about "
                          f"{need}s (data, compile, {MIN_STEPS} steps, evals, save); try budget={need}s")
    return _plan(cfg, choice, batch, "budget", cfg.budget.planner, final["steps"], train_tokens, subset_fraction,
                 step_s=measured.step_s, compile_s=measured.compile_s, reserve_s=final["reserve_s"],
                 train_s=final["train_s"], budget_s=budget_s, planning_s=budget_s - (deadline - clock()),
                 measuring_s=clock() - started,
                 predicted_loss=final["loss"], candidates=rows if len(rows) > 1 else [],
                 mesh=list(sharding.shape_of(mesh)), max_steps=final["steps"] if final["capped"] else 0)


def _epoch_cap(cfg: ml_collections.ConfigDict, tokens_per_step: int, unique_tokens: float) -> int:
    """The steps of `budget.max_epochs` passes over the training text (at least MIN_STEPS; 0 = no
    cap). The repetition model never predicts the held-out loss rising, and it does: past 6.5 passes
    in the one-hour wiki run (docs/budget.md). It caps the choice, after the ranking: scoring every
    candidate on capped tokens, so a larger model would use the freed time, was measured to buy nothing."""
    return max(MIN_STEPS, math.ceil(cfg.budget.max_epochs * unique_tokens / tokens_per_step)) if cfg.budget.max_epochs else 0


def apply_plan(cfg: ml_collections.ConfigDict, plan: Plan) -> ml_collections.ConfigDict:
    """The resolved config: the user's config with the planner's choices written in, and the
    learning rate `train.lr=0` stands for, so that the saved config says what the run used."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in plan.model.items():
        cfg.model[key] = value
    cfg.train.batch_size = plan.batch_size
    cfg.train.lr = peak_lr(cfg.train)
    return cfg
