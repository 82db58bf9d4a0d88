"""The device mesh, shardings, and running per-shard functions across it.

One 1-D mesh axis, "data", over every device of every process. Parameters and
method state are replicated, except state a method shards itself (its
`state_sharding`, e.g. a memory bank's rows); batches are sharded along their
leading axis.

Why Auto axes: in this JAX `jax.make_mesh` defaults to Explicit axis types, under
which `z @ z.T` on a batch-sharded array raises a ShardingTypeError. With Auto
axes XLA's partitioner inserts the collectives, and the few places that need a
collective with a precise meaning (the global negatives of NT-Xent) say so
explicitly with `jax.shard_map`.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssl_jax.errors import UserError

AXIS = "data"


def maybe_initialize_distributed() -> None:
    """Joins a multi-process run when the environment describes one.

    A single process needs nothing. TPU pods and SLURM set variables that
    `jax.distributed.initialize()` reads by itself; a hand-started group passes
    SSL_JAX_COORDINATOR / SSL_JAX_NUM_PROCESSES / SSL_JAX_PROCESS_ID.
    """
    if jax.distributed.is_initialized():
        return
    if "SSL_JAX_COORDINATOR" in os.environ:
        jax.distributed.initialize(
            coordinator_address=os.environ["SSL_JAX_COORDINATOR"],
            num_processes=int(os.environ["SSL_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["SSL_JAX_PROCESS_ID"]))
    elif "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
    """A 1-D ("data",) mesh with Auto axes over all (global) devices."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(devices), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "batch_size") -> None:
    """Raises before compiling when the batch cannot be split evenly."""
    n = mesh.devices.size
    if global_batch % n:
        raise UserError(
            f"config.{what}={global_batch} is not divisible by the {n} devices of the "
            f"mesh; use a multiple of {n} (e.g. {max(n, global_batch // n * n)}).")
    if global_batch % jax.process_count():
        raise UserError(
            f"config.{what}={global_batch} is not divisible by the "
            f"{jax.process_count()} processes.")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into one batch sharded along "data".

    local: this process's rows (b, ...) ; returns global arrays (b * processes, ...).
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def on_shards(fn: Callable[..., Any], batch_args: tuple[bool, ...],
              batch_out: bool = False) -> Callable[..., Any]:
    """Runs `fn(*args, axis_name=...)` on each device's rows of the batch.

    `batch_args[i]` says whether positional argument i is sharded along its
    leading axis (a batch, or a memory bank's rows) or replicated. `fn` must
    return values that are already reduced across the axis (e.g. with psum),
    which come back replicated; or, with batch_out=True, each device's block of
    rows, which come back sharded along the leading axis.
    With no ambient mesh (`jax.set_mesh`), or a one-device one, `fn` runs
    directly with `axis_name=None`, so losses are testable without a mesh.
    """
    def wrapped(*args):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            return fn(*args, axis_name=None)
        specs = tuple(P(AXIS) if b else P() for b in batch_args)
        return jax.shard_map(lambda *a: fn(*a, axis_name=AXIS),
                             in_specs=specs, out_specs=P(AXIS) if batch_out else P(),
                             check_vma=False)(*args)
    return wrapped
