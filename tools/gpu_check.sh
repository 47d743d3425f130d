#!/usr/bin/env bash
# GPU check, one script (under 5 minutes on one H100/H200: each stage has its own timeout):
#   1. makes sure JAX sees the GPU (installs requirements-cuda.txt if it does not);
#   2. runs tests/test_kernels.py with the Pallas kernels compiled through Triton (not interpreted);
#   3. runs tools/bench_attention.py at T = 1024 and 4096, head dim 64 and 128, bf16, our Pallas
#      kernel against cuDNN and XLA, and prints its table with the test verdict.
# Usage: tools/gpu_check.sh [extra bench_attention.py arguments, e.g. --pallas-blocks 64x64,128x64]
# Env: PYTHON (default python3), GPU_CHECK_LOG (default: a temp dir) for the full logs.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
py="${PYTHON:-$(command -v python3 || command -v python)}"
log="${GPU_CHECK_LOG:-$(mktemp -d)}"
mkdir -p "$log"

jax_gpu() { "$py" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)' >/dev/null 2>&1; }

if ! jax_gpu; then
    echo "JAX sees no GPU: installing requirements-cuda.txt"
    "$py" -m pip install --quiet -r requirements-cuda.txt || { echo "gpu_check: pip install failed (offline?)"; exit 1; }
    jax_gpu || { echo "gpu_check: JAX still sees no GPU"; nvidia-smi -L 2>/dev/null; exit 1; }
fi
if ! "$py" -c 'import flax, numpy, pytest, rich' 2>/dev/null; then
    echo "installing requirements.txt (flax, pytest or rich missing)"
    "$py" -m pip install --quiet -r requirements.txt || { echo "gpu_check: pip install -r requirements.txt failed"; exit 1; }
fi
"$py" -c '
import jax
from pufferfish_jax.model.kernels.flash_attention import default_interpret
d = jax.devices()[0]
print(f"jax {jax.__version__}, {d.platform}: {d.device_kind}; Pallas kernels interpreted: {default_interpret()}")
'

echo "== tests/test_kernels.py, compiled =="
timeout 150 "$py" -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$log/test_kernels.log"
test_status=${PIPESTATUS[0]}
verdict="$(tail -n 1 "$log/test_kernels.log")"

echo "== bench_attention =="
timeout 140 "$py" tools/bench_attention.py --seq 1024,4096 --head-dim 64,128 --dtype bfloat16 \
    --backends pallas,cudnn,xla "$@" 2>&1 | tee "$log/bench_attention.log"
bench_status=${PIPESTATUS[0]}

echo
echo "compiled kernel tests: $([ "$test_status" = 0 ] && echo PASSED || echo "FAILED (exit $test_status)"): $verdict"
echo "benchmark: $([ "$bench_status" = 0 ] && echo done || echo "FAILED (exit $bench_status)"); logs in $log"
[ "$test_status" = 0 ] && [ "$bench_status" = 0 ]
