#!/usr/bin/env bash
# Write text from a trained run: tools/generate.sh DIR_OR_CHECKPOINT ["prompt"] [--max-new-tokens N]
#   [--temperature T] [--top-k K] [--top-p P] [--seed S]. No prompt: the REPL (/help lists its commands).
# The architecture is read from the checkpoint itself; nothing else needs to be said.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec python -m pufferfish_jax generate "$@"
