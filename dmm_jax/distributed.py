"""Data parallelism on JAX's own runtime: a 1-D device mesh over sequences, many hosts.

Every mini-batch [B, T, X] is split along its sequence axis B over the devices of a 1-D
``jax.sharding.Mesh``; parameters and optimizer state are replicated, and one jitted update
runs on all devices at once (XLA inserts the gradient all-reduce). There is no per-device
Python code. B is padded with empty sequences (length 0) up to a multiple of the device count:
their terms are masked to exactly zero, so padding changes neither the loss nor the gradients.

The loss does not depend on the device count: each latent step's noise is drawn as
``normal(fold_in(key, t), [B, Z])``, and with ``jax_threefry_partitionable`` (JAX's default)
the draw of row b depends only on (key, t, b), neither on B nor on how B is split.

Many hosts: call :func:`initialize` (``jax.distributed.initialize``) first in every process.
The mesh then spans the devices of all processes; each process reads only the rows of each
mini-batch that live on its own devices (:func:`global_batch`) and JAX assembles the global
array with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dmm_jax.data.batching import PaddedSequences, length_bucket

Array = jax.Array

AXIS = "sequences"  # the one mesh axis: mini-batches are split along their sequences

# Read when the matching argument of ``initialize`` is not given. JAX itself reads the first.
ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins a multi-process run through ``jax.distributed.initialize``, if one is asked for.

    Each argument left ``None`` is read from the environment (``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). With none of the three set, this is a
    single-process run and nothing happens (returns False). Otherwise all three are needed:
    the coordinator's ``host:port`` (process 0 listens there), the number of processes, and
    this process's id in [0, num_processes). Must run before anything touches a device.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR_ADDRESS) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if all(value is None for value in given.values()):
        return False
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ValueError(
            f"a multi-process run needs coordinator_address, num_processes and process_id; "
            f"missing {missing} (flags or ${ENV_COORDINATOR_ADDRESS}, ${ENV_NUM_PROCESSES}, "
            f"${ENV_PROCESS_ID})"
        )
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
        # Older JAX had no cross-process collectives on CPU by default; gloo ships with jaxlib.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def data_mesh(devices_per_process: int | None = None) -> Mesh:
    """A 1-D mesh (axis ``"sequences"``) over the first ``devices_per_process`` local devices
    of every process (default: all of them), ordered by process, so each process's devices
    hold one contiguous block of every mini-batch."""
    local = jax.local_device_count()
    count = local if devices_per_process is None else devices_per_process
    if not 1 <= count <= local:
        raise ValueError(
            f"devices must be between 1 and the {local} local device(s) "
            f"{jax.local_devices()}, got {devices_per_process}"
        )
    if not jax.config.jax_threefry_partitionable:
        warnings.warn(
            "jax_threefry_partitionable is off: padding a mini-batch for the mesh changes its "
            "random draws, so losses differ from a single-device run",
            stacklevel=2,
        )
    devices = []
    for process in range(jax.process_count()):
        owned = [d for d in jax.devices() if d.process_index == process]
        devices += sorted(owned, key=lambda d: d.id)[:count]
    return Mesh(np.array(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Split along the first (sequence) axis over the mesh."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
    """``batch_size`` rounded up to a multiple of the mesh's device count."""
    return mesh.size * math.ceil(batch_size / mesh.size)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copies every array of ``tree`` (the same values in every process) onto all devices.

    Leaves already replicated over ``mesh`` are returned as they are.
    """
    sharding = replicated(mesh)

    def put(leaf):
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree)


def _process_rows(mesh: Mesh, num_rows: int) -> slice:
    """The contiguous rows of a [num_rows, ...] batch-sharded array this process holds."""
    index_map = batch_sharded(mesh).addressable_devices_indices_map((num_rows,))
    spans = sorted(index[0].indices(num_rows)[:2] for index in index_map.values())
    for (_, stop), (start, _) in itertools.pairwise(spans):
        if stop != start:  # data_mesh never does this; a hand-made mesh might
            raise ValueError("this process's devices must hold contiguous rows of the mesh")
    return slice(spans[0][0], spans[-1][1])


def shard_batch(x: Any, lengths: Any, mesh: Mesh) -> tuple[Array, Array]:
    """A whole mini-batch held by every process -> global arrays split over ``mesh``.

    Pads with empty sequences to a multiple of the device count. Arrays already split over
    ``mesh`` pass through.
    """
    sharding = batch_sharded(mesh)
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x, lengths
    x, lengths = np.asarray(x, np.float32), np.asarray(lengths, np.int32)
    pad = padded_batch_size(len(lengths), mesh) - len(lengths)
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        lengths = np.concatenate([lengths, np.zeros(pad, lengths.dtype)])
    rows = _process_rows(mesh, len(lengths))
    return (
        jax.make_array_from_process_local_data(sharding, x[rows], x.shape),
        jax.make_array_from_process_local_data(sharding, lengths[rows], lengths.shape),
    )


def global_batch(
    data: PaddedSequences, indices: np.ndarray, batch_size: int, mesh: Mesh
) -> tuple[Array, Array]:
    """The mini-batch ``indices`` of ``data`` as global arrays split over ``mesh``.

    Same rows, time bucket and padding as ``data.batch(indices, batch_size)``, further padded
    with empty sequences to a multiple of the device count; each process materialises only
    the rows that live on its own devices.
    """
    if len(indices) > batch_size:
        raise ValueError(f"{len(indices)} indices do not fit a batch of {batch_size}")
    num_rows = padded_batch_size(batch_size, mesh)
    all_lengths = np.zeros(num_rows, np.int32)
    all_lengths[: len(indices)] = data.lengths[indices]
    num_steps = length_bucket(int(all_lengths.max()))  # the bucket of the whole batch
    rows = _process_rows(mesh, num_rows)
    x, lengths = data.batch(indices[rows], rows.stop - rows.start)
    x = np.pad(x, ((0, 0), (0, num_steps - x.shape[1]), (0, 0)))
    sharding = batch_sharded(mesh)
    return (
        jax.make_array_from_process_local_data(sharding, x, (num_rows, *x.shape[1:])),
        jax.make_array_from_process_local_data(sharding, lengths, (num_rows,)),
    )
