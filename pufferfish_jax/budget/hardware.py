"""What this machine is: platform, devices, memory, cores, CPU, and how fast it multiplies matrices.

The peak table gives MFU a denominator on known accelerators; the measured matmul rate is the
fallback (every CPU) and a sanity check (a throttled or shared GPU). The planner's prior for an
unmeasured shape is FLOPs divided by the measured rate. The CPU's model and SIMD features are
reported because they decide which dtype is fast: bf16 matmuls run at twice the float32 rate
with AVX512_BF16 and are emulated, slower than float32, on an AVX2-only CPU.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

# Dense peak TFLOP/s per device (bf16 tensor-core, fp32 non-tensor), from vendor data sheets
# (dense, no sparsity). Matched by substring of jax's device_kind, longest key first.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "GTX 1050": (1.9, 1.9), "GTX 1060": (4.4, 4.4), "GTX 1070": (6.5, 6.5), "GTX 1080 Ti": (11.3, 11.3),
    "GTX 1080": (8.9, 8.9), "RTX 2060": (51.6, 6.5), "RTX 2070": (59.7, 7.5), "RTX 2080 Ti": (107.6, 13.4),
    "RTX 2080": (80.5, 10.1), "RTX 3060": (51.2, 12.7), "RTX 3070": (81.3, 20.3), "RTX 3080": (119.0, 29.8),
    "RTX 3090": (142.0, 35.6), "RTX 4060": (60.6, 15.1), "RTX 4070": (116.6, 29.1), "RTX 4080": (194.9, 48.7),
    "RTX 4090": (330.3, 82.6), "RTX 5070": (123.5, 30.9), "RTX 5080": (225.1, 56.3), "RTX 5090": (419.0, 104.8),
    "T4": (65.0, 8.1), "L4": (121.0, 30.3), "A10": (125.0, 31.2), "A100": (312.0, 19.5),
    "H100": (989.0, 67.0), "H200": (989.0, 67.0),
    "TPU v4": (275.0, 275.0), "TPU v5 lite": (197.0, 197.0), "TPU v5e": (197.0, 197.0),
    "TPU v5p": (459.0, 459.0), "TPU v5": (459.0, 459.0), "TPU v6 lite": (918.0, 918.0), "TPU v6e": (918.0, 918.0),
}
# The /proc/cpuinfo flags that change matmul speed, in report order: x86 vector width and FMA,
# bf16 and int8 dot products and AMX tiles; ARM NEON (asimd, or neon on 32-bit), SVE and bf16.
SIMD_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile",
                 "neon", "asimd", "sve", "sve2", "bf16")
# The probe's ladder of square sizes: a few cores reach their peak on small products (and a short
# product is more often run while other jobs sleep), many cores need large ones to keep busy.
MATMUL_SIZES = (512, 1024, 2048, 4096)
PROBE_SECONDS = 1.0  # per dtype, shared by the sizes


@dataclass(frozen=True)
class CpuInfo:
    model: str
    features: tuple[str, ...]  # the SIMD_FEATURES this CPU has, in SIMD_FEATURES order

    def describe(self) -> str:
        return f"{self.model} ({' '.join(self.features) or 'no SIMD features known'})"


def _field(text: str, names: tuple[str, ...]) -> str:
    """The first processor's value of the first of `names` present (cpuinfo repeats per core)."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in values:
            values[key.strip()] = value.strip()
    return next((values[n] for n in names if values.get(n)), "")


def parse_cpuinfo(text: str) -> CpuInfo:
    """Model and SIMD features from /proc/cpuinfo's text: x86 lists `flags` under a `model name`;
    ARM lists `Features` and often has no name, so the implementer and part numbers stand in."""
    model = _field(text, ("model name", "Model", "Hardware", "cpu model"))
    if not model and (part := _field(text, ("CPU part",))):
        model = f"CPU implementer {_field(text, ('CPU implementer',))} part {part}"
    flags = set(_field(text, ("flags", "Features")).split())
    return CpuInfo(model, tuple(f for f in SIMD_FEATURES if f in flags))


def cpu_info(path: str = "/proc/cpuinfo") -> CpuInfo:
    """This host's CPU; where there is no /proc/cpuinfo (macOS, Windows), the platform's name for
    it and no features."""
    try:
        info = parse_cpuinfo(Path(path).read_text())
    except OSError:
        info = CpuInfo("", ())
    return info if info.model else CpuInfo(platform.processor() or platform.machine() or "unknown", info.features)


@dataclass(frozen=True)
class Hardware:
    platform: str
    device_kind: str
    device_count: int
    memory_bytes: int  # per device; host RAM on CPU
    host_cores: int
    peak_flops_bf16: float  # per device, from the table; 0 when unknown
    peak_flops_fp32: float
    # per device, the best matmul_rate probe this machine has shown (CalibrationCache fills them in);
    # bf16 inputs with fp32 accumulation for bfloat16
    measured_flops_fp32: float = 0.0
    measured_flops_bf16: float = 0.0
    cpu_model: str = ""  # the host's CPU (cpu_info)
    cpu_features: tuple[str, ...] = ()

    def peaks(self) -> dict[str, float]:
        """Each dtype's peak per device: the data sheet's on a known device, else the probe's."""
        if self.peak_flops_bf16 or self.peak_flops_fp32:
            return {"float32": self.peak_flops_fp32, "bfloat16": self.peak_flops_bf16}
        return {"float32": self.measured_flops_fp32, "bfloat16": self.measured_flops_bf16}

    def mfu_peak(self) -> tuple[float, str]:
        """The MFU denominator per device and its label: the best peak over dtypes, so a run in
        the slower dtype reads as far from what the machine can do as it is."""
        dtype, peak = best_peak(self.peaks())
        source = "data-sheet peak" if self.peak_flops_bf16 or self.peak_flops_fp32 else "best measured matmul"
        return peak, f"{source}, {dtype}"

    def to_dict(self) -> dict:
        return asdict(self)


def best_peak(peaks: dict[str, float]) -> tuple[str, float]:
    """The dtype with the highest peak, and that peak (the first on a tie)."""
    dtype = max(peaks, key=lambda d: peaks[d])
    return dtype, peaks[dtype]


def _table_peak(kind: str) -> tuple[float, float]:
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in kind.lower():
            bf16, fp32 = PEAK_TFLOPS[key]
            return bf16 * 1e12, fp32 * 1e12
    return 0.0, 0.0


def _device_memory(device) -> int:
    try:
        return int(device.memory_stats()["bytes_limit"])
    except Exception:  # CPU devices have no memory_stats: host RAM, shared by the host's devices
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()


def _fastest_product(dtype: str, size: int, seconds: float) -> float:
    """Seconds of the fastest of size x size products run for about `seconds` (at least twice)
    after compiling; bfloat16 takes bf16 inputs and accumulates in float32, as the model does."""
    a = jnp.ones((size, size), jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32)).lower(a, a).compile()
    times, deadline = [], time.perf_counter() + seconds
    while len(times) < 2 or time.perf_counter() < deadline:
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_rate(dtype: str, seconds: float = PROBE_SECONDS, sizes: tuple[int, ...] = MATMUL_SIZES) -> float:
    """Peak FLOP/s of one device's square matmuls in `dtype`: the fastest single product over the
    ladder of sizes, each given an equal share of `seconds`. The fastest, not the median, because
    other jobs on a shared machine only ever slow a product down. The ladder stops where the next
    size's two products (16x the FLOPs of two of this size) would overrun its share, so a slow
    machine never spends seconds on one 4096 product. `just hardware`, the calibration cache (the
    MFU denominator) and tools/bench_train.py all call this, so their peaks agree."""
    share, best = seconds / len(sizes), 0.0
    for size in sizes:
        fastest = _fastest_product(dtype, size, share)
        best = max(best, 2 * size**3 / fastest)
        if 16 * fastest > share:
            break
    return best


def probe() -> Hardware:
    device = jax.devices()[0]
    bf16, fp32 = _table_peak(device.device_kind)
    cpu = cpu_info()
    return Hardware(
        platform=device.platform, device_kind=device.device_kind, device_count=jax.device_count(),
        memory_bytes=_device_memory(device), host_cores=os.cpu_count() or 1,
        peak_flops_bf16=bf16, peak_flops_fp32=fp32,
        cpu_model=cpu.model, cpu_features=cpu.features,
    )
