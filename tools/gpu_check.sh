#!/usr/bin/env bash
# GPU check, one script (3.5 minutes on one H200 with the default budget; each stage has its own timeout):
#   1. makes sure JAX sees the GPU (installs requirements-cuda.txt if it does not);
#   2. runs tests/test_kernels.py with the Pallas kernels compiled through Triton (not interpreted);
#   3. runs tools/bench_attention.py at T = 1024 and 4096, head dim 64 and 128, bf16, our Pallas
#      kernel against cuDNN and XLA, and prints its table;
#   4. trains for a budget on the built-in corpus (the planner measuring this GPU, the attention
#      backend it dispatches to, the loop), and checks that the run ended within its budget;
#   then prints the three verdicts.
# Usage: tools/gpu_check.sh [extra bench_attention.py arguments, e.g. --pallas-blocks 64x64,128x64]
# Env: PYTHON (default python3), GPU_CHECK_LOG (default: a temp dir) for the full logs,
#      GPU_CHECK_BUDGET (default 2m) for stage 4. On a machine without network, point
#      PUFFERFISH_CACHE at a cache whose corpora/ holds wiki.jsonl (copied from one that has trained).
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
# tests/conftest.py would add its CPU fast-compile flags (LLVM at -O0) unless an optimization level
# is set: the kernels are compiled here as a training run compiles them.
XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=2" \
    timeout 150 "$py" -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$log/test_kernels.log"
test_status=${PIPESTATUS[0]}
verdict="$(tail -n 1 "$log/test_kernels.log")"

echo "== bench_attention =="
timeout 140 "$py" tools/bench_attention.py --seq 1024,4096 --head-dim 64,128 --dtype bfloat16 \
    --backends pallas,cudnn,xla "$@" 2>&1 | tee "$log/bench_attention.log"
bench_status=${PIPESTATUS[0]}

echo "== a budgeted training run =="
budget="${GPU_CHECK_BUDGET:-2m}"
# The run must end by itself within its budget; the timeout (the budget plus 3 minutes) only stops
# a hung one.
limit_s="$("$py" -c "import sys; from pufferfish_jax.config import parse_duration; print(int(parse_duration(sys.argv[1])) + 180)" "$budget")" || limit_s=300
timeout "$limit_s" "$py" -m pufferfish_jax train "budget=$budget" "run_dir=$log/run" 2>&1 | tee "$log/train.log"
train_status=${PIPESTATUS[0]}
final="$(grep '^final:' "$log/train.log" | tail -n 1)"
# "final: ... after N steps, 117.2s of 120s budget": on time when the first figure is at most the second.
on_time="$(echo "$final" | sed -nE 's/.* ([0-9.]+)s of ([0-9.]+)s budget.*/\1 \2/p' | awk '{print ($1 <= $2) ? "yes" : "no"}')"

echo
echo "compiled kernel tests: $([ "$test_status" = 0 ] && echo PASSED || echo "FAILED (exit $test_status)"): $verdict"
echo "benchmark: $([ "$bench_status" = 0 ] && echo done || echo "FAILED (exit $bench_status)"); logs in $log"
echo "training run ($budget): $([ "$train_status" = 0 ] && [ "$on_time" = yes ] && echo "PASSED, on time" || echo "FAILED (exit $train_status, on time: ${on_time:-unknown})"): $final"
[ "$test_status" = 0 ] && [ "$bench_status" = 0 ] && [ "$train_status" = 0 ] && [ "$on_time" = yes ]
