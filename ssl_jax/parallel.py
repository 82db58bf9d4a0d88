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

import hashlib
import os
import socket
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssl_jax.errors import UserError

AXIS = "data"


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300,
               heartbeat_s: int = 100) -> None:
    """Joins a multi-process run (jax.distributed) when one is described; else nothing.

    In order: the arguments (the commands' --coordinator HOST:PORT --num_processes N
    --process_id I); SSL_JAX_COORDINATOR / SSL_JAX_NUM_PROCESSES / SSL_JAX_PROCESS_ID;
    SSL_JAX_DISTRIBUTED=auto, or a SLURM job step of more than one task, where
    `jax.distributed.initialize()` finds everything itself (SLURM's variables; a
    Cloud TPU VM's metadata, which launch/tpu_pod.sh asks for with the variable).
    timeout_s bounds the wait for the coordinator and the other processes (then a
    UserError, not a hang); heartbeat_s is how soon the others fail once one dies.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    if coordinator is None and env.get("SSL_JAX_COORDINATOR"):
        coordinator = env["SSL_JAX_COORDINATOR"]
        num_processes = num_processes or int(env.get("SSL_JAX_NUM_PROCESSES", 0)) or None
        if process_id is None and env.get("SSL_JAX_PROCESS_ID"):
            process_id = int(env["SSL_JAX_PROCESS_ID"])
    timeouts = dict(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_s)
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise UserError(f"--coordinator {coordinator} needs --num_processes N and "
                            "--process_id I (0 on the coordinator's host) as well.")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--coordinator {coordinator!r} is not HOST:PORT (e.g. "
                            "10.0.0.2:12355, the address of process 0's host).")
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process_id {process_id} is not in [0, {num_processes}).")
        if num_processes == 1:
            return
        if process_id == 0:
            # If another process never comes, XLA's client aborts the process after
            # timeout_s (a C++ fatal error Python cannot catch): this line says why.
            print(f"Process 0 of {num_processes}: serving the coordinator on port {port}, "
                  f"waiting up to {timeout_s} s for the other processes to join.",
                  file=sys.stderr, flush=True)
        else:
            _wait_for_coordinator(host, int(port), timeout_s, process_id, num_processes)
        _join(dict(coordinator_address=coordinator, num_processes=num_processes,
                   process_id=process_id, **timeouts),
              f"as process {process_id} of {num_processes} with coordinator {coordinator}")
    elif (env.get("SSL_JAX_DISTRIBUTED") == "auto"
          or int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")) or 1) > 1):
        _join(timeouts, "with the coordinator jax.distributed detected (SLURM / Cloud TPU)")


def _wait_for_coordinator(host: str, port: int, timeout_s: float, process_id: int,
                          num_processes: int) -> None:
    """Waits until something listens at host:port, or raises a UserError. XLA's own
    client would abort the process with a stack trace when it cannot connect in
    time; a plain TCP connection tells the common mistakes (wrong address, a
    firewall, process 0 not started) apart first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), port), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise UserError(
                    f"Could not join the multi-process run as process {process_id} of "
                    f"{num_processes}: nothing answered at the coordinator {host}:{port} "
                    f"within {timeout_s} s ({e}). Check that process 0 is running with the "
                    "same --coordinator, and that its HOST:PORT is reachable from this host "
                    "(firewall, proxy variables).") from e
            time.sleep(0.5)


def _join(kwargs: dict, what: str) -> None:
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 -- XLA's errors name no fix
        raise UserError(
            f"Could not join the multi-process run {what} within "
            f"{kwargs['initialization_timeout']} s ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}). Check that process "
            "0 is running, that its HOST:PORT is reachable from this host, and that every "
            "process got the same --num_processes and a distinct --process_id.") from e


def agree(value: str, what: str) -> None:
    """Raises a UserError on every process unless all processes hold the same `value`
    (e.g. the config: different code or flags on one host would train garbage)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils
    digest = np.frombuffer(hashlib.sha256(value.encode()).digest()[:8], np.int32)
    every = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1, 2)
    differ = [int(p) for p in np.flatnonzero((every != every[0]).any(axis=1))]
    if differ:
        raise UserError(
            f"The processes were given different {what}: process(es) {differ} differ from "
            "process 0. Start every process with the same code, config file and --config "
            "flags (launch/ does).")


# What a collective says when the process at its other end is gone: Gloo's TCP
# pair (CPU), NCCL (GPU), or the coordination service's heartbeat.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "heartbeat timeout",
              "NCCL", "Gloo", "coordination service", "UNAVAILABLE", "DEADLINE_EXCEEDED")


def peer_lost(e: Exception) -> bool:
    """Whether `e`, raised by a computation of a multi-process run, says that another
    process went away (rather than that this process's program is wrong)."""
    return any(s in str(e) for s in _PEER_LOST)


def every_process(flag: bool) -> bool:
    """True only if `flag` is true on every process (a collective: all must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).min())


def sync(name: str) -> None:
    """Waits until every process reaches this point (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


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
