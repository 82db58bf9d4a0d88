"""Weighted k-nearest-neighbour classification on frozen features (NPID, Wu et al. 2018).

Features are L2-normalised; each test example takes its k most cosine-similar
train examples, and each neighbour votes for its label with weight
exp(similarity / temperature). NPID's defaults: k=200, temperature=0.07.

Test examples are scored in fixed-size batches against the whole train bank:
the (batch, N) similarity matrix is the only large intermediate (256 x 60000
float32 = 61 MB), and padding the last batch keeps one compiled program.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.errors import UserError
from ssl_jax.eval.probe import check_inputs


def _normalise(x: jax.Array) -> jax.Array:
    """x: (N, D) -> rows of unit L2 norm; an all-zero row stays zero (similarity 0 to all)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("ks", "num_classes"))
def _votes(query, bank, bank_labels, temperature, *, ks: tuple[int, ...], num_classes: int):
    """query (Q, D), bank (N, D), both normalised, bank_labels (N,) int32 ->
    scores (len(ks), Q, C): the votes of each query's k nearest rows, for each k of ks.

    One top-k at max(ks) serves every k: its rows come most similar first, so
    the k nearest are its first k columns.
    A query's weights are exp((sim - sim_max) / T): NPID's exp(sim / T) times a
    per-query constant, which changes no vote but cannot overflow float32 at a
    small temperature (exp(1 / 0.01) would).
    """
    # HIGHEST: on GPU/TPU the default bf16 passes would blur close neighbours.
    sim = jnp.dot(query, bank.T, precision=jax.lax.Precision.HIGHEST)  # (Q, N)
    top_sim, top_idx = jax.lax.top_k(sim, max(ks))  # (Q, k), most similar first
    # The barrier keeps XLA:CPU from fusing the elementwise users below into the
    # top-k, which turns it into a full sort of every row: 6.3 s -> 0.21 s per
    # batch of 256 against 60000 rows (measured here), 4 min -> 8 s for a test split.
    top_sim, top_idx = jax.lax.optimization_barrier((top_sim, top_idx))
    weights = jnp.exp((top_sim - top_sim[:, :1]) / temperature)
    rows = jnp.arange(query.shape[0])[:, None]
    labels = bank_labels[top_idx]
    # Scatter-add rather than a (Q, k, C) one-hot, which is 200 MB per batch at C = 1000.
    zeros = jnp.zeros((query.shape[0], num_classes), jnp.float32)
    return jnp.stack([zeros.at[rows, labels[:, :k]].add(weights[:, :k]) for k in ks])


def nearest(train_x, query_x, k: int) -> np.ndarray:
    """train_x (N, D), query_x (Q, D) -> (Q, k) int indices of each query's k most
    cosine-similar train rows, most similar first (the retrieval grid of --plot)."""
    sim = _normalise(jnp.asarray(query_x, jnp.float32)) @ _normalise(
        jnp.asarray(train_x, jnp.float32)).T
    return np.asarray(jax.lax.top_k(sim, int(min(k, len(train_x))))[1])


def knn_scores_at(train_x, train_y, test_x, *, num_classes: int, ks=(200,),
                  temperature: float = 0.07, batch_size: int = 256) -> dict[int, np.ndarray]:
    """train_x (N, D), train_y (N,) int, test_x (M, D) -> {k: (M, num_classes) float32
    votes} for each k of ks (each clipped to N), from one nearest-neighbour search.

    Row i holds, per class, the summed weights of test row i's k nearest train
    rows, scaled so the nearest neighbour weighs 1. Inputs are not validated
    here: knn_classify does that.
    """
    bank = _normalise(jnp.asarray(train_x, jnp.float32))
    labels = jnp.asarray(train_y, jnp.int32)
    ks = tuple(sorted({int(min(k, len(bank))) for k in ks}))
    test_x = np.asarray(test_x, np.float32)
    m = len(test_x)
    bs = max(1, min(batch_size, m))  # a small test set need not be padded to a full batch
    out = []
    for i in range(0, m, bs):
        q = test_x[i:i + bs]
        n_real = len(q)
        q = np.pad(q, ((0, bs - n_real), (0, 0)))  # zero rows: scored, then dropped
        s = _votes(_normalise(jnp.asarray(q)), bank, labels, jnp.float32(temperature), ks=ks,
                   num_classes=num_classes)
        out.append(np.asarray(s)[:, :n_real])
    scores = (np.concatenate(out, axis=1) if out
              else np.zeros((len(ks), 0, num_classes), np.float32))
    return dict(zip(ks, scores))


def _accuracy(scores: np.ndarray, test_y: np.ndarray, num_classes: int) -> dict:
    # Stable ranking: tied classes go to the lower index, as argmax does.
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :min(5, num_classes)]
    hit = ranked == test_y[:, None]
    return {"top1": float(100.0 * hit[:, 0].mean()), "top5": float(100.0 * hit.any(1).mean())}


def knn_classify(train_x, train_y, test_x, test_y, *, num_classes: int, k: int = 200,
                 temperature: float = 0.07, batch_size: int = 256, also_k=()) -> dict:
    """Weighted kNN of test rows among train rows.

    train_x: (N, D), train_y: (N,) int in [0, num_classes); test_x: (M, D), test_y: (M,).
    also_k: further k to score from the same neighbour search (NPID reports 200 and 20).
    Returns {"top1", "top5": test accuracy in percent, "k": the k used (clipped to N),
    "temperature", "also": {"k=K": {"top1", "top5", "k"}} for each further K that,
    clipped, differs from k}. Raises ValueError on malformed input (see linear.check_inputs).
    """
    train_x, train_y, test_x, test_y = check_inputs(train_x, train_y, test_x, test_y, num_classes)
    if min((k, *also_k)) < 1 or not temperature > 0 or batch_size < 1:
        raise UserError(f"need k >= 1 (also_k too), temperature > 0, batch_size >= 1; got "
                         f"{k} (also {tuple(also_k)}), {temperature}, {batch_size}.")
    clip = lambda x: int(min(x, len(train_x)))  # noqa: E731
    k = clip(k)
    scores = knn_scores_at(train_x, train_y, test_x, num_classes=num_classes,
                           ks=(k, *map(clip, also_k)), temperature=temperature,
                           batch_size=batch_size)
    also = {f"k={j}": dict(_accuracy(scores[clip(j)], test_y, num_classes), k=clip(j))
            for j in also_k if clip(j) != k}
    return dict(_accuracy(scores[k], test_y, num_classes), k=k, temperature=float(temperature),
                also=also)


def evaluate(inputs, settings: dict) -> dict[str, dict]:
    """The "knn" evaluator (eval/evaluators.py): inputs an evaluators.Inputs,
    settings config.eval.knn. -> {stage: {"top1", "top5", "k", "also": {"k=K":
    {"top1", "top5"}}}}, one neighbour search per stage; k and each K are the ones
    used, at most the number of train examples ("k_asked": the setting, when larger)."""
    out = {}
    for n in inputs.train:
        r = knn_classify(inputs.train[n], inputs.train_y, inputs.test[n], inputs.test_y,
                         num_classes=inputs.num_classes, **settings)
        out[n] = {"top1": float(r["top1"]), "top5": float(r["top5"]), "k": r["k"],
                  "also": {f"k={v['k']}": {"top1": v["top1"], "top5": v["top5"]}
                           for v in r["also"].values()}}
        if settings.get("k") is not None and r["k"] != settings["k"]:
            out[n]["k_asked"] = int(settings["k"])
    return out


def further_k(stage_record: dict) -> dict[str, dict]:
    """A stage's results at the further k (also_k): {"k=K": {"top1", "top5"}}."""
    return stage_record["also"]


def summary(stage_record: dict) -> str:
    """The printed line of a stage: the k used first (a k larger than the train split
    is clipped to its size, and said so)."""
    k, asked = stage_record["k"], stage_record.get("k_asked")
    clipped = f" (k={asked} asked: clipped to the {k} train examples)" if asked else ""
    return (f"k={k}{clipped}: top-1 {stage_record['top1']:.2f}%  "
            f"top-5 {stage_record['top5']:.2f}%")


def rows(stage_record: dict) -> list[tuple[str, tuple[str, ...]]]:
    """results.md rows of a stage, each named by its k: "knn k=200", "knn k=20"."""
    return [(f"knn {label}", (f"{v['top1']:.2f}", f"{v['top5']:.2f}")) for label, v in
            [(f"k={stage_record['k']}", stage_record), *stage_record["also"].items()]]
