#!/usr/bin/env bash
# Kill a fixed-step training with SIGKILL at random moments, resume it each time, and check that
# its final parameters are bit-identical to an uninterrupted run of the same config and seed.
#
#   tools/chaos_resume.sh [KILLS=5] [STEPS=400] [key=value ...]
#
# Kills land anywhere: in data preparation, compilation, steps or checkpoint saves (checkpoints
# are written every 0.5 s here so that many kills hit a save in flight).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
kills="${1:-5}"; steps="${2:-400}"; shift $(( $# >= 2 ? 2 : $# ))
work="$(mktemp -d)"
args=(steps="$steps" data.corpus=shakespeare data.vocab_size=1024 data.max_chars=300000 model.num_layers=2
      model.d_model=64 model.seq_len=64 train.batch_size=4 train.checkpoint_every_s=0.5 "$@")
train() { python -m pufferfish_jax train "${args[@]}" run_dir="$1"; }

echo "reference run ($steps steps) ..."
start=$(date +%s.%N)
train "$work/reference" > "$work/reference.log" 2>&1
duration=$(python -c "import time; print(max(4.0, time.time() - $start))")
reference=$(python -m pufferfish_jax inspect "$work/reference" --digest)

for i in $(seq 1 "$kills"); do
  delay=$(python -c "import random; print(round(random.uniform(1.0, $duration * 0.8), 2))")
  train "$work/chaos" > "$work/chaos-$i.log" 2>&1 &
  pid=$!
  sleep "$delay"
  if kill -9 "$pid" 2>/dev/null; then
    wait "$pid" 2>/dev/null || true
    saved=$(ls "$work/chaos/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1 || true)
    echo "kill $i after ${delay}s (newest checkpoint: ${saved:-none})"
  else
    wait "$pid" || true
    echo "kill $i after ${delay}s came too late: the run had finished"
  fi
done
echo "final resume ..."
train "$work/chaos" > "$work/chaos-final.log" 2>&1
chaos=$(python -m pufferfish_jax inspect "$work/chaos" --digest)
echo "uninterrupted: $reference"
echo "with $kills kills: $chaos"
if [ "$reference" = "$chaos" ]; then
  echo "digests equal"; rm -rf "$work"
else
  echo "DIGESTS DIFFER (runs kept in $work)"; exit 1
fi
