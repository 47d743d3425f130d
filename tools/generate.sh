#!/usr/bin/env bash
# Write text from a trained run: tools/generate.sh DIR_OR_CHECKPOINT ["prompt"] [--max-new-tokens N]
#   [--min-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R] [--seed S].
#   No prompt: the REPL (/help lists its commands). --repetition-penalty > 1 (1.1-1.3 is typical)
#   discourages tokens already in the prompt or output; 1 (the default) is off.
# The architecture is read from the checkpoint itself; nothing else needs to be said.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec python -m pufferfish_jax generate "$@"
