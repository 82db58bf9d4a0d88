"""Contrastive losses over M >= 2 views of each sample, pure, on one device's rows.

Every function takes z: (b, M, D), this device's projections of M views of each of its
b samples (view m of sample i at z[i, m]; L2-normalised here), and `axis_name` as in
`losses`: None on one device, or the mesh axis under `parallel.on_shards`, in which case
the candidates are the whole global batch of K samples (all-gathered) and the mean is over
the global batch; the value and gradient are the same either way. Each returns
(loss, metrics): a float32 scalar and a dict of float32 scalars. s(x, y) = x.y / temperature.

  polyview    Poly-View contrastive, geometric or arithmetic (Shidani et al., ICLR 2024)
  cmc         Contrastive Multiview Coding, core view or full graph (Tian et al., 2019)
  cmc_nce     the same pairs, NCE against memory-bank rows (the authors' NCEAverage)
  mv_infonce  MV-InfoNCE (Koromilas et al., 2025)
  mv_dhel     MV-DHEL (Koromilas et al., 2025)

docs/multiview.md gives the definitions and their sources.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from ssl_jax import losses
from ssl_jax.losses import _BIG, _gather, _global_mean, l2_normalize

POLYVIEW_VARIANTS = ("geometric", "arithmetic")
CMC_GRAPHS = ("core", "full")


def _global_count(b: int, axis_name: str | None) -> jax.Array:
    """The global batch size K, as a replicated scalar."""
    return jnp.asarray(b if axis_name is None else jax.lax.psum(b, axis_name))


def _scores(z: jax.Array, temperature: float, axis_name: str | None):
    """z: (b, M, D) -> (z normalised, s: (b, M, K, M) = s(z_il, g_jm) against the global
    batch g, own: (b, K) bool, True at each local sample's own global row)."""
    b = z.shape[0]
    z = l2_normalize(z)
    g = _gather(z, axis_name)                                        # (K, M, D)
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
    own = jax.nn.one_hot(jnp.arange(b) + offset, g.shape[0], dtype=bool)
    return z, jnp.einsum("ild,jmd->iljm", z, g) / temperature, own


def polyview(z: jax.Array, temperature: float, variant: str = "geometric",
             axis_name: str | None = None) -> tuple[jax.Array, dict]:
    """Poly-View contrastive loss (Shidani et al., "Poly-View Contrastive Learning",
    ICLR 2024, Algorithm 1; arXiv 2403.05490).

    Every view a of sample i is an anchor and each other view t != a a target. The pair's
    probability is a softmax over the target and every view of every OTHER sample of the
    global batch, M (K - 1) + 1 logits; the anchor and the sample's other views are masked:

      p(a, t) = exp s(z_ia, z_it) / (exp s(z_ia, z_it) + sum_{j != i} sum_m exp s(z_ia, z_jm))

    geometric:  -1/(K M) sum_{i, a} 1/(M-1) sum_{t != a} log p(a, t)
    arithmetic: -1/(K M) sum_{i, a} log(1/(M-1) sum_{t != a} p(a, t))

    arithmetic <= geometric (Jensen); at M = 2 both are losses.nt_xent. The geometric one
    with equal-size crops is SwAV's multi-crop SimCLR, so both are one implementation:
    losses.multicrop_nt_xent. Metrics: contrast_acc (the fraction of anchors whose most
    similar view outside themselves is one of their own sample's) and logits, M (K-1) + 1.
    """
    if variant not in POLYVIEW_VARIANTS:
        raise ValueError(f"polyview variant={variant!r}: use one of {POLYVIEW_VARIANTS}.")
    b, m, _ = z.shape
    loss, metrics = losses.multicrop_nt_xent(z, temperature, axis_name, mean=variant)
    logits = m * (_global_count(b, axis_name) - 1) + 1
    return loss, {**metrics, "logits": logits.astype(jnp.float32)}


def cmc_pairs(m: int, graph: str) -> list[tuple[int, int]]:
    """The view pairs (i, j), i < j, of CMC's objective: core view, (0, j) for every other
    view j (M - 1 pairs); full graph, every pair (M (M - 1) / 2)."""
    if graph not in CMC_GRAPHS:
        raise ValueError(f"cmc graph={graph!r}: use one of {CMC_GRAPHS}.")
    if graph == "core":
        return [(0, j) for j in range(1, m)]
    return list(itertools.combinations(range(m), 2))


def cmc(z: jax.Array, temperature: float, graph: str = "core",
        axis_name: str | None = None) -> tuple[jax.Array, dict]:
    """Contrastive Multiview Coding with an in-batch softmax (Tian, Krishnan, Isola,
    "Contrastive Multiview Coding", 2019; arXiv 1906.05849; HobbitLong/CMC train_CMC.py).

    The two-view loss L(i, j): anchors from view i, candidates from view j only -- the K
    views j of the global batch, one positive (the anchor's own sample):

      L(i, j) = -1/K sum_k log( exp s(z_ki, z_kj) / sum_{k'} exp s(z_ki, z_k'j) )

    A pair's loss is the SUM of both directions, L(i, j) + L(j, i) (train_CMC.py:
    loss = l_loss + ab_loss), and the objective the SUM over the pairs of the graph
    (cmc_pairs): core view, view 0 against each other view; full graph, every pair. At M = 2
    it is L(1, 2) + L(2, 1), not NT-Xent (no same-view negatives, and a sum, not a mean).
    The paper's NCE with a memory bank is cmc_nce. Metrics: contrast_acc, over
    every directed term; pairs, the number of view pairs.
    """
    b, m, _ = z.shape
    pairs = cmc_pairs(m, graph)
    _, s, own = _scores(z, temperature, axis_name)
    total, hits = 0.0, 0.0
    for i, j in pairs:
        for a, c in ((i, j), (j, i)):
            logits = s[:, a, :, c]                                  # (b, K): view a vs view c
            log_p = jnp.sum(jnp.where(own, jax.nn.log_softmax(logits), 0.0), -1)
            total += -jnp.sum(log_p)
            hits += jnp.sum(jnp.argmax(logits, -1) == jnp.argmax(own, -1))
    loss = _global_mean(total, b, axis_name)
    acc = _global_mean(hits / (2 * len(pairs)), b, axis_name)
    return loss, {"contrast_acc": acc, "pairs": jnp.float32(len(pairs))}


def cmc_nce(z: jax.Array, pos: jax.Array, neg: jax.Array, log_z: jax.Array,
            temperature: float, num_data: int, graph: str = "core",
            axis_name: str | None = None) -> tuple[jax.Array, dict]:
    """CMC's NCE against one memory bank per view (HobbitLong/CMC NCE/NCEAverage.py,
    NCECriterion.py, train_CMC.py): for each pair (i, j) of the graph (cmc_pairs), view
    i's embeddings against view j's bank and view j's against view i's bank (NCEAverage's
    out_l: L against memory_ab; out_ab: ab against memory_l), each term losses.nce:

      P(m) = exp(z.m / t) / Z_ac,   h = P / (P + K / N),
      L(a, c) = mean_k [-log h(pos_kc) - sum_n log(1 - h(neg_nc))]

    and the loss the sum of both directions over the pairs (loss = l_loss + ab_loss).

    z: (b, M, D) this device's embeddings (L2-normalised here; gradients flow);
    pos: (b, M, D) each sample's own row in each view's bank; neg: (K, M, D) the same K
    drawn rows in each view's bank, shared by the global batch (both constants);
    log_z: (M, M) float32, [a, c] the stored log Z of view a against bank c, -inf before
    its first step: then Z_ac = N mean(exp(z.m / t)) over this global batch's b x (K + 1)
    scores (NCEAverage's first call) and kept after. Entries of no pair stay -inf.
    Returns (loss, metrics): contrast_acc (the positive the best of its K + 1, over every
    directed term), pairs, and log_z (M, M), the log Z to store.
    """
    pairs = cmc_pairs(z.shape[1], graph)
    total, acc, new_log_z = 0.0, 0.0, log_z
    for i, j in pairs:
        for a, c in ((i, j), (j, i)):
            term, mt = losses.nce(z[:, a], pos[:, c], neg[:, c], temperature, num_data,
                                  log_z[a, c], axis_name)
            total, acc = total + term, acc + mt["contrast_acc"]
            new_log_z = new_log_z.at[a, c].set(mt["log_z"])
    return total, {"contrast_acc": acc / (2 * len(pairs)), "pairs": jnp.float32(len(pairs)),
                   "log_z": jax.lax.stop_gradient(new_log_z)}


def _positives(z: jax.Array, temperature: float) -> jax.Array:
    """(b, M, M): s(z_il, z_il') between the views of each sample."""
    return jnp.einsum("ild,imd->ilm", z, z) / temperature


def mv_infonce(z: jax.Array, temperature: float,
               axis_name: str | None = None) -> tuple[jax.Array, dict]:
    """MV-InfoNCE (Koromilas et al., "A Principled Framework for Multi-View Contrastive
    Learning", 2025, arXiv 2507.06979; as in the authors' pakoromilas/Multi-View-CL,
    models/losses.py MVINFONCE). One term per sample i: every ordered pair of its views
    over every pair of one of its views with any other view of the global batch:

      loss = -1/K sum_i log( sum_{l != l'} exp s(z_il, z_il')
                             / sum_l sum_{(j, m) != (i, l)} exp s(z_il, z_jm) )

    The denominator holds the sample's own other views as well as every view of every
    other sample, of the same view or not (the authors' code; their README's typeset
    formula reads as other views m != l only -- docs/multiview.md). Metrics: contrast_acc
    (as polyview's).
    """
    b, m, _ = z.shape
    z, s, own = _scores(z, temperature, axis_name)
    other = ~jnp.eye(m, dtype=bool)
    pos = _positives(z, temperature)
    log_num = jax.nn.logsumexp(jnp.where(other, pos, -_BIG), axis=(1, 2))       # (b,)
    # Mask only the anchor itself: (j, m) == (i, l).
    self_mask = own[:, None, :, None] & jnp.eye(m, dtype=bool)[None, :, None, :]
    all_but_self = jnp.where(self_mask, -_BIG, s)                               # (b, M, K, M)
    log_den = jax.nn.logsumexp(all_but_self, axis=(1, 2, 3))                    # (b,)
    loss = _global_mean(jnp.sum(log_den - log_num), b, axis_name)
    return loss, {"contrast_acc": _acc(s, own, pos, other, b, m, axis_name)}


def mv_dhel(z: jax.Array, temperature: float,
            axis_name: str | None = None) -> tuple[jax.Array, dict]:
    """MV-DHEL, multi-view decoupled hyperspherical energy loss (Koromilas et al. 2025,
    arXiv 2507.06979; the authors' models/losses.py MVDHEL). Alignment of every pair of a
    sample's views over a product, per view, of that view's uniformity against the same
    view of the other samples of the global batch:

      loss = -1/K sum_i [ log sum_{l < l'} exp s(z_il, z_il')
                          - sum_l log sum_{j != i} exp s(z_il, z_jl) ]

    The sample itself is not in its view's sum and each unordered pair counts once (the
    authors' code; their README writes ordered pairs, a constant log 2, and j over every
    sample -- docs/multiview.md). At M = 2 it is their two-view DHEL. Metrics:
    contrast_acc (as polyview's).
    """
    b, m, _ = z.shape
    z, s, own = _scores(z, temperature, axis_name)
    upper = jnp.triu(jnp.ones((m, m), dtype=bool), k=1)
    pos = _positives(z, temperature)
    log_num = jax.nn.logsumexp(jnp.where(upper, pos, -_BIG), axis=(1, 2))       # (b,)
    same_view = jnp.diagonal(s, axis1=1, axis2=3)                               # (b, K, M)
    same_view = jnp.where(own[:, :, None], -_BIG, same_view)
    log_den = jnp.sum(jax.nn.logsumexp(same_view, axis=1), -1)                  # (b,)
    loss = _global_mean(jnp.sum(log_den - log_num), b, axis_name)
    other = ~jnp.eye(m, dtype=bool)
    return loss, {"contrast_acc": _acc(s, own, pos, other, b, m, axis_name)}


def _acc(s, own, pos, other, b, m, axis_name):
    """The fraction of anchors whose most similar view outside themselves is one of their
    own sample's views."""
    best_neg = jnp.max(jnp.where(own[:, None, :, None], -_BIG, s), axis=(2, 3))  # (b, M)
    best_pos = jnp.max(jnp.where(other, pos, -_BIG), -1)                        # (b, M)
    return _global_mean(jnp.sum(best_pos > best_neg), b * m, axis_name)
