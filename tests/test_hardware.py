"""The machine description: the CPU read from /proc/cpuinfo, the matmul peak probe, the MFU
denominator (the best peak over dtypes, labelled with its dtype) and the calibration key."""

import contextlib
import io
import math
import time

from rich.console import Console

from pufferfish_jax import cli
from pufferfish_jax.budget import calibrate, hardware
from pufferfish_jax.budget.hardware import CpuInfo, Hardware, best_peak, cpu_info, parse_cpuinfo
from pufferfish_jax.display import TrainDisplay

# A Zen 2-class box: AVX2 and FMA only, so bf16 matmuls are emulated (slower than float32).
AVX2_ONLY = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD Ryzen 7 3700X 8-Core Processor
flags		: fpu vme de pse tsc msr pae mce cx8 sse sse2 ht syscall nx mmxext pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand bmi1 avx2 smep bmi2 sha_ni

processor	: 1
vendor_id	: AuthenticAMD
model name	: AMD Ryzen 7 3700X 8-Core Processor
flags		: fpu vme de pse tsc msr pae mce cx8 sse sse2 ht syscall nx mmxext pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand bmi1 avx2 smep bmi2 sha_ni
"""

# A Sapphire Rapids Xeon: AVX-512 with BF16 and VNNI, and AMX tiles.
AVX512_BF16 = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx_vnni avx512_bf16 avx512vbmi avx512_vnni avx512_bitalg amx_bf16 avx512_fp16 amx_tile amx_int8
"""

# An AWS Graviton3 (Neoverse V1): ARM lists Features and names no model.
ARM_SVE = """processor	: 0
BogoMIPS	: 2100.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x1
CPU part	: 0xd40
CPU revision	: 1
"""


def test_an_avx2_only_x86_has_avx2_and_fma_and_nothing_wider():
    assert parse_cpuinfo(AVX2_ONLY) == CpuInfo("AMD Ryzen 7 3700X 8-Core Processor", ("avx2", "fma"))


def test_an_avx512_bf16_x86_reports_its_bf16_vnni_and_amx_features():
    info = parse_cpuinfo(AVX512_BF16)
    assert info.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert info.features == ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile")


def test_an_arm_cpu_reports_neon_sve_and_bf16_and_is_named_by_its_part():
    info = parse_cpuinfo(ARM_SVE)
    assert info == CpuInfo("CPU implementer 0x41 part 0xd40", ("asimd", "sve", "bf16"))  # svebf16 is not bf16
    assert info.describe() == "CPU implementer 0x41 part 0xd40 (asimd sve bf16)"


def test_without_proc_cpuinfo_the_platform_names_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware.platform, "processor", lambda: "arm")
    assert cpu_info(str(tmp_path / "no-cpuinfo")) == CpuInfo("arm", ())
    assert cpu_info(str(tmp_path / "no-cpuinfo")).describe() == "arm (no SIMD features known)"


def test_matmul_rate_is_a_positive_finite_flop_rate():
    rate = hardware.matmul_rate("bfloat16", seconds=0.01, sizes=(32, 64))
    assert rate > 0 and math.isfinite(rate)


def test_matmul_rate_keeps_the_fastest_size_and_stops_before_a_size_would_overrun(monkeypatch):
    times = {512: 0.001, 1024: 0.02, 2048: 0.2}
    timed = []
    monkeypatch.setattr(hardware, "_fastest_product", lambda dtype, size, seconds: timed.append(size) or times[size])
    rate = hardware.matmul_rate("float32", seconds=1.0, sizes=(512, 1024, 2048, 4096))
    assert timed == [512, 1024]  # 16 x 0.02 s > the 0.25 s share: two 2048 products would overrun it
    assert rate == 2 * 512**3 / 0.001


def test_best_peak_picks_the_larger():
    assert best_peak({"float32": 3.3e10, "bfloat16": 2.3e10}) == ("float32", 3.3e10)
    assert best_peak({"float32": 2.1e11, "bfloat16": 4.2e11}) == ("bfloat16", 4.2e11)


def _hardware(**fields) -> Hardware:
    base = dict(platform="cpu", device_kind="cpu", device_count=1, memory_bytes=2**30, host_cores=2,
                peak_flops_bf16=0.0, peak_flops_fp32=0.0, measured_flops_fp32=0.0, measured_flops_bf16=0.0)
    return Hardware(**base | fields)


def test_the_mfu_denominator_is_the_best_dtype_measured_or_on_the_data_sheet():
    assert _hardware(measured_flops_fp32=3.3e10, measured_flops_bf16=2.3e10).mfu_peak() == (
        3.3e10, "best measured matmul, float32")
    h100 = _hardware(platform="gpu", device_kind="NVIDIA H100", peak_flops_bf16=989e12, peak_flops_fp32=67e12,
                     measured_flops_fp32=5e13, measured_flops_bf16=6e14)
    assert h100.mfu_peak() == (989e12, "data-sheet peak, bfloat16")


def test_the_calibration_cache_measures_each_dtype_once_and_the_dashboard_shows_the_best(tmp_path, monkeypatch):
    rates = {"float32": 3.0e11, "bfloat16": 2.0e11}  # a CPU where bf16 is emulated
    monkeypatch.setattr(calibrate, "matmul_rate", lambda dtype: rates[dtype])
    peak, source = calibrate.CalibrationCache(tmp_path).peak_flops()
    assert (peak, source) == (3.0e11, "best measured matmul, float32")

    def fail(dtype):
        raise AssertionError("measured again")

    monkeypatch.setattr(calibrate, "matmul_rate", fail)
    assert calibrate.CalibrationCache(tmp_path).peak_flops() == (peak, source)  # read back from the cache

    out = io.StringIO()
    display = TrainDisplay(Console(file=out, width=300, force_terminal=True), 10, time.time(), None, 1,
                           tokens_per_step=100, flops_per_token=1e9, peak_flops=peak, peak_source=source)
    display.update(10, 10, 3.0, 150.0)  # 150 tok/s x 1 GFLOP/token = half the 0.3 TFLOP/s peak
    display.close()
    assert "MFU 50.0% of 0.3 TFLOP/s (best measured matmul, float32)" in out.getvalue()


def test_a_low_first_probe_is_replaced_by_a_later_run_and_the_peak_never_falls(tmp_path, monkeypatch):
    """The machine read 268 GFLOP/s in a busy second, then 429 and 395: the cache keeps the best,
    probing again only in runs at least PEAK_SPREAD_S apart, and stops after PEAK_PROBES probes.
    Probes run inside the caller's `quiet` context (the paused corpus encoder), never outside it."""
    clock, readings, quiet_entered = [1000.0], iter([2.68e11, 4.29e11, 3.95e11]), []
    monkeypatch.setattr(calibrate.time, "time", lambda: clock[0])
    monkeypatch.setattr(calibrate, "matmul_rate", lambda dtype: next(readings) if dtype == "bfloat16" else 1e11)

    @contextlib.contextmanager
    def quiet():
        quiet_entered.append(clock[0])
        yield

    def run_at(t: float) -> float:
        clock[0] = t
        return calibrate.CalibrationCache(tmp_path).peak_flops(quiet=quiet)[0]

    assert run_at(1000.0) == 2.68e11  # the first run probes
    assert run_at(1000.0 + calibrate.PEAK_SPREAD_S / 2) == 2.68e11  # too soon: read back
    assert run_at(1000.0 + calibrate.PEAK_SPREAD_S) == 4.29e11  # a later run probes again, and reads faster
    assert run_at(1000.0 + 2 * calibrate.PEAK_SPREAD_S) == 4.29e11  # a slower third probe does not lower it
    assert run_at(1000.0 + 3 * calibrate.PEAK_SPREAD_S) == 4.29e11  # three probes: settled, nothing probed
    assert quiet_entered == [1000.0, 1000.0 + calibrate.PEAK_SPREAD_S, 1000.0 + 2 * calibrate.PEAK_SPREAD_S]
    assert calibrate.CalibrationCache(tmp_path).probes("bfloat16")[0] == calibrate.PEAK_PROBES


def test_machine_key_differs_between_cpu_classes(monkeypatch):
    monkeypatch.setattr(calibrate, "cpu_info", lambda: parse_cpuinfo(AVX512_BF16))
    bf16_key = calibrate.machine_key()
    monkeypatch.setattr(calibrate, "cpu_info", lambda: parse_cpuinfo(AVX2_ONLY))
    avx2_key = calibrate.machine_key()
    monkeypatch.setattr(calibrate, "cpu_info", lambda: CpuInfo("Intel(R) Xeon(R) Platinum 8480+", ("avx2", "fma")))
    assert len({bf16_key, avx2_key, calibrate.machine_key()}) == 3  # same model, fewer features: another key too
    assert "avx512_bf16" in bf16_key and "AMD Ryzen 7 3700X" in avx2_key


def test_just_hardware_probes_now_and_shows_the_best_the_machine_has_shown(monkeypatch, capsys, tmp_path):
    """`just hardware` joins its probe to the cache, so it prints the peak the dashboard divides by:
    the earlier, faster bfloat16 reading stays; float32's faster new one replaces the old."""
    monkeypatch.setenv("PUFFERFISH_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "cpu_info", lambda: parse_cpuinfo(AVX2_ONLY))
    monkeypatch.setattr(hardware, "cpu_info", lambda: parse_cpuinfo(AVX2_ONLY))
    monkeypatch.setattr(calibrate, "matmul_rate", {"float32": 2.0e10, "bfloat16": 2.5e10}.get)
    calibrate.CalibrationCache(tmp_path).peak_flops()  # an earlier run's probes
    monkeypatch.setattr(calibrate, "matmul_rate", {"float32": 3.3e10, "bfloat16": 2.3e10}.get)
    monkeypatch.setattr(cli, "console", Console(file=io.StringIO(), width=300))
    assert cli.cmd_hardware([]) == 0
    text = cli.console.file.getvalue()
    assert "AMD Ryzen 7 3700X 8-Core Processor (avx2 fma)" in text
    assert "33 GFLOP/s peak measured per device (best of 2 probes)" in text
    assert "25 GFLOP/s peak measured per device (best of 2 probes)" in text
    assert "float32: 0.033 TFLOP/s per device (the training dashboard's MFU denominator)" in text
    assert calibrate.CalibrationCache(tmp_path).peak_flops() == (3.3e10, "best measured matmul, float32")
