"""The planner against known numbers: cost and memory models, allocation, budget refusals."""

import json
import math
import subprocess
import sys
import textwrap
from dataclasses import replace

import jax
import pytest

from pufferfish_jax.budget import calibrate, loss_model, planner
from pufferfish_jax.budget.calibrate import TimeModel, flops_per_step
from pufferfish_jax.budget.memory import memory_bytes
from pufferfish_jax.config import apply_overrides, defaults
from pufferfish_jax.errors import ConfigError
from pufferfish_jax.model.transformer import count_params, flops_per_token, init_variables
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.sharding import single_device_mesh
from pufferfish_jax.train.state import abstract_state, make_optimizer


class FakeCache:
    """A machine whose step time is exactly overhead + FLOPs / rate; counts measurements."""

    def __init__(self, rate=50e9, overhead=0.002, compile_s=3.0):
        self.model = TimeModel(overhead, 1 / rate, compile_s)
        self.measured = {}

    def time_model(self, spec, train_cfg, mesh):
        return self.model

    def cached(self, spec, train_cfg, batch_size, mesh):
        return self.measured.get((spec, batch_size))

    def get(self, spec, train_cfg, batch_size, mesh, log=None):
        return self.measured.setdefault((spec, batch_size), self.model.predict(flops_per_step(spec, batch_size)))

    def startup_s(self, corpus, seconds):  # as CalibrationCache's: the longest start-up seen (tested below)
        self.startups = getattr(self, "startups", {})
        self.startups[corpus] = max(self.startups.get(corpus, 0.0), seconds)
        return self.startups[corpus]


def _plan(budget_s, cache=None, user_keys=(), train_tokens=1_200_000, **overrides):
    cfg = apply_overrides(defaults(), [f"budget={budget_s}s", "model.vocab_size=8192",
                                       *[f"{k}={v}" for k, v in overrides.items()]])
    return planner.budget_plan(cfg, budget_s=budget_s, deadline=1000.0 + budget_s, train_tokens=train_tokens,
                               val_tokens=14_000, cache=cache or FakeCache(), user_keys=set(user_keys),
                               memory_limit=24 * 2**30, clock=lambda: 1000.0)


def test_count_and_flops_match_a_hand_computed_model():
    spec = ModelSpec.from_config(apply_overrides(defaults(), ["model.vocab_size=1000", "model.num_layers=2",
                                                              "model.d_model=64", "model.num_heads=4",
                                                              "model.num_kv_heads=2"]).model)
    D, H, K, N, F, V, L, T = 64, 16, 2, 4, 192, 1000, 2, 256
    block = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
    assert count_params(spec, embedding=False) == L * (block + 2 * D) + D
    assert count_params(spec) == L * (block + 2 * D) + D + V * D
    assert flops_per_token(spec, T) == 6 * (L * block + D * V) + 12 * L * T * N * H
    leaves = jax.tree.leaves(jax.eval_shape(lambda: init_variables(spec, jax.random.key(0))[0]))
    assert sum(math.prod(x.shape) for x in leaves) == count_params(spec)


def test_memory_model_counts_state_and_activations():
    spec = ModelSpec.from_config(apply_overrides(defaults(), ["model.vocab_size=8192"]).model)
    state = abstract_state(spec, make_optimizer(defaults().train))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    small, large = memory_bytes(spec, 8, 1), memory_bytes(spec, 16, 1)
    assert small > state_bytes  # params + two Adam moments, plus grads and activations
    assert large > small  # activations grow with the batch
    remat = ModelSpec.from_config(apply_overrides(defaults(), ["model.vocab_size=8192", "model.remat=full"]).model)
    assert memory_bytes(remat, 16, 1) < large


@pytest.mark.parametrize("budget_s", [120, 300, 600, 3600])
def test_plan_fills_the_time_left(budget_s):
    plan = _plan(budget_s)
    assert plan.steps >= planner.MIN_STEPS
    used = plan.compile_s + plan.steps * plan.step_s + plan.reserve_s
    assert used <= budget_s and plan.train_s - plan.steps * plan.step_s < plan.step_s + 1e-9


def test_allocation_is_monotone_in_budget():
    """More time never buys a smaller model or less training compute; with the shape unchanged it
    never buys fewer tokens. (A step up the ladder can trade some tokens for the larger model.)"""
    plans = [_plan(b, FakeCache(rate=60e9, overhead=0.005)) for b in [*range(60, 1200, 30), 1800, 3600, 7200, 36000]]
    for smaller, larger in zip(plans, plans[1:]):
        assert larger.non_embedding_params >= smaller.non_embedding_params
        assert larger.tokens * larger.flops_per_token >= smaller.tokens * smaller.flops_per_token
        if larger.model == smaller.model and larger.batch_size == smaller.batch_size:
            assert larger.tokens >= smaller.tokens


def test_a_faster_machine_gets_a_bigger_model():
    slow, fast = _plan(600, FakeCache(rate=20e9)), _plan(600, FakeCache(rate=2000e9))
    assert fast.non_embedding_params > slow.non_embedding_params


def test_user_shape_and_batch_are_kept():
    plan = _plan(300, user_keys={"model.num_layers", "train.batch_size"}, **{"model.num_layers": 3, "train.batch_size": 12})
    assert (plan.model["num_layers"], plan.batch_size) == (3, 12)


def test_only_a_few_shapes_are_measured():
    cache = FakeCache()
    _plan(600, cache)
    assert 1 <= len(cache.measured) <= planner.MAX_MEASUREMENTS + 1


class DtypeCache(FakeCache):
    """A machine whose float32 steps take `fp32_over_bf16` times the bfloat16 ones, and whose
    every measurement costs `compile_s` plus `extra_s` (state, timed steps) of a shared fake clock."""

    def __init__(self, fp32_over_bf16: float, clock: list, compile_s: float = 3.0, extra_s: float = 0.0):
        super().__init__(compile_s=compile_s)
        self.ratio, self.clock, self.compile_s, self.extra_s = fp32_over_bf16, clock, compile_s, extra_s

    def _timing(self, spec, batch_size):
        base = self.model.predict(flops_per_step(spec, batch_size))
        scale = self.ratio if spec.dtype == "float32" else 1.0
        return planner.Measurement(compile_s=base.compile_s, step_s=base.step_s * scale, cold_compile_s=self.compile_s,
                                   measure_s=self.compile_s + self.extra_s)

    def time_model(self, spec, train_cfg, mesh):
        scale = self.ratio if spec.dtype == "float32" else 1.0
        return TimeModel(self.model.overhead_s * scale, self.model.s_per_flop * scale, self.model.compile_s)

    def get(self, spec, train_cfg, batch_size, mesh, log=None):
        if (spec, batch_size) not in self.measured:
            self.clock[0] += self.compile_s + self.extra_s
        return self.measured.setdefault((spec, batch_size), self._timing(spec, batch_size))


def _dtype_plan(budget_s, cache, clock, user_keys=(), data_s=0.0, **overrides):
    """The plan for `budget_s` after `data_s` of the budget went to preparing data."""
    cfg = apply_overrides(defaults(), [f"budget={budget_s}s", "model.vocab_size=8192",
                                       *[f"{k}={v}" for k, v in overrides.items()]])
    return planner.budget_plan(cfg, budget_s=budget_s, deadline=clock[0] + budget_s - data_s, train_tokens=1_200_000,
                               val_tokens=14_000, cache=cache, user_keys=set(user_keys),
                               memory_limit=24 * 2**30, clock=lambda: clock[0], corpus="wiki")


@pytest.mark.parametrize("fp32_over_bf16, expected", [(0.7, "float32"), (1.6, "bfloat16")])
def test_cpu_plan_computes_in_the_faster_dtype(fp32_over_bf16, expected):
    clock = [1000.0]
    plan = _dtype_plan(300, DtypeCache(fp32_over_bf16, clock), clock)
    assert plan.model["dtype"] == expected
    assert {c["dtype"] for c in plan.candidates} == {"bfloat16", "float32"}


class MispredictedDtypeCache(DtypeCache):
    """Predicts float32 at `predicted` times the bfloat16 step (as the two matmul peaks would)
    while it really runs at `fp32_over_bf16` times it."""

    def __init__(self, fp32_over_bf16: float, predicted: float, clock: list, compile_s: float = 1.0):
        super().__init__(fp32_over_bf16, clock, compile_s)
        self.predicted = predicted

    def time_model(self, spec, train_cfg, mesh):
        scale = self.predicted if spec.dtype == "float32" else 1.0
        return TimeModel(self.model.overhead_s * scale, self.model.s_per_flop * scale, self.model.compile_s)


def test_the_leader_is_measured_in_the_other_dtype_before_the_dtype_is_chosen():
    """The peaks predict float32 at half bfloat16's speed; measured, it is a little faster: the
    plan computes in float32 (only the prediction ever saw it slower)."""
    clock = [1000.0]
    cache = MispredictedDtypeCache(0.9, 2.0, clock)
    plan = _dtype_plan(600, cache, clock)
    assert {spec.dtype for spec, _ in cache.measured} == {"bfloat16", "float32"}
    assert plan.model["dtype"] == "float32"


def test_a_dtype_the_user_set_is_kept():
    clock = [1000.0]
    plan = _dtype_plan(300, DtypeCache(0.5, clock), clock, user_keys={"model.dtype"}, **{"model.dtype": "bfloat16"})
    assert plan.model["dtype"] == "bfloat16" and {c["dtype"] for c in plan.candidates} == {"bfloat16"}


@pytest.mark.parametrize("compile_s, budget_s, most", [(10.0, 120, 1), (10.0, 300, 2), (1.0, 600, planner.MAX_MEASUREMENTS)])
def test_measurements_stop_when_the_planning_allowance_is_spent(compile_s, budget_s, most):
    """The first measurement is always taken; each further one only while its compile still fits
    in PLANNING_SHARE of the budget; the plan then rests on a measured candidate."""
    clock = [1000.0]
    cache = DtypeCache(1.0, clock, compile_s=compile_s)
    plan = _dtype_plan(budget_s, cache, clock)
    assert 1 <= len(cache.measured) <= most
    assert plan.measuring_s == pytest.approx(compile_s * len(cache.measured))
    chosen = next(c for c in plan.candidates if c["num_layers"] == plan.model["num_layers"] and c["d_model"] ==
                  plan.model["d_model"] and c["batch_size"] == plan.batch_size and c["dtype"] == plan.model["dtype"])
    assert chosen["measured"]


@pytest.mark.parametrize("budget_s", [120, 300, 600])
def test_a_warm_rerun_measures_nothing(budget_s):
    """Whatever the first plan measured is cached; planning the same budget again on the same
    machine compiles nothing, so warm planning costs no compile at all."""
    clock = [1000.0]
    cache = DtypeCache(0.8, clock, compile_s=10.0)
    first = _dtype_plan(budget_s, cache, clock)
    measured = dict(cache.measured)
    second = _dtype_plan(budget_s, cache, clock)
    assert cache.measured == measured and second.measuring_s == 0.0
    assert (second.model, second.batch_size) == (first.model, first.batch_size)


@pytest.mark.parametrize("budget_s", [120, 300, 600])
@pytest.mark.parametrize("fp32_over_bf16", [0.8, 1.25])
def test_a_warm_rerun_with_more_time_left_measures_nothing(budget_s, fp32_over_bf16):
    """As on a real machine: each measurement costs more than its compile (the state, the timed
    steps), and the cold plan lost 3 % of its budget to preparing data that the warm rerun finds
    cached. The rerun has more time left, so it may rank a bigger neighbour first; it still
    measures nothing and trains a measured shape."""
    clock = [1000.0]
    cache = DtypeCache(fp32_over_bf16, clock, compile_s=4.0, extra_s=3.0)
    _dtype_plan(budget_s, cache, clock, data_s=0.03 * budget_s)
    measured = dict(cache.measured)
    second = _dtype_plan(budget_s, cache, clock)
    assert cache.measured == measured and second.measuring_s == 0.0
    chosen = tuple(second.model[k] for k in ("num_layers", "d_model", "dtype")) + (second.batch_size,)
    assert chosen in {(spec.num_layers, spec.d_model, spec.dtype, batch) for spec, batch in measured}


def test_a_long_data_preparation_leaves_less_room_for_measurements():
    """The start-up before planning counts against the planning allowance (24 s at 10m): with the
    data cached the planner times the leader's dtype twin too (7 s each); after 12 s of data
    preparation only the leader, whose measurement is always taken."""
    counts = {}
    for data_s in (0.0, 12.0):
        clock = [1000.0]
        cache = DtypeCache(0.9, clock, compile_s=4.0, extra_s=3.0)
        plan = _dtype_plan(600, cache, clock, data_s=data_s)
        counts[data_s] = len(cache.measured)
        assert plan.measuring_s == pytest.approx(7.0 * counts[data_s])
    assert counts[0.0] >= 2 and counts[12.0] == 1


def test_the_start_up_charged_is_the_longest_a_run_on_the_corpus_paid_on_this_machine(tmp_path):
    cache = calibrate.CalibrationCache(tmp_path)
    assert cache.startup_s("wiki", 8.5) == 8.5  # the first run prepared the corpus
    assert calibrate.CalibrationCache(tmp_path).startup_s("wiki", 1.2) == 8.5  # a rerun loads it, is charged 8.5
    assert calibrate.CalibrationCache(tmp_path).startup_s("kjv", 1.2) == 1.2  # another corpus, its own
    assert calibrate.CalibrationCache(tmp_path).startup_s("wiki", 9.0) == 9.0


class ProbingCache(DtypeCache):
    """A DtypeCache whose first time model costs the two matmul probes on the clock, as a cold
    plan's prior does on a real machine."""

    probed = False

    def time_model(self, spec, train_cfg, mesh):
        if not self.probed:
            self.probed, self.clock[0] = True, self.clock[0] + calibrate.PROBES_S
        return super().time_model(spec, train_cfg, mesh)


def test_a_warm_rerun_charges_the_probes_the_cold_plan_paid_and_measures_nothing():
    """The cold 5m plan spends the probes (2 s) and one 6 s measurement, and the float32 twin's
    6 s more would pass the 12 s allowance: it stops. The warm rerun has no probes to pay; counting
    only the cached measurement (6 + 6 = 12 s, not past the allowance) it measured the twin."""
    clock = [1000.0]
    cache = ProbingCache(0.9, clock, compile_s=4.0, extra_s=2.0)
    _dtype_plan(300, cache, clock)
    measured = dict(cache.measured)
    assert len(measured) == 1  # the cold plan stopped after its leader
    second = _dtype_plan(300, cache, clock)
    assert cache.measured == measured and second.measuring_s == 0.0


def test_tokens_per_param_rule():
    # a corpus the hour cannot repeat past budget.max_epochs, so only the rule limits the tokens
    plan = _plan(3600, FakeCache(rate=2e12), train_tokens=200_000_000, **{"budget.tokens_per_param": 20.0})
    assert plan.tokens_per_param >= 20.0
    bigger = [c for c in plan.candidates if c["non_embedding_params"] > plan.non_embedding_params]
    assert bigger and all(c["ratio"] < 20.0 for c in bigger)


def test_a_small_corpus_caps_the_plan_at_max_epochs():
    """An hour on 200k tokens: the plan stops at budget.max_epochs (6) passes, with time left over;
    with no cap it repeats the text far more often. The cap ends the run, it does not change what
    it trains. Two minutes on 1.2M tokens are not capped."""
    capped, free = _plan(3600, train_tokens=200_000), _plan(3600, train_tokens=200_000, **{"budget.max_epochs": 0})
    assert (capped.model, capped.batch_size) == (free.model, free.batch_size)
    per_step = capped.batch_size * capped.seq_len
    assert capped.max_steps == capped.steps and 6 <= capped.epochs < 6 + per_step / 200_000
    assert capped.train_s == pytest.approx(capped.steps * capped.step_s)
    assert capped.planning_s + capped.compile_s + capped.train_s + capped.reserve_s < 0.9 * 3600  # ends early
    assert free.max_steps == 0 and free.epochs > 12
    assert _plan(120).max_steps == 0


def test_too_small_budget_names_the_minimum():
    with pytest.raises(ConfigError, match=r"too small.*try budget=\d+s"):
        _plan(5)


def test_seed_tiers_follow_the_white_paper():
    assert planner.seed_tier(20) == ((1, 64, 4, 4), 0.05)
    assert planner.seed_tier(300) == ((4, 256, 8, 8), 0.05)
    assert planner.seed_tier(1200) == ((4, 256, 8, 8), 0.1)
    plan = _plan(300, **{"budget.planner": "seed"})
    assert (plan.model["num_layers"], plan.model["d_model"], plan.subset_fraction) == (4, 256, 0.05)


def test_repeated_epochs_are_discounted():
    assert loss_model.effective_tokens(1e6, 2e6) == 1e6
    four_epochs = loss_model.effective_tokens(4e6, 1e6)
    assert 3.5e6 < four_epochs < 4e6  # Muennighoff: up to ~4 epochs are nearly as good as new data
    assert loss_model.effective_tokens(100e6, 1e6) < 17e6  # and then the value fades


def test_memory_fit_turns_on_remat_then_refuses():
    big = dict(user_keys={"model.num_layers", "model.d_model", "train.batch_size"},
               **{"model.num_layers": 24, "model.d_model": 1024, "model.num_heads": 16, "model.num_kv_heads": 8,
                  "train.batch_size": 64})
    cfg = apply_overrides(defaults(), ["budget=3600s", "model.vocab_size=8192",
                                       *[f"{k}={v}" for k, v in big.items() if k != "user_keys"]])
    spec = ModelSpec.from_config(cfg.model)
    plain = memory_bytes(spec, 64, 1)
    limit = int(plain / planner.MEMORY_HEADROOM) - 1  # just too small without remat
    plan = planner.budget_plan(cfg, budget_s=3600, deadline=4600.0, train_tokens=10**9, val_tokens=14_000,
                               cache=FakeCache(rate=1e14), user_keys=big["user_keys"], memory_limit=limit,
                               clock=lambda: 1000.0)
    assert plan.model["remat"] == "full" and plan.predicted_memory_bytes < plain
    with pytest.raises(ConfigError, match="GiB"):
        planner.budget_plan(cfg, budget_s=3600, deadline=4600.0, train_tokens=10**9, val_tokens=14_000,
                            cache=FakeCache(rate=1e14), user_keys=big["user_keys"] | {"model.remat"},
                            memory_limit=limit, clock=lambda: 1000.0)


def test_a_step_is_timed_at_its_steady_speed_not_in_its_first_runs():
    """A fresh executable's runs after the warm-up, as measured here (2 x d128, batch 8): the
    median of the first three is 1.45x the steady time; a short step runs on for up to a second
    and is timed on its last three. A long step is timed on three runs, as before."""
    clock, runs = [0.0], []

    def stepper(times):
        def run_step():
            runs.append(1)
            clock[0] += times[min(len(runs), len(times)) - 1]
        return run_step

    fresh = [0.222, 0.188, 0.121, 0.117, 0.125, 0.121, 0.118, 0.115, 0.119, 0.127, 0.122, 0.122]
    assert sorted(fresh[:3])[1] == pytest.approx(0.188)  # what three runs after the warm-up read
    assert calibrate.steady_step_s(stepper(fresh), 3, clock=lambda: clock[0]) == pytest.approx(0.121)
    assert len(runs) == 7  # a second's worth (1.01 s), within SETTLE_STEPS
    runs.clear()
    assert calibrate.steady_step_s(stepper([2.1, 2.0, 1.9, 2.0]), 3, clock=lambda: clock[0]) == pytest.approx(2.0)
    assert len(runs) == 3


def test_a_run_that_saw_slower_steps_scales_every_cached_shape_alike(tmp_path, monkeypatch):
    """A run whose steps took 2x the plan's (a busy machine) doubles every step time cached for
    the machine, not only its own shape's: the shapes keep the order they were measured in, so the
    next plan does not move to a neighbour only because that one was timed on the quiet machine.
    Compile times and matmul peaks are not step times and stay."""
    monkeypatch.setattr(calibrate, "measure", lambda spec, train_cfg, batch, mesh: planner.Measurement(
        compile_s=4.0, step_s=1e-3 * spec.num_layers * batch))
    monkeypatch.setattr(calibrate, "matmul_rate", lambda dtype: 1e11)
    cfg = apply_overrides(defaults(), ["model.vocab_size=512", "model.d_model=64", "model.num_heads=2",
                                       "model.num_kv_heads=1", "model.seq_len=64"])
    mesh = single_device_mesh()
    shapes = [(replace(ModelSpec.from_config(cfg.model), num_layers=layers), batch) for layers, batch in
              ((2, 4), (2, 8), (3, 4), (3, 16))]
    cache = calibrate.CalibrationCache(tmp_path)
    before = [cache.get(spec, cfg.train, batch, mesh).step_s for spec, batch in shapes]
    peak = cache.peak_flops()
    cache.scale_step_times(2.0)
    reread = calibrate.CalibrationCache(tmp_path)
    after = [reread.cached(spec, cfg.train, batch, mesh) for spec, batch in shapes]
    assert [m.step_s for m in after] == pytest.approx([2 * s for s in before])
    assert {m.compile_s for m in after} == {4.0} and reread.peak_flops() == peak


@pytest.mark.parametrize("beside_encoder", [False, True])
def test_a_run_slowed_by_its_own_corpus_encoder_corrects_no_step_time(tmp_path, monkeypatch, beside_encoder):
    """Steps 3x slower than planned scale the cache, unless the run trained beside the encoder of
    its own growing stream: that slowdown was its own, and the next plan would inherit it."""
    from types import SimpleNamespace

    from pufferfish_jax import session
    monkeypatch.setattr(calibrate, "measure", lambda spec, train_cfg, batch, mesh: planner.Measurement(
        compile_s=1.0, step_s=0.1))
    cfg = apply_overrides(defaults(), ["model.vocab_size=512", "model.d_model=64", "model.num_heads=2",
                                       "model.num_kv_heads=1", f"data.cache_dir={tmp_path}"])
    spec, mesh = ModelSpec.from_config(cfg.model), single_device_mesh()
    calibrate.CalibrationCache(tmp_path).get(spec, cfg.train, 8, mesh)
    said = []
    session._correct_calibration(cfg, SimpleNamespace(mode="budget", step_s=0.1), SimpleNamespace(step_s=0.3),
                                 said.append, beside_encoder=beside_encoder)
    after = calibrate.CalibrationCache(tmp_path).cached(spec, cfg.train, 8, mesh).step_s
    assert after == pytest.approx(0.1 if beside_encoder else 0.3)
    assert bool(said) is not beside_encoder


@pytest.mark.slow  # compiles and runs a train step in a fresh process
def test_measured_compile_is_the_persistent_cache_read_back(tmp_path):
    """The plan's compile is what the run pays: measuring fills the persistent compilation cache,
    so a training run of that shape only reads the executable back."""
    script = textwrap.dedent(f"""
        import dataclasses, json, time, jax, numpy as np
        jax.config.update("jax_compilation_cache_dir", {str(tmp_path / "jax")!r})
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        from pufferfish_jax.budget.calibrate import measure
        from pufferfish_jax.config import apply_overrides, defaults
        from pufferfish_jax.model.transformer import ModelSpec
        from pufferfish_jax.sharding import batch_sharding, single_device_mesh
        from pufferfish_jax.train.state import init_state, make_optimizer
        from pufferfish_jax.train.step import make_train_step
        cfg = apply_overrides(defaults(), ["model.vocab_size=512", "model.num_layers=2", "model.d_model=64",
                                           "model.num_heads=2", "model.num_kv_heads=1", "model.seq_len=64"])
        spec, mesh = ModelSpec.from_config(cfg.model), single_device_mesh()
        m = measure(spec, cfg.train, 4, mesh, steps=1)
        # what a training run of the shape pays: a fresh jit, lowered and read back from the cache
        optimizer = make_optimizer(cfg.train)
        state = jax.eval_shape(lambda: init_state(spec, optimizer, jax.random.key(0)))
        window = jax.ShapeDtypeStruct((4, 65), "int32", sharding=batch_sharding(mesh))
        jax.clear_caches()
        start = time.perf_counter()
        make_train_step(spec, optimizer, cfg.train.grad_accum, mesh).lower(state, window, np.float32(0)).compile()
        print(json.dumps(dict(dataclasses.asdict(m), read_back_s=time.perf_counter() - start)))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["cold_compile_s"] > 0.2  # long enough for the persistent cache to keep it
    assert any((tmp_path / "jax").iterdir())
    assert 0 < m["read_back_s"] < m["cold_compile_s"]  # the run's compile was a cache hit ...
    assert 0.5 * m["read_back_s"] < m["compile_s"] < 2 * m["read_back_s"]  # ... and the plan's figure is its cost
    assert m["step_s"] > 0


@pytest.mark.parametrize("budget_s", [120, 600])
def test_muon_takes_larger_batches_than_adamw_on_the_same_machine(budget_s):
    """Muon's critical batch is twice AdamW's (measured: docs/recipe.md), so on the same step
    times the Muon plan takes a larger batch, and its score prefers a doubled batch where AdamW's
    prefers the original."""
    adamw, muon = (_plan(budget_s, **{"train.optimizer": name}) for name in ("adamw", "muon"))
    assert muon.batch_size > adamw.batch_size
    tokens, per_step = 1e6, 1024
    for name, better in (("adamw", per_step), ("muon", 2 * per_step)):
        scores = {b: loss_model.batch_efficiency(b, tokens, name) for b in (per_step, 2 * per_step)}
        assert max(scores, key=scores.get) == better
