"""Weighted k-nearest-neighbour classification on frozen features (NPID, Wu et al. 2018).

Features are L2-normalised; each test example takes its k most cosine-similar
train examples, and each neighbour votes for its label with weight
exp(similarity / temperature). NPID's defaults: k=200, temperature=0.07.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.eval.linear import _check


def _normalise(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _votes(query, bank, bank_labels, *, k: int, num_classes: int, temperature: float):
    """query (Q, D), bank (N, D), both normalised, bank_labels (N,) -> class scores (Q, C)."""
    sim = jnp.dot(query, bank.T, precision=jax.lax.Precision.HIGHEST)  # (Q, N)
    top_sim, top_idx = jax.lax.top_k(sim, k)  # (Q, k)
    weights = jnp.exp(top_sim / temperature)
    onehot = jax.nn.one_hot(bank_labels[top_idx], num_classes)  # (Q, k, C)
    return jnp.einsum("qk,qkc->qc", weights, onehot)


def knn_scores(train_x, train_y, test_x, *, num_classes: int, k: int = 200,
               temperature: float = 0.07, batch_size: int = 256) -> np.ndarray:
    """-> (M, num_classes) summed neighbour weights per class for each test row.

    Test rows are scored in batches of batch_size (the last one padded) so the
    (batch, N) similarity matrix stays small and the function compiles once.
    """
    bank = _normalise(jnp.asarray(train_x, jnp.float32))
    labels = jnp.asarray(train_y, jnp.int32)
    k = int(min(k, len(bank)))
    test_x = np.asarray(test_x, np.float32)
    m = len(test_x)
    out = []
    for i in range(0, m, batch_size):
        q = test_x[i:i + batch_size]
        pad = batch_size - len(q)
        q = np.pad(q, ((0, pad), (0, 0)))
        s = _votes(_normalise(jnp.asarray(q)), bank, labels, k=k, num_classes=num_classes,
                   temperature=float(temperature))
        out.append(np.asarray(s)[:batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


def knn_classify(train_x, train_y, test_x, test_y, *, num_classes: int, k: int = 200,
                 temperature: float = 0.07, batch_size: int = 256) -> dict:
    """train_x (N, D), train_y (N,), test_x (M, D), test_y (M,) -> {"top1", "top5"} in percent."""
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    train_y, test_y = np.asarray(train_y).astype(np.int32), np.asarray(test_y).astype(np.int32)
    _check(train_x, train_y, num_classes, "train")
    _check(test_x, test_y, num_classes, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train and test features differ in width: {train_x.shape[1]} vs "
                         f"{test_x.shape[1]}.")
    k = int(min(k, len(train_x)))
    scores = knn_scores(train_x, train_y, test_x, num_classes=num_classes, k=k,
                        temperature=temperature, batch_size=batch_size)
    # Stable ranking: ties go to the lower class index, like argmax.
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :min(5, num_classes)]
    hit = ranked == test_y[:, None]
    return {"top1": float(100.0 * hit[:, 0].mean()), "top5": float(100.0 * hit.any(1).mean()),
            "k": k, "temperature": float(temperature)}
