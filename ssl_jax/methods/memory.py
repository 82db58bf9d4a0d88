"""The memory bank of NPID / PIRL: one L2-normalised D-vector per training image.

bank: (N_pad, D) float32, row i the moving average of image i's embedding,
N_pad = N (the train split's size) rounded up to a multiple of `pad_to`. Rows
>= N are padding: never sampled, never updated. Padding to a fixed multiple
(not to the device count) keeps the checkpoint's shape the same on any mesh.

The bank is sharded along N over the mesh's "data" axis, never gathered whole:

  lookup  every device holds N_pad / n rows; for M requested rows (the same M
          indices on every device) each device reads those it owns, zeros the
          others, and a psum of the (M, D) result combines them. Traffic is M x D
          per device, whatever N is.
  update  each device all-gathers the global batch's (B,) indices and (B, D)
          embeddings and scatters into the rows it owns; others are dropped.

Per-device bank memory (float32, D = 128; N_pad as `padded_size`):
  ImageNet, N = 1,281,167 -> N_pad = 1,282,048: 656.4 MB in all,
      82.1 MB per device on 8 devices, 2.56 MB per device on 256 devices;
  plus, whatever the device count, the looked-up rows (M = B + K; K = 32000
      negatives: 16.4 MB) and the gathered batch (B x D).
  Fashion-MNIST, N = 60,000 -> 60,416: 30.9 MB in all.

Duplicate indices in one update (the same image twice in a global batch; our
pipeline never does this within an epoch, but a batch may straddle epochs and
tests do it on purpose): the row moves once, towards the mean of the
duplicates' embeddings. Every duplicate then writes the same value, so the
result does not depend on the scatter's order, nor on the device count.

Every function takes `axis_name`: None on one device (the whole bank), or the
mesh axis under `parallel.on_shards`, where `bank` is this device's block of
rows. The results are the same either way; tests pin that on 8 devices.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ssl_jax import losses


def padded_size(size: int, pad_to: int) -> int:
    """N rounded up to a multiple of pad_to: the bank's number of rows."""
    return -(-size // pad_to) * pad_to


def init(rng, size: int, dim: int, pad_to: int = 1) -> jax.Array:
    """-> (padded_size(size, pad_to), dim) float32, rows uniform in
    +-1/sqrt(dim/3) (NPID's init: per-coordinate variance 1/dim) then L2-normalised."""
    bound = 1.0 / math.sqrt(dim / 3.0)
    rows = jax.random.uniform(rng, (padded_size(size, pad_to), dim), jnp.float32, -bound, bound)
    return losses.l2_normalize(rows)


def sample_negatives(rng, num: int, size: int) -> jax.Array:
    """(num,) int32 indices uniform in [0, size), with replacement. Drawn from one
    key outside any shard_map, so the draw does not depend on the device count."""
    return jax.random.randint(rng, (num,), 0, size, jnp.int32)


def _local(bank, idx, axis_name):
    """Global row indices -> (this device's row index, whether it owns the row)."""
    n_local = bank.shape[0]
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n_local
    local = idx - offset
    return local, (local >= 0) & (local < n_local)


def lookup(bank: jax.Array, idx: jax.Array, axis_name: str | None = None) -> jax.Array:
    """Rows idx of the bank: (M,) int, the same on every device -> (M, D) float32,
    constant to autodiff (the bank is not trained by gradients)."""
    bank = jax.lax.stop_gradient(bank)
    if axis_name is None:
        return bank[idx]
    local, owned = _local(bank, idx, axis_name)
    rows = jnp.where(owned[:, None], bank[jnp.clip(local, 0, bank.shape[0] - 1)], 0.0)
    return jax.lax.psum(rows, axis_name)


def update(bank: jax.Array, idx: jax.Array, values: jax.Array, momentum: float,
           axis_name: str | None = None) -> jax.Array:
    """m_i <- normalise(momentum * m_i + (1 - momentum) * v_i) for each i in idx.

    idx: (b,) int, this device's rows of the batch; values: (b, D) their
    embeddings (L2-normalised here; no gradient). Returns the new bank (this
    device's block under a mesh). Duplicates: see the module docstring.
    """
    values = jax.lax.stop_gradient(losses.l2_normalize(values))
    if axis_name is not None:  # every device needs every row of the global batch
        idx = jax.lax.all_gather(idx, axis_name, tiled=True)
        values = jax.lax.all_gather(values, axis_name, tiled=True)
    # Mean over duplicates: (B, B) same-index matrix; O(B^2 D), small next to the network.
    same = (idx[:, None] == idx[None, :]).astype(jnp.float32)
    # HIGHEST: a TPU would otherwise average the f32 embeddings in bf16.
    values = (jnp.matmul(same, values, precision=jax.lax.Precision.HIGHEST)
              / jnp.sum(same, axis=1, keepdims=True))
    local, owned = _local(bank, idx, axis_name)
    local = jnp.where(owned, local, bank.shape[0])  # out of range: dropped by the scatter
    old = bank[jnp.clip(local, 0, bank.shape[0] - 1)]
    new = losses.l2_normalize(momentum * old + (1.0 - momentum) * values).astype(bank.dtype)
    return bank.at[local].set(new, mode="drop")
