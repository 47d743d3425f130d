"""Measured step times: compile and run the real train step for a shape, cached per machine.

The planner's promise rests on these numbers, so they come from the same jitted function the loop
will run (same shapes, same optimizer constants). A side effect is deliberate: measuring the
chosen shape fills JAX's persistent compilation cache, so the run's own compile is a cache hit.

On a mesh the step is timed on this process's block of it (the whole mesh in a one-process run)
with the same per-device batch, and the measurements are keyed by the mesh shape.

Between measurements, step time is modelled as overhead + FLOPs / rate, fitted to every shape
measured so far on this machine with the same batch, context, dtype and remat; before any
measurement the rate is a fraction of the measured matmul rate.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, ContextManager

import jax
import jaxlib
import ml_collections
import numpy as np
from jax.experimental import serialize_executable
from jax.sharding import Mesh

from pufferfish_jax import sharding
from pufferfish_jax.budget.hardware import PROBE_SECONDS, cpu_info, matmul_rate, probe
from pufferfish_jax.model.moe import resolve_dispatch
from pufferfish_jax.model.transformer import flops_per_token
from pufferfish_jax.model.spec import DTYPES, ModelSpec
from pufferfish_jax.train.state import abstract_state, make_optimizer
from pufferfish_jax.train.step import make_train_step

PRIOR_EFFICIENCY = 0.3  # fraction of the probed matmul rate a whole train step reaches (0.25-0.5 measured here)
PRIOR_COMPILE_S = 4.0
SETTLE_S = 1.0  # a measurement runs a short step for up to this long, so it is timed at its steady speed ...
SETTLE_STEPS = 10  # ... in at most this many runs
PEAK_PROBES = 3  # a matmul peak is the best of this many probes, taken by separate runs ...
PEAK_SPREAD_S = 60.0  # ... at least this far apart, so they sample different moments of a drifting machine
PROBES_S = len(DTYPES) * PROBE_SECONDS  # probing every dtype's peak (a cold plan pays it for its prior)
# Part of every cached timing's key: bump it when the train step's code changes its speed (2: the
# blocked attention; 3: huge pages and the LM head's weight-gradient order) or a Measurement field
# changes meaning (4: compile_s is the cached read-back; 5: step_s is the steady speed, see
# steady_step_s), so the planner re-measures instead of trusting old timings.
STEP_REVISION = 5


@dataclass(frozen=True)
class Measurement:
    # The compile a training run of this shape pays: measuring puts the executable in the
    # persistent compilation cache, so that is the time to read it back (lowering included);
    # the cold compile where no persistent cache is on.
    compile_s: float
    step_s: float  # median seconds per optimizer step, after a warm-up step
    memory_bytes: int = 0  # the compiled step's own memory analysis; 0 where the backend has none
    cold_compile_s: float = 0.0  # the first compile of this shape on this machine
    # The whole measurement's wall time (state, both compiles, the timed steps): what planning paid
    # for it, and what a later plan counts as already paid. 0 in caches written before it existed.
    measure_s: float = 0.0

    @property
    def cost_s(self) -> float:
        """What taking this measurement cost planning, as well as it is known."""
        return self.measure_s or self.cold_compile_s or self.compile_s


@dataclass(frozen=True)
class TimeModel:
    overhead_s: float
    s_per_flop: float
    compile_s: float

    def predict(self, flops_per_step: float) -> Measurement:
        return Measurement(compile_s=self.compile_s, step_s=self.overhead_s + self.s_per_flop * flops_per_step)


def machine_key() -> str:
    """What a timing is only valid on: the devices, the host's cores, the CPU's model and SIMD
    features (an AVX2-only CPU emulates the bf16 matmuls that AVX512_BF16 runs at twice the
    float32 rate, so timings never carry from one CPU class to another) and the versions."""
    device, cpu = jax.devices()[0], cpu_info()
    return (f"{device.platform}:{device.device_kind}:{jax.device_count()}x:{os.cpu_count()}cpu:"
            f"{cpu.model}:{'+'.join(cpu.features)}:jax{jax.__version__}:jaxlib{jaxlib.__version__}")


def family_key(spec: ModelSpec, train_cfg: ml_collections.ConfigDict, mesh: Mesh) -> str:
    """What, besides the layer shapes and the batch, changes a step's cost. The mesh shape (left
    out on one device, so measurements taken before meshes existed stay valid). MoE steps pay for
    routing and dispatch on top of their FLOPs, so every MoE setting that shapes the work is in
    the key (the layers and expert width follow the shape, and the shape key has them)."""
    key = [STEP_REVISION, train_cfg.grad_accum, spec.seq_len, spec.dtype, spec.remat, spec.attention, spec.vocab_size,
           spec.tie_embeddings]
    if spec.moe is not None:
        m = spec.moe
        key.append([m.num_experts, m.top_k, m.num_shared_experts, m.score, m.balance, m.capacity_factor,
                    resolve_dispatch(m), m.router_z_loss_weight > 0])
    if mesh.size > 1:
        key.append(list(sharding.shape_of(mesh)))
    if train_cfg.get("optimizer", "adamw") != "adamw":  # Muon's Newton-Schulz iterations cost per matrix
        key.append(train_cfg.optimizer)
    return json.dumps(key)


# ModelSpec's recipe options at their defaults (the model as it was) are left out of the shape key,
# so the timings measured before they existed stay valid; zero_init_out changes no cost at all.
_OPTION_DEFAULTS = {"qk_norm": False, "mlp": "swiglu", "logit_softcap": 0.0}


def _shape_key(spec: ModelSpec, batch_size: int) -> str:
    fields = asdict(spec)
    del fields["zero_init_out"]
    for name, default in _OPTION_DEFAULTS.items():
        if fields[name] == default:
            del fields[name]
    if fields["moe"] is None:  # a dense spec keeps the key it had before MoE existed
        del fields["moe"]
    else:  # loss weights and the bias rate change no cost: one measurement serves them all
        for name in ("bias_update_rate", "aux_loss_weight", "router_z_loss_weight"):
            del fields["moe"][name]
    return json.dumps([fields, batch_size], sort_keys=True)


def flops_per_step(spec: ModelSpec, batch_size: int) -> float:
    return flops_per_token(spec, spec.seq_len) * batch_size * spec.seq_len


def _zero_state(spec: ModelSpec, optimizer, mesh: Mesh):
    """A state of zeros with the real one's shapes, dtypes and shardings on `mesh` (this process's
    own block: every device addressable), placed from the host. A step's time does not depend on
    the values; a random init is a compile of its own (2.6 of a 12 s measurement at 2 layers x
    d128 on a 2-core CPU), and so is a jitted zeros (0.27 s there, against 0.02 s from the host)."""
    target = abstract_state(spec, optimizer, mesh)
    return jax.tree.map(lambda leaf: jax.device_put(np.zeros(leaf.shape, leaf.dtype), leaf.sharding), target)


def measure(spec: ModelSpec, train_cfg: ml_collections.ConfigDict, batch_size: int, mesh: Mesh,
            steps: int = 3) -> Measurement:
    """Compiles the train step for this shape and global batch on `mesh` and times `steps` runs
    at its steady speed after a warm-up run (`steady_step_s`); on this process's block of the mesh,
    with the same per-device batch."""
    began = time.perf_counter()
    optimizer = make_optimizer(train_cfg)
    local = sharding.local_mesh(mesh)
    batch_size = batch_size * sharding.data_parallel_size(local) // sharding.data_parallel_size(mesh)
    state = _zero_state(spec, optimizer, local)
    window = np.random.default_rng(0).integers(0, spec.vocab_size, (batch_size, spec.seq_len + 1)).astype(np.int32)
    window = jax.device_put(window, sharding.batch_sharding(local))
    lr = np.float32(0.0)
    step = make_train_step(spec, optimizer, train_cfg.grad_accum, local)
    start = time.perf_counter()
    lowered = step.lower(state, window, lr)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()  # also fills the persistent compilation cache
    cold_compile_s = compile_s = time.perf_counter() - start
    if jax.config.jax_compilation_cache_dir:  # what the training run pays: its lowering, the executable read back
        compile_s = lower_s + _load_s(compiled)
    carry = [state]

    def run_step() -> None:
        carry[0], metrics = compiled(carry[0], window, lr)
        jax.block_until_ready(metrics)

    run_step()  # the warm-up run
    return Measurement(compile_s=compile_s, step_s=steady_step_s(run_step, steps), memory_bytes=_peak_bytes(compiled),
                       cold_compile_s=cold_compile_s, measure_s=time.perf_counter() - began)


def steady_step_s(run_step: Callable[[], None], steps: int, settle_s: float = SETTLE_S,
                  most: int = SETTLE_STEPS, clock: Callable[[], float] = time.perf_counter) -> float:
    """The median time of the last `steps` runs of `run_step`, after running it for up to
    `settle_s` more (at most `most` runs in all). A fresh executable is slow for its first few
    runs: after the warm-up, a 2 x d128 batch-8 step here took 222, 188, then 115-127 ms, so the
    median of runs 2-4 was 1.45x the steady time, and every cold plan over-estimated its steps by
    that much. A step long enough to spend `settle_s` in `steps` runs is timed as before."""
    times, settle_until = [], clock() + settle_s
    while len(times) < steps or (len(times) < most and clock() < settle_until):
        start = clock()
        run_step()
        times.append(clock() - start)
    return float(np.median(times[-steps:]))


def _load_s(compiled) -> float:
    """Seconds to load `compiled` from its serialized form, as a run reads it from the persistent
    compilation cache. Lowering the step again and reading it back measures the same thing at a
    lowering's cost: at 2 layers x d128, 0.89 s against 0.63 (the first lowering) + 0.15 here."""
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    start = time.perf_counter()
    serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
    return time.perf_counter() - start


def _peak_bytes(compiled) -> int:
    """Arguments + outputs + temporaries, less what donation aliases; 0 if the backend won't say."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # not every backend implements it
        return 0


class CalibrationCache:
    """calibration.json in the cache dir: measured shapes and matmul rates per machine."""

    def __init__(self, cache_dir: Path):
        self._path = Path(cache_dir) / "calibration.json"
        try:
            self._table = json.loads(self._path.read_text())
        except (OSError, ValueError):
            self._table = {}
        self._machine = machine_key()

    def _section(self, name: str) -> dict:
        return self._table.setdefault(self._machine, {}).setdefault(name, {})

    def _save(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self._table, indent=1))
        os.replace(tmp, self._path)

    def matmul_rate(self, dtype: str, fresh: bool = False) -> float:
        """The best matmul rate (hardware.matmul_rate, one device) this machine has shown in
        `dtype`: probed when the cache has none, and again with `fresh`, keeping the faster. A peak
        is a maximum, and a busy or throttled second only ever reads low: one cold run here cached
        268 GFLOP/s where later probes read 390-429, and its dashboard over-stated MFU by 60 %.
        Its own section name: the "matmul" section of older caches holds medians, not peaks."""
        rates, probes = self._section("matmul_peak"), self._section("matmul_probes")
        if fresh or dtype not in rates:
            count, _ = self.probes(dtype)
            rates[dtype] = max(rates.get(dtype, 0.0), matmul_rate(dtype))
            probes[dtype] = [count + 1, time.time()]
            self._save()
        return rates[dtype]

    def probes(self, dtype: str) -> tuple[int, float]:
        """How many probes `dtype`'s cached peak is the best of, and when the last one was taken
        (a cache from before the count holds one probe of unknown age)."""
        count, last = self._section("matmul_probes").get(dtype, (int(dtype in self._section("matmul_peak")), 0.0))
        return int(count), float(last)

    def peak_flops(self, quiet: Callable[[], ContextManager] = contextlib.nullcontext) -> tuple[float, str]:
        """The MFU denominator for all devices and what it is: the best peak over the dtypes, from
        the data sheet (hardware.PEAK_TFLOPS) where the device is known, else measured on one
        device (every CPU) and cached like the step times; times the device count. Until a dtype's
        peak is the best of `PEAK_PROBES` probes `PEAK_SPREAD_S` apart, a run probes it again (a
        second per dtype, in the first few runs on a machine only). Probes run inside `quiet()`,
        where nothing else of this run uses the cores (a corpus still being encoded is paused)."""
        hw = probe()
        if not any(hw.peaks().values()):  # no data sheet: measure (or read back) each dtype's peak
            due = {d: self._reprobe_due(d) or d not in self._section("matmul_peak") for d in DTYPES}
            with quiet() if any(due.values()) else contextlib.nullcontext():
                rates = {d: self.matmul_rate(d, fresh=due[d]) for d in DTYPES}
            hw = replace(hw, measured_flops_fp32=rates["float32"], measured_flops_bf16=rates["bfloat16"])
        peak, label = hw.mfu_peak()
        return peak * hw.device_count, label

    def _reprobe_due(self, dtype: str) -> bool:
        count, last = self.probes(dtype)
        return 0 < count < PEAK_PROBES and time.time() - last >= PEAK_SPREAD_S

    def cached(self, spec: ModelSpec, train_cfg: ml_collections.ConfigDict, batch_size: int,
               mesh: Mesh) -> Measurement | None:
        found = self._section(family_key(spec, train_cfg, mesh)).get(_shape_key(spec, batch_size))
        return Measurement(**found["measurement"]) if found else None

    def get(self, spec: ModelSpec, train_cfg: ml_collections.ConfigDict, batch_size: int, mesh: Mesh,
            log: Callable[[str], None] = lambda s: None) -> Measurement:
        """The measurement for this shape and global batch on `mesh`, from the cache or measured now."""
        if (found := self.cached(spec, train_cfg, batch_size, mesh)) is not None:
            return found
        log(f"timing {spec.num_layers} layers x d{spec.d_model}, batch {batch_size}, {spec.dtype} on this machine")
        found = measure(spec, train_cfg, batch_size, mesh)
        self._section(family_key(spec, train_cfg, mesh))[_shape_key(spec, batch_size)] = {
            "flops_per_step": flops_per_step(spec, batch_size), "measurement": asdict(found)}
        self._save()
        return found

    def startup_s(self, corpus: str, seconds: float) -> float:
        """The longest start-up before planning (imports, data preparation) any run on `corpus` (a
        data fingerprint) has paid on this machine, `seconds` (this run's) included. A corpus is
        prepared once; its reruns load it in a second, and charged only that, they would find
        room in the planning allowance for measurements the first run could not afford."""
        paid = self._section("startup_s")
        if seconds > paid.get(corpus, 0.0):
            paid[corpus] = seconds
            self._save()
        return paid[corpus]

    def scale_step_times(self, factor: float) -> None:
        """Multiplies every step time measured on this machine by `factor` (the compile times,
        FLOPs and matmul peaks stay). A load on the machine or a cache from another one is off by
        about the same factor for every shape, so all of them move together: correcting only the
        shape a run trained made it look slower than its neighbours, and the next plan moved to a
        neighbour timed on the quiet machine (the `--stress` runs: batch 16 -> 32 at 5m after a
        one-core run, 0.27 bpb worse)."""
        for shapes in self._table.get(self._machine, {}).values():
            for entry in shapes.values():
                if isinstance(entry, dict) and "measurement" in entry:
                    entry["measurement"]["step_s"] *= factor
        self._save()

    def time_model(self, spec: ModelSpec, train_cfg: ml_collections.ConfigDict, mesh: Mesh) -> TimeModel:
        """Least-squares fit of step time against FLOPs over this family's measured shapes and
        batches. A family with no measurement borrows a sibling's fit in another compute dtype,
        scaled by the two dtypes' measured matmul rates (so the dtype comparison rests on one
        measured step and two cheap probes), else falls back to a fraction of the matmul rate."""
        fitted = self._fit(family_key(spec, train_cfg, mesh))
        if fitted is not None:
            return fitted
        for other in DTYPES:
            if other != spec.dtype and (sibling := self._fit(family_key(replace(spec, dtype=other), train_cfg, mesh))):
                ratio = self.matmul_rate(other) / self.matmul_rate(spec.dtype)
                return TimeModel(sibling.overhead_s, sibling.s_per_flop * ratio, sibling.compile_s)
        return TimeModel(0.0, 1 / (PRIOR_EFFICIENCY * self.matmul_rate(spec.dtype) * mesh.size), PRIOR_COMPILE_S)

    def _fit(self, family: str) -> TimeModel | None:
        points = list(self._section(family).values())
        if not points:
            return None
        flops = np.array([p["flops_per_step"] for p in points])
        step_s = np.array([p["measurement"]["step_s"] for p in points])
        compile_s = max(p["measurement"]["compile_s"] for p in points)
        if len(points) >= 2 and np.ptp(flops) > 0:
            slope, intercept = np.polyfit(flops, step_s, 1)
            if slope > 0 and intercept >= 0:
                return TimeModel(float(intercept), float(slope), compile_s)
        # one point, or a fit that came out unphysical: a pure rate through the points
        return TimeModel(0.0, float(np.median(step_s / flops)), compile_s)
