"""Gradient accumulation, config.accumulate_steps = A (default 1: none), for the setup
layer's train step (experiment.py). The step makes the views of the whole global batch,
then runs the loss on A micro-batches of B / A images (a lax.scan, so one compiled
loss): micro-batch j takes the j-th slice of every device's rows, so it is still sharded
over the data axis and nothing moves between devices. Gradients are averaged and the
optimizer updates once; the method state (BN statistics, MoCo's queue, a memory bank)
threads through the micro-batches in order, and the method's `before_step` (MoCo's key-
encoder momentum update) and `after_step` (DINO's teacher) run once per update. Metrics
are means over the micro-batches; the online probes see the whole batch. What it equals:
  - a loss that is a mean over examples without BatchNorm: the A = 1 step;
  - with BatchNorm, each micro-batch is normalised with its own statistics: on
    one device the gradient is the A = 1 step's with BN in A ghost groups
    (model.bn_groups = A; tests/test_accumulate.py), and the BN running averages
    move A times per step;
  - contrastive losses (SimCLR, MoCo, NPID/PIRL): an approximation. The negatives
    come from the micro-batch (SimCLR: 2B/A - 2 of them, not 2B - 2), so A > 1 is
    a smaller effective batch for the loss, not only a memory saving. MoCo's queue
    and the banks' negatives do not depend on the batch, but each micro-batch is
    enqueued / written in turn.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import parallel


def grads_fn(method, config, spec, mesh, state_sharding, a: int):
    """-> f(params, method_state, views, facts, rng) -> (loss, metrics, method_state,
    grads): the loss's value and gradient on the global batch, over
    a = config.accumulate_steps micro-batches (module docstring); state_sharding: the
    method state's."""
    grad_fn = jax.value_and_grad(method.loss, has_aux=True)
    n = mesh.devices.size
    micro_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        None, parallel.AXIS))

    def whole(params, method_state, views, facts, rng):
        (loss, (metrics, method_state)), grads = grad_fn(
            params, method_state, views, facts, rng, config, spec)
        return loss, metrics, method_state, grads

    def micro_batches(x):
        """(L, ...) sharded over n devices, L = c * B -> (A, L / A, ...): micro-batch
        j is the j-th of A equal slices of every device's rows, so it stays sharded
        (P(None, "data")) and an image's c adjacent rows stay together."""
        rows = x.shape[0] // (n * a)
        x = x.reshape((n, a, rows) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x.reshape((a, n * rows) + x.shape[3:]), micro_sharding)

    def accumulated(params, method_state, views, facts, rng):
        def body(carry, xs):
            grad_sum, state = carry
            (v, f), j = xs
            (loss, (metrics, new_state)), grads = grad_fn(
                params, state, v, f, jax.random.fold_in(rng, j), config, spec)
            # The carry keeps its types (a scan needs them fixed) and its sharding.
            new_state = jax.tree.map(lambda x, old: x.astype(old.dtype), new_state, state)
            new_state = jax.lax.with_sharding_constraint(new_state, state_sharding)
            return (jax.tree.map(jnp.add, grad_sum, grads), new_state), (loss, metrics)

        xs = (jax.tree.map(micro_batches, (views, facts)), jnp.arange(a))
        zeros = jax.tree.map(jnp.zeros_like, params)
        (grad_sum, method_state), (loss, metrics) = jax.lax.scan(
            body, (zeros, method_state), xs)
        mean = lambda x: jnp.mean(x, axis=0)
        return (mean(loss), jax.tree.map(mean, metrics), method_state,
                jax.tree.map(lambda g: g / a, grad_sum))

    # A = 1 is the plain step, unchanged (bitwise) by accumulation's existence.
    return whole if a == 1 else accumulated
