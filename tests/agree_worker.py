"""Run by tests/test_mesh.py as one of two jax.distributed CPU processes:
`python tests/agree_worker.py COORDINATOR PROCESS_ID`.

The platform is made to look like a GPU and each process's timing of the attention backends is
forced to a different winner (process 0: pallas, process 1: xla). It prints, as JSON, the choice
each process would make alone (outside any mesh: the planner's local timings) and the one it makes
while tracing a program on a mesh that spans both processes (the train and eval steps).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))

import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from pufferfish_jax import sharding  # noqa: E402
from pufferfish_jax.model import attention  # noqa: E402

attention._platform = lambda: "gpu"
timed = []


def forced_timing(candidates, *shape):
    timed.append(list(candidates))
    return ("pallas", "xla")[jax.process_index()]  # a disagreement in the local timings


attention._time_candidates = forced_timing
mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
seen = {"devices": jax.device_count(), "process": jax.process_index()}


def traced(q_BTNH, k_BTKH):
    seen["local"] = attention.resolve_backend("auto", q_BTNH, k_BTKH)
    with sharding.activation_sharding(mesh):
        seen["agreed"] = attention.resolve_backend("auto", q_BTNH, k_BTKH)
    return q_BTNH


q = jax.ShapeDtypeStruct((2, attention.AUTO_MIN_SEQ, 4, 64), jnp.bfloat16)
k = jax.ShapeDtypeStruct((2, attention.AUTO_MIN_SEQ, 2, 64), jnp.bfloat16)
jax.jit(traced).trace(q, k)
seen["timed"] = timed
print(json.dumps(seen))
