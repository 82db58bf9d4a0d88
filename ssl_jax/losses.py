"""Losses, pure, on one device's rows of the batch.

Each takes `axis_name`: None on one device, or the mesh axis when run under
`parallel.on_shards` (shard_map), in which case negatives and means cover the
*global* batch. The value and gradient are the same either way; tests pin that.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_BIG = 1e9  # large, not inf: inf * 0 in the backward pass would give NaN


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps))


def _gather(x, axis_name):
    return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def _global_mean(x_sum, n_local, axis_name):
    if axis_name is None:
        return x_sum / n_local
    return jax.lax.psum(x_sum, axis_name) / jax.lax.psum(n_local, axis_name)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits: (B, C) ; labels: (B,) int -> (B,) float32 per-example loss."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float,
            axis_name: str | None = None) -> tuple[jax.Array, dict]:
    """SimCLR's normalised-temperature cross-entropy with global negatives.

    z1, z2: (b, D) this device's projections of two views of the same b images.
    Each of the 2B embeddings of the global batch has one positive (its other
    view) and 2B - 2 negatives (every other embedding of the global batch).
    Returns the mean loss over the 2B anchors and the positive's top-1 accuracy.
    """
    z1, z2 = l2_normalize(z1), l2_normalize(z2)
    b = z1.shape[0]
    g1, g2 = _gather(z1, axis_name), _gather(z2, axis_name)  # (B, D)
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
    labels = jnp.arange(b) + offset  # where each row's positive sits
    self_mask = jax.nn.one_hot(labels, g1.shape[0]) * _BIG

    def side(za, ga, gb):
        logits_ab = za @ gb.T / temperature                 # (b, B) positives on "diagonal"
        logits_aa = za @ ga.T / temperature - self_mask     # (b, B) no self-similarity
        logits = jnp.concatenate([logits_ab, logits_aa], axis=1)
        return cross_entropy(logits, labels), jnp.argmax(logits, -1) == labels

    loss_1, hit_1 = side(z1, g1, g2)
    loss_2, hit_2 = side(z2, g2, g1)
    loss = _global_mean(jnp.sum(loss_1 + loss_2) / 2, b, axis_name)
    acc = _global_mean(jnp.sum(hit_1) / 2 + jnp.sum(hit_2) / 2, b, axis_name)
    return loss, {"contrast_acc": acc}


def info_nce_queue(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float,
                   axis_name: str | None = None) -> tuple[jax.Array, dict]:
    """MoCo's InfoNCE: one positive key per query, negatives from a queue.

    q: (b, D) queries (gradients flow); k: (b, D) keys (treated as constants);
    queue: (K, D) L2-normalised keys of earlier batches, replicated.
    logits = [q.k, q.queue^T] / T with the positive at index 0.
    """
    q, k = l2_normalize(q), jax.lax.stop_gradient(l2_normalize(k))
    pos = jnp.sum(q * k, -1, keepdims=True)                              # (b, 1)
    neg = q @ jax.lax.stop_gradient(queue).astype(jnp.float32).T         # (b, K)
    logits = jnp.concatenate([pos, neg], axis=1) / temperature
    labels = jnp.zeros((q.shape[0],), jnp.int32)
    b = q.shape[0]
    loss = _global_mean(jnp.sum(cross_entropy(logits, labels)), b, axis_name)
    acc = _global_mean(jnp.sum(jnp.argmax(logits, -1) == 0), b, axis_name)
    return loss, {"contrast_acc": acc}
