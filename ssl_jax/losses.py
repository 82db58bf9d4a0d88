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


def classification(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The pretext and supervised classifiers' objective: logits (B, C), labels (B,) int
    -> (mean cross-entropy, top-1 accuracy in [0, 1]), both float32 scalars over the
    global batch (a plain mean under jit is already global)."""
    value = jnp.mean(cross_entropy(logits, labels))
    return value, jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


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


def multicrop_nt_xent(z: jax.Array, temperature: float,
                      axis_name: str | None = None) -> tuple[jax.Array, dict]:
    """NT-Xent over V >= 2 crops of each image (SimCLR with multi-crop, SwAV's appendix).

    z: (b, V, D) this device's projections of V crops (global and local) of each of b
    images. With s(x, y) = x.y / temperature on L2-normalised rows and N = B V the crops
    of the global batch (B images), every crop (i, v) is an anchor and every other crop
    (i, v') of its image a positive; the denominator is every crop of the global batch
    but the anchor itself (the other positives included, as NT-Xent's 1[k != i]):

      loss = 1 / (B V (V - 1)) sum_i sum_v sum_{v' != v}
             -log( exp s(z_iv, z_iv') / sum_{(j, w) != (i, v)} exp s(z_iv, z_jw) )

    With V = 2 it is nt_xent exactly. (VISSL's multicrop_simclr_info_nce_loss instead
    leaves the other positives out of each pair's denominator: the two agree at V = 2.)
    Returns the loss and contrast_acc: the fraction of anchors whose most similar other
    crop is one of their positives.
    """
    b, v, d = z.shape
    z = l2_normalize(z).reshape(b * v, d)                      # row i * V + v
    g = _gather(z, axis_name)                                  # (B V, D)
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b * v
    rows = jnp.arange(b * v) + offset                          # each row's global index
    logits = z @ g.T / temperature - jax.nn.one_hot(rows, g.shape[0]) * _BIG  # (bV, BV)
    log_denom = jax.nn.logsumexp(logits, axis=1)               # (bV,)
    # Row r's positives sit in columns (r // V) * V + u, u = 0..V-1, u != r % V.
    cols = (rows // v)[:, None] * v + jnp.arange(v)[None, :]   # (bV, V)
    pos = jnp.take_along_axis(logits, cols, axis=1)       # (bV, V), self at -BIG
    is_pos = cols != rows[:, None]
    per_pair = jnp.where(is_pos, log_denom[:, None] - pos, 0.0)
    loss = _global_mean(jnp.sum(per_pair), b * v * (v - 1), axis_name)
    hit = (jnp.argmax(logits, axis=1) // v) == rows // v
    acc = _global_mean(jnp.sum(hit), b * v, axis_name)
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


def _global_log_mean_exp(x: jax.Array, axis_name: str | None) -> jax.Array:
    """log(mean(exp(x))) over every element of x on every device, overflow-free."""
    m = jnp.max(x) if axis_name is None else jax.lax.pmax(jnp.max(x), axis_name)
    return m + jnp.log(_global_mean(jnp.sum(jnp.exp(x - m)), x.size, axis_name))


def nce(z: jax.Array, pos: jax.Array, neg: jax.Array, temperature: float, num_data: int,
        log_z: jax.Array, axis_name: str | None = None) -> tuple[jax.Array, dict]:
    """NPID's / PIRL's noise-contrastive estimation against a memory bank.

    z: (b, D) embeddings (L2-normalised here; gradients flow); pos: (b, D) each
    example's memory row; neg: (K, D) rows drawn uniformly from the bank, shared
    by the global batch (pos and neg are constants). With s = z.m / temperature,
    P(m) = exp(s) / Z and noise probability 1/N:
      h(m) = P / (P + K/N),  loss = mean_i [-log h(pos_i) - sum_k log(1 - h(neg_k))].
    log_z: () the stored log Z; -inf means "not estimated yet", and then Z is
    estimated from this global batch as N * mean(exp(s)) over all b x (K + 1)
    scores (NPID's rule). Returns (loss, {"contrast_acc", "log_z"}); store the
    returned log_z so Z stays fixed afterwards.
    """
    z = l2_normalize(z)
    pos = jax.lax.stop_gradient(pos).astype(jnp.float32)
    neg = jax.lax.stop_gradient(neg).astype(jnp.float32)
    s_pos = jnp.sum(z * pos, -1) / temperature                          # (b,)
    s_neg = z @ neg.T / temperature                                     # (b, K)
    scores = jnp.concatenate([s_pos[:, None], s_neg], axis=1)
    estimate = jnp.log(num_data) + _global_log_mean_exp(jax.lax.stop_gradient(scores), axis_name)
    log_z = jnp.where(jnp.isneginf(log_z), estimate, log_z)
    # In logs: log h = log P - log(P + K/N); log(1 - h) = log(K/N) - log(P + K/N).
    log_noise = jnp.log(neg.shape[0] / num_data)
    log_p = scores - log_z
    log_denom = jnp.logaddexp(log_p, log_noise)
    per_example = -(log_p[:, 0] - log_denom[:, 0]) - jnp.sum(log_noise - log_denom[:, 1:], axis=1)
    b = z.shape[0]
    loss = _global_mean(jnp.sum(per_example), b, axis_name)
    acc = _global_mean(jnp.sum(jnp.argmax(scores, -1) == 0), b, axis_name)
    return loss, {"contrast_acc": acc, "log_z": log_z}
