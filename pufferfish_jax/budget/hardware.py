"""What this machine is: platform, devices, memory, cores, and how fast it multiplies matrices.

The peak table gives MFU a denominator on known accelerators; the measured matmul rate is the
fallback (every CPU) and a sanity check (a throttled or shared GPU). The planner's prior for an
unmeasured shape is FLOPs divided by the measured rate.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

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


@dataclass(frozen=True)
class Hardware:
    platform: str
    device_kind: str
    device_count: int
    memory_bytes: int  # per device; host RAM on CPU
    host_cores: int
    peak_flops_bf16: float  # per device, from the table; 0 when unknown
    peak_flops_fp32: float
    measured_flops_fp32: float  # per device, this run's matmul probe
    measured_flops_bf16: float  # bf16 inputs, fp32 accumulation

    def peak(self, dtype: str) -> float:
        """The MFU denominator: the table's peak, else what the probe measured."""
        table = self.peak_flops_bf16 if dtype == "bfloat16" else self.peak_flops_fp32
        return table or (self.measured_flops_bf16 if dtype == "bfloat16" else self.measured_flops_fp32)

    def to_dict(self) -> dict:
        return asdict(self)


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


def matmul_rate(dtype: str, size: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul, median of repeats within about `seconds` after a warm-up."""
    in_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    a = jnp.ones((size, size), in_dtype)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    matmul(a, a).block_until_ready()
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * size**3 / times[len(times) // 2]


def probe(measure: bool = True) -> Hardware:
    device = jax.devices()[0]
    bf16, fp32 = _table_peak(device.device_kind)
    return Hardware(
        platform=device.platform, device_kind=device.device_kind, device_count=jax.device_count(),
        memory_bytes=_device_memory(device), host_cores=os.cpu_count() or 1,
        peak_flops_bf16=bf16, peak_flops_fp32=fp32,
        measured_flops_fp32=matmul_rate("float32") if measure else 0.0,
        measured_flops_bf16=matmul_rate("bfloat16") if measure else 0.0,
    )
