#!/usr/bin/env bash
# Kill a fixed-step training with SIGKILL mid-training, resume it each time, and check that its
# final parameters are bit-identical to an uninterrupted run of the same config and seed.
#
#   tools/chaos_resume.sh [KILLS=5] [STEPS=400] [key=value ...]
#
# Every kill lands mid-training: each attempt is watched until a checkpoint newer than any seen
# before appears (so it has resumed and trained on), then killed a random 0-0.4 s later, while
# its newest checkpoint is still short of the final step. Checkpoints are written every 0.5 s, so
# many kills hit a save in flight. The script counts the kills that landed mid-training and fails
# unless all of them did, as well as when the digests differ: it cannot pass without testing a
# mid-training resume.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
kills="${1:-5}"; steps="${2:-400}"; shift $(( $# >= 2 ? 2 : $# ))
work="$(mktemp -d)"
args=(steps="$steps" data.corpus=shakespeare data.vocab_size=1024 data.max_chars=300000 model.num_layers=2
      model.d_model=64 model.seq_len=64 train.batch_size=4 train.checkpoint_every_s=0.5 "$@")
# A command, not a shell function: started with `&`, python itself is the background job, so $! is
# the training process. A backgrounded function runs in a subshell, $! would be its pid, and
# SIGKILL to it leaves python running as an orphan, writing the same run dir as the next attempt.
train=(python -m pufferfish_jax train "${args[@]}")
still_training() { pgrep -f "run_dir=$work/chaos" > /dev/null; }
newest() { { ls "$work/chaos/checkpoints" 2>/dev/null || true; } | { grep -E '^[0-9]+$' || echo -1; } | sort -n | tail -1; }

echo "reference run ($steps steps) ..."
"${train[@]}" run_dir="$work/reference" > "$work/reference.log" 2>&1
reference=$(python -m pufferfish_jax inspect "$work/reference" --digest)

mid=0
for i in $(seq 1 "$kills"); do
  seen=$(newest)
  "${train[@]}" run_dir="$work/chaos" > "$work/chaos-$i.log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && [ "$(newest)" -le "$seen" ]; do sleep 0.05; done
  delay=$(printf "0.%03d" $(( RANDOM % 400 )))
  sleep "$delay"
  before=$(newest)
  if [ "$before" -gt "$seen" ] && [ "$before" -lt "$steps" ] && kill -9 "$pid" 2>/dev/null; then
    wait "$pid" 2>/dev/null || true
    after=$(newest)
    if still_training; then  # the kill did not stop the training: nothing below would prove a resume
      echo "kill $i: the training process survived its SIGKILL; runs kept in $work"
      exit 1
    fi
    if [ "$after" -lt "$steps" ]; then
      mid=$((mid + 1))
      echo "kill $i: mid-training, ${delay}s after checkpoint $before appeared (previous attempt's newest: $seen; newest now: $after)"
      continue
    fi
  else
    wait "$pid" 2>/dev/null || true
  fi
  echo "kill $i: NOT mid-training (newest checkpoint before: $seen, at the kill: $before, final step: $steps)"
done
echo "final resume ..."
"${train[@]}" run_dir="$work/chaos" > "$work/chaos-final.log" 2>&1
chaos=$(python -m pufferfish_jax inspect "$work/chaos" --digest)
echo "uninterrupted: $reference"
echo "with $kills kills: $chaos"
echo "kills mid-training: $mid of $kills"
status=0
if [ "$reference" = "$chaos" ]; then echo "digests equal"; else echo "DIGESTS DIFFER"; status=1; fi
if [ "$mid" -lt "$kills" ]; then echo "FEWER THAN ALL KILLS LANDED MID-TRAINING: the check proves nothing for them"; status=1; fi
if [ "$status" = 0 ]; then rm -rf "$work"; else echo "runs kept in $work"; fi
exit "$status"
