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


def multicrop_nt_xent(z: jax.Array, temperature: float, axis_name: str | None = None,
                      mean: str = "geometric") -> tuple[jax.Array, dict]:
    """NT-Xent over V >= 2 crops of each image: SwAV's multi-crop SimCLR (Caron et al. 2020,
    appendix A.8, Eq. 7), which is Poly-View's geometric loss (multiview.polyview).

    z: (b, V, D) this device's projections of V crops (global and local) of each of b
    images. With s(x, y) = x.y / temperature on L2-normalised rows and B images in the
    global batch, every crop (i, v) is an anchor and every other crop (i, w) of its image a
    positive. Each (anchor, positive) pair is its own softmax, over the positive and every
    crop of every OTHER image -- V (B - 1) + 1 logits; the image's other positives and the
    anchor itself are not in it (Eq. 7: "all crops in the same batch except ones coming from
    the same instance"; VISSL's multicrop_simclr_info_nce_loss, by SwAV's authors, does the
    same):

      p(v, w) = exp s(z_iv, z_iw) / (exp s(z_iv, z_iw) + sum_{j != i} sum_u exp s(z_iv, z_ju))

    mean says how an anchor's V - 1 pairs are averaged:
      "geometric"  (Eq. 7):  loss = -1/(B V) sum_{i, v} 1/(V-1) sum_{w != v} log p(v, w)
      "arithmetic" (Poly-View's other variant): -1/(B V) sum_{i, v} log(1/(V-1) sum_{w != v} p(v, w))
    The arithmetic value is <= the geometric one (log is concave); at V = 2 both are
    nt_xent exactly. Returns the loss and contrast_acc: the fraction of anchors whose most
    similar other crop is one of their positives.
    """
    if mean not in ("geometric", "arithmetic"):
        raise ValueError(f"mean={mean!r}: use 'geometric' or 'arithmetic'.")
    b, v, _ = z.shape
    z = l2_normalize(z)
    g = _gather(z, axis_name)                                    # (B, V, D)
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
    own = jax.nn.one_hot(jnp.arange(b) + offset, g.shape[0], dtype=bool)   # (b, B)
    # Every crop of every other image; the anchor's own image is masked out whole.
    s = jnp.einsum("ivd,jwd->ivjw", z, g) / temperature          # (b, V, B, V)
    neg = jnp.where(own[:, None, :, None], -_BIG, s).reshape(b, v, -1)
    log_neg = jax.nn.logsumexp(neg, axis=-1)                     # (b, V)
    pos = jnp.einsum("ivd,iwd->ivw", z, z) / temperature         # (b, V, V): anchor v, positive w
    log_p = pos - jnp.logaddexp(pos, log_neg[..., None])         # log p(v, w)
    other = ~jnp.eye(v, dtype=bool)                              # w != v
    if mean == "geometric":
        per_anchor = jnp.sum(jnp.where(other, log_p, 0.0), -1) / (v - 1)
    else:
        per_anchor = jax.nn.logsumexp(jnp.where(other, log_p, -_BIG), -1) - jnp.log(v - 1)
    loss = _global_mean(-jnp.sum(per_anchor), b * v, axis_name)
    hit = jnp.max(jnp.where(other, pos, -_BIG), -1) > jnp.max(neg, -1)
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
