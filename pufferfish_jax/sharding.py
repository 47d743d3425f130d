"""Scale-out: the device mesh, the one table of logical-axis rules, and the multi-host plumbing.

JAX's SPMD runtime does the work: arrays carry `NamedSharding`s over a (data, fsdp, tensor) mesh
and XLA inserts the collectives. The model names the axes of every parameter and of its main
activations with logical names ("embed", "heads", ...); `LOGICAL_RULES` alone decides which mesh
axis each name is split over, so a new parallelism layout is an edit of one table.

A dimension whose size a mesh axis does not divide is left unsplit rather than refused (a model
with 2 kv heads still runs with tensor=8: those weights are replicated over that axis).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pufferfish_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# Logical axis -> mesh axes, in priority order: a mesh axis already taken by an earlier dimension
# of the same array is skipped, so activations [batch, seq, embed] put the batch over data and
# fsdp and leave embed whole, while params [vocab, embed] split embed over fsdp (FSDP/ZeRO-3:
# XLA gathers each weight just before its matmul). "seq" and "head_dim" have no rule: never split.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("expert", "data"),  # MoE experts [E, D, F]: expert parallelism over the data axis
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
)
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, device_count: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) from the config; one axis may be -1, filled with the devices left over."""
    sizes = [mesh_cfg[axis] for axis in MESH_AXES]
    named = " x ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ConfigError(f"{named}: each mesh axis must be positive, or -1 (the rest) on at most one axis")
    fixed = math.prod(s for s in sizes if s != -1)
    if device_count % fixed:
        raise ConfigError(f"{named} needs a multiple of {fixed} devices but there are {device_count}; "
                          f"make the product of the mesh axes divide {device_count}")
    if -1 in sizes:
        sizes[sizes.index(-1)] = device_count // fixed
    elif fixed != device_count:
        raise ConfigError(f"{named} uses {fixed} of the {device_count} devices; make the product {device_count} "
                          "or set one axis to -1")
    return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

    `jax.make_mesh` orders devices for the physical topology (ICI rings on TPU, NVLink on GPU) and
    keeps each process's devices together on the outer axes. Axes are Auto: XLA propagates the
    shardings between the annotated points.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def single_device_mesh() -> Mesh:
    """A (1, 1, 1) mesh on the first local device: generation and evaluation of any checkpoint."""
    return jax.make_mesh((1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=jax.local_devices()[:1])


def local_mesh(mesh: Mesh) -> Mesh:
    """The block of `mesh` on this process's devices, same axes: what the planner can time without
    the other processes (it is `mesh` itself in a one-process run)."""
    if jax.process_count() == 1:
        return mesh
    mine = np.vectorize(lambda d: d.process_index == jax.process_index())(mesh.devices)
    where = np.argwhere(mine)
    block = mesh.devices[tuple(slice(lo, hi + 1) for lo, hi in zip(where.min(0), where.max(0)))]
    if block.size != mine.sum():  # not one block: time this process's devices as pure data parallelism
        block = np.array(jax.local_devices()).reshape(-1, 1, 1)
    return Mesh(block, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def shape_of(mesh: Mesh) -> tuple[int, int, int]:
    return tuple(mesh.shape[axis] for axis in MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    """Devices the batch is split over."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _mesh_axes(logical: tuple, shape: tuple[int, ...], sizes: dict[str, int]) -> PartitionSpec:
    """Logical names -> a PartitionSpec, leaving unsplit any dimension the mesh axes do not divide."""
    spec = nn.logical_to_mesh_axes(logical, LOGICAL_RULES)
    axes = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        names = tuple(n for n in names if sizes.get(n, 1) > 1)
        split = math.prod(sizes[n] for n in names)
        axes.append(None if not names or dim % split else names[0] if len(names) == 1 else names)
    return PartitionSpec(*axes)


def tree_shardings(logical_tree, abstract_tree, mesh: Mesh):
    """NamedShardings for a pytree, from its logical specs (`nn.get_partition_spec`) and shapes."""
    sizes = dict(mesh.shape)

    def one(logical, leaf):
        if not hasattr(leaf, "shape"):  # a box around an empty node (optax's MaskedNode in a partitioned optimizer's state)
            return leaf
        return NamedSharding(mesh, _mesh_axes(tuple(logical), leaf.shape, sizes))

    return jax.tree.map(one, logical_tree, abstract_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def constrain(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
    """The logical constraint of an activation (what `nn.with_logical_constraint` does), through
    LOGICAL_RULES, leaving unsplit the dimensions the mesh does not divide (a batch of 1 in init).
    A no-op outside `activation_sharding` (unit tests, generation on one device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, _mesh_axes(logical, x.shape, dict(mesh.shape)))


# Whether the program being traced runs on a mesh of several processes: then every process traces
# it in lockstep, and a measured choice inside it must be process 0's (`agree_json`).
_SPANS_PROCESSES: contextvars.ContextVar[bool] = contextvars.ContextVar("spans_processes", default=False)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
    """Code traced inside this context (it may be inside a jitted function) places the model's
    activation constraints on `mesh`; `nn.with_logical_constraint` sees LOGICAL_RULES too."""
    token = _SPANS_PROCESSES.set(len({d.process_index for d in mesh.devices.flat}) > 1)
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(LOGICAL_RULES):
            yield
    finally:
        _SPANS_PROCESSES.reset(token)


def tracing_across_processes() -> bool:
    """True inside `activation_sharding` of a mesh that spans processes: a program every process
    traces at the same point (the train and eval steps), never the planner's local timings."""
    return _SPANS_PROCESSES.get()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch over (data, fsdp); replicated over tensor."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def process_part(mesh: Mesh, batch_size: int) -> tuple[int, int]:
    """(index, count): this process holds rows [index * B / count, (index + 1) * B / count) of every
    global batch of B rows, so it reads only those (processes that share a data shard read the
    same rows)."""
    rows = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    starts = sorted({(s[0].start or 0, s[0].stop or batch_size) for s in rows.values()})
    lo, hi = starts[0][0], starts[-1][1]
    if hi - lo != sum(b - a for a, b in starts) or batch_size % (hi - lo) or lo % (hi - lo):
        raise ConfigError(f"this process's devices hold rows {starts} of a batch of {batch_size}, not one aligned block; "
                          "choose a train.batch_size that is a multiple of mesh.data x mesh.fsdp")
    return lo // (hi - lo), batch_size // (hi - lo)


def global_batch(local_rows: np.ndarray, mesh: Mesh, batch_size: int) -> jax.Array:
    """The global [batch_size, ...] array from this process's rows (see `process_part`)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(local_rows),
                                                  (batch_size,) + local_rows.shape[1:])


def shard_batch(full_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """The global array of a batch every process computed whole (the small eval batches): each
    process hands over only its own rows."""
    index, count = process_part(mesh, len(full_batch))
    size = len(full_batch) // count
    return global_batch(full_batch[index * size:(index + 1) * size], mesh, len(full_batch))


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh) -> None:
    """Every micro-batch must split evenly over the data-parallel devices."""
    dp = data_parallel_size(mesh)
    if (batch_size // grad_accum) % dp:
        raise ConfigError(f"train.batch_size={batch_size} / train.grad_accum={grad_accum} must be a multiple of "
                          f"mesh.data x mesh.fsdp = {dp}; change train.batch_size or the mesh")


# --- multi-host -----------------------------------------------------------------------------------

def _cluster_from_environment() -> bool:
    """Launched by a cluster manager JAX can read (SLURM srun, Open MPI, a multi-host TPU slice) or
    with JAX_COORDINATOR_ADDRESS set."""
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")
                or int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_NODELIST" in env
                or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
                or "," in env.get("TPU_WORKER_HOSTNAMES", "") or "," in env.get("TPU_PROCESS_ADDRESSES", ""))


def init_distributed(mesh_cfg: ml_collections.ConfigDict) -> bool:
    """`jax.distributed.initialize` when this is one process of many: mesh.coordinator,
    mesh.num_processes and mesh.process_id where set, JAX's cluster detection (SLURM, Open MPI,
    Cloud TPU) for the rest. Must run before anything touches a JAX device. Returns whether it
    initialized."""
    if jax.distributed.is_initialized():  # a pipeline plans, then trains, in one process
        return False
    explicit = bool(mesh_cfg.coordinator) or mesh_cfg.num_processes > 1
    if not explicit and not _cluster_from_environment():
        return False
    if mesh_cfg.num_processes > 0 and mesh_cfg.process_id >= mesh_cfg.num_processes:
        raise ConfigError(f"mesh.process_id={mesh_cfg.process_id} must be below mesh.num_processes={mesh_cfg.num_processes}")
    try:
        jax.distributed.initialize(coordinator_address=mesh_cfg.coordinator or None,
                                   num_processes=mesh_cfg.num_processes or None,
                                   process_id=mesh_cfg.process_id if mesh_cfg.process_id >= 0 else None)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"could not join the multi-process run ({first}); set mesh.coordinator=HOST:PORT, "
                          "mesh.num_processes=N and mesh.process_id=I, or launch under SLURM/MPI/a TPU slice") from None
    return True


def is_primary() -> bool:
    """Process 0 prints and writes the run's files; every process takes part in the computation."""
    return jax.process_index() == 0


def agree_json(value):
    """Process 0's JSON-able value (a plan) on every process."""
    if jax.process_count() == 1:
        return value
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    size = int(agree([len(data)])[0])
    padded = np.zeros(size, np.uint8)
    padded[:min(size, len(data))] = data[:size]
    return json.loads(agree(padded).tobytes().decode())


def everyone(values) -> np.ndarray:
    """Every process's `values`, stacked [processes, ...] in process order (a signal received by
    any one process must stop them all)."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values, tiled=False))


def agree(values) -> np.ndarray:
    """Process 0's values on every process: host-side decisions (stop, save, re-fitted step count)
    that would deadlock the collectives if processes made them differently. Free on one process."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(values))
