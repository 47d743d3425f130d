# Pufferfish-JAX commands. `just --list` shows them; README.md explains each.
set positional-arguments

# The budget covers the whole command, so the clock starts when `just` does.
export PUFFERFISH_T0 := `date +%s.%N`

# `just` alone: guided mode on a terminal (data, budget, plan, edit, train, write); usage elsewhere.
guided:
    python -m pufferfish_jax

# Train: `just train budget=5m [config=configs/X.py] [run_dir=DIR] [key=value ...]` or `steps=N`.
train *ARGS:
    python -m pufferfish_jax train "$@"

# Print the plan for a budget without training: `just plan budget=1h`.
plan *ARGS:
    python -m pufferfish_jax plan "$@"

# Write text from a run dir or checkpoint: `just generate runs/latest "The history of"`; no prompt: the REPL.
generate *ARGS:
    python -m pufferfish_jax generate "$@"

# Edit a config in a table and save it for `just train config=...`: `just configure [configs/X.py]`.
configure *ARGS:
    python -m pufferfish_jax configure "$@"

# Loss and bits per byte of a checkpoint on any text: `just eval runs/latest --data kjv`.
eval *ARGS:
    python -m pufferfish_jax eval "$@"

# The whole test suite, slow tests included, on one pytest worker per core (CI runs this; 3.0-4.3
# minutes on 2 cores, AMD EPYC with AVX-512, whose speed drifted by a third within one morning).
test *ARGS:
    python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests "$@"

# The edit loop: the suite without the slow tests (no training, no end-to-end runs, no Pallas interpret
# mode; 41-57 s on the same machine).
test-fast *ARGS:
    python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests -m "not slow" "$@"

# Describe this machine: devices, memory, cores, CPU model and SIMD features, matmul peak per dtype and the best.
hardware:
    python -m pufferfish_jax hardware

# What a run dir or checkpoint holds: `just inspect runs/latest [--digest]`.
inspect *ARGS:
    python -m pufferfish_jax inspect "$@"

# Write a checkpoint for transformers or llama.cpp: `just export runs/latest out/ [--format hf|gguf] [--dtype bfloat16]`.
export *ARGS:
    python -m pufferfish_jax export "$@"

# A config-file pipeline, each stage cached: `just pipeline configs/quick.py [key=value ...]`.
pipeline *ARGS:
    python -m pipelines "$@"
