"""The invariance score of Purushwalkam & Gupta 2020 ("Demystifying Contrastive
Self-Supervised Learning", arXiv 2007.13916): how consistently a representation's
most invariant neurons fire across the images of one object under one kind of
transformation, relative to how often they fire at all.

Inputs: features (N, D), one row per image; set_ids (N,), the images of one
object (or track) under one transformation share a set id; class_ids (N,).
With C distinct classes:

1. p = min((1 - 1/C) * 100, 95) and j = floor(N * p / 100), in exact integer
   arithmetic: N * (C - 1) // C below C = 20, N * 95 // 100 from there.
2. Per neuron, over all N images: upper threshold t_hi = the j-th smallest value
   (0-based), lower threshold t_lo = the j-th largest. G = the fraction of the N
   images with value >= t_hi (upper side only).
3. A set's class is the class of its first row (first in the given row order).
   Sets of fewer than 3 images are skipped. Per remaining set of s images and
   per neuron: u = #(value > t_hi), l = #(value < t_lo), f = max(u, l) (the
   better sign, per set and neuron). If f > 0 the set adds f / s to its class's
   local sum for the neuron and 1 to its count. L = sum / count (0 if count 0).
4. Per class: score = L / G per neuron, sorted descending; its value at K is
   the mean of its top min(K, D). The result at K is the mean of that over all C
   classes (one without a set of >= 3 images scores 0), times (100 - p).

The `>=` of G against the `>` of u, and the upper-side-only G, are as in the
authors' released code: kept so that the numbers are comparable with theirs.

Worked example (N = 10, D = 1, 2 classes, so p = 50, j = 5):
values 5 5 9 8 | 1 2 5 0 | 5 3, set ids 7 7 7 7 | 3 3 3 3 | 4 4, classes
0 0 0 0 | 1 1 1 1 | 1 1. Sorted: 0 1 2 3 5 5 5 5 8 9, so t_hi = 5 (index 5)
and t_lo = 5 (index 4); G = #(>= 5) / 10 = 0.6. Set 7: u = 2 (9, 8), l = 0,
f = 2, so class 0 gets L = 2/4. Set 3: u = 0 (its 5 is not > 5), l = 3, f = 3,
so class 1 gets L = 3/4. Set 4 has 2 images: skipped. Scores: 0.5/0.6 and
0.75/0.6; result at K = 1: (0.8333 + 1.25) / 2 * (100 - 50) = 52.08.

Row order: thresholds, G and the per-set counts depend only on which rows
share a set, and sets enter their class's sum in set-id order, so permuting
the rows gives bit-identical scores whenever every set has a single class.
A set with mixed classes takes the class of its first row, which then does
depend on the order (documented, not an error: the authors do the same).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ssl_jax.errors import UserError

MIN_SET_SIZE = 3
# Elements of the features of one chunk of neurons, (chunk, N); a few such
# temporaries (transposed copy, partition, 1-byte masks) bound the memory beyond
# the input to ~0.3 GB at float32, whatever N and D (measured at 100000 x 2048).
_SLAB = 1 << 24


def _percent_and_rank(n: int, num_classes: int) -> tuple[float, int]:
    """-> (p, j). j in integers: the float form floor(n * p / 100) lands one
    below the exact value for some n at C = 12 and 17 (p rounds down)."""
    p = min((1.0 - 1.0 / num_classes) * 100.0, 95.0)
    j = n * (num_classes - 1) // num_classes if num_classes < 20 else n * 95 // 100
    return p, j


def _check(features, set_ids, class_ids, top_k) -> tuple[np.ndarray, np.ndarray,
                                                          np.ndarray, tuple[int, ...]]:
    ks = (top_k,) if np.isscalar(top_k) else tuple(top_k)
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise UserError(f"top_k must be a non-empty sequence of integers >= 1 (the numbers "
                        f"of most invariant neurons to average); got {top_k!r}.")
    x = np.asarray(features)
    if x.ndim != 2:
        raise UserError(f"features must be 2-D (N images, D neurons); got shape {x.shape}. "
                        "Flatten or pool each image's features into one row.")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
            or x.dtype == bool):
        raise UserError(f"features must be real numbers; got dtype {x.dtype}.")
    sets, classes = np.asarray(set_ids), np.asarray(class_ids)
    if sets.shape != (len(x),) or classes.shape != (len(x),):
        raise UserError(f"features, set_ids and class_ids must have one entry per image; "
                        f"got features {x.shape}, set_ids {sets.shape}, class_ids "
                        f"{classes.shape}: give set_ids and class_ids as (N,) arrays.")
    # The float64 row sums are finite exactly when the rows are, unless finite
    # float64 values overflow: then count exactly.
    if x.dtype.kind == "f" and not np.isfinite(x.sum(axis=1, dtype=np.float64)).all():
        bad = int(np.count_nonzero(~np.isfinite(x).all(axis=1)))
        if bad:
            raise UserError(f"features have NaN or inf in {bad} of {len(x)} rows: fix or "
                            "drop those images before scoring.")
    return x, sets, classes, tuple(int(k) for k in ks)


def invariance_scores(features, set_ids, class_ids,
                      top_k: Sequence[int] = (10, 25)) -> dict[int, float]:
    """features (N, D) float, set_ids (N,) int, class_ids (N,) int -> {K: score}
    for each K of top_k: the mean over all classes of the mean L / G of the class's
    top min(K, D) neurons, times (100 - p). The procedure: the module docstring.

    Raises ValueError (UserError) on features not 2-D or not finite, lengths that
    differ, fewer than 2 classes, no set of at least 3 images, or a bad top_k.
    """
    x, sets, classes, ks = _check(features, set_ids, class_ids, top_k)
    n, d = x.shape
    class_values = np.unique(classes)
    if len(class_values) < 2:
        raise UserError(f"the invariance score needs at least 2 classes (1 class makes the "
                        f"firing percentile p = 0); got {len(class_values)}. Give each "
                        "image its class in class_ids.")
    p, j = _percent_and_rank(n, len(class_values))

    # Stable: within a set, rows keep their given order, so a set's first row
    # in `order` is its first row in the input.
    order = np.argsort(sets, kind="stable")
    sorted_sets = sets[order]
    starts = np.flatnonzero(np.r_[True, sorted_sets[1:] != sorted_sets[:-1]])
    sizes = np.diff(np.r_[starts, n])
    keep = sizes >= MIN_SET_SIZE
    if not keep.any():
        raise UserError(f"every set has fewer than {MIN_SET_SIZE} images (the largest has "
                        f"{sizes.max()}): sets need at least {MIN_SET_SIZE} images of one "
                        "object under one transformation; check set_ids.")
    set_class = np.searchsorted(class_values, classes[order[starts[keep]]])
    kept_sizes = sizes[keep].astype(np.float64)
    # Kept sets grouped by class, set-id order within a class (stable): each class
    # sums its sets in an order that no row permutation changes.
    by_class = np.argsort(set_class, kind="stable")
    class_starts = np.flatnonzero(np.r_[True, np.diff(set_class[by_class]) != 0])
    pick, kept_sizes = np.flatnonzero(keep)[by_class], kept_sizes[by_class]

    scores = np.empty((len(class_starts), d), np.float64)
    width = max(1, min(d, _SLAB // max(n, 1)))
    for c0 in range(0, d, width):
        # (width, N), rows grouped by set: one neuron per contiguous row makes the
        # selections and the per-set sums (one reduceat segment a set) ~2x faster
        # than along axis 0, which pays for the transposing copy.
        xt = np.ascontiguousarray(x[order, c0:c0 + width].T)
        part = xt.copy()
        # Two single selections, the second within the first's lower part, beat
        # one two-kth partition by ~1.5x. j >= N - 1 - j since p >= 50.
        part.partition(j, axis=1)
        hi = part[:, j:j + 1].copy()  # copies, so that `del part` frees it
        if n - 1 - j < j:
            part[:, :j].partition(n - 1 - j, axis=1)
        lo = part[:, n - 1 - j:n - j].copy()
        del part
        g = np.count_nonzero(xt >= hi, axis=1) / n  # >= t_hi: at least N - j rows, so G > 0
        # Summed as uint8 into int32: ~2.5x faster than summing the bools.
        u = np.add.reduceat((xt > hi).view(np.uint8), starts, axis=1, dtype=np.int32)
        l_ = np.add.reduceat((xt < lo).view(np.uint8), starts, axis=1, dtype=np.int32)
        f = np.maximum(u, l_)[:, pick]  # (width, kept sets), grouped by class
        local = np.add.reduceat(f / kept_sizes, class_starts, axis=1)
        count = np.add.reduceat((f > 0).view(np.uint8), class_starts, axis=1, dtype=np.int64)
        rate = np.divide(local, count, out=np.zeros_like(local), where=count > 0)
        g = g[:, None]
        scores[:, c0:c0 + width] = np.divide(rate, g, out=np.zeros_like(rate), where=g > 0).T

    # Mean of the top K per class as a running mean over the descending sort.
    top = np.cumsum(-np.sort(-scores, axis=1), axis=1)
    # Mean over all C classes: one without a set of >= 3 images scores 0 (its L is 0
    # everywhere), as in the authors' code, which keeps every class.
    return {k: float((top[:, min(k, d) - 1] / min(k, d)).sum() / len(class_values)
                     * (100.0 - p)) for k in ks}


def format_scores(scores: dict[int, float]) -> str:
    """{K: score} -> "top-10 12.345  top-25 10.123" (the authors print 3 decimals)."""
    return "  ".join(f"top-{k} {v:.3f}" for k, v in sorted(scores.items()))


# ------------------------------------------------------------------ the evaluator

# Known transformations first, in the paper's order; other splits (a real benchmark's,
# e.g. ALOI's illumination_colour) follow in the dataset's order.
ORDER = ("occlusion", "viewpoint", "illumination", "instance")
COLUMNS = ("transformation", "K", "invariance")  # results.md's value columns


def evaluate(inputs, settings: dict) -> dict[str, dict]:
    """The "invariance" evaluator (eval/evaluators.py): inputs an evaluators.Inputs
    (its `sets`), settings config.eval.invariance {dataset, data_dir, splits, top_k}.

    Every split of the transformation-set dataset (or those of `splits`) is one
    transformation; each is scored on every stage's features.
    -> {stage: {"scores": {transformation: {"K": score}}, "images": {transformation:
    N}, "sets": {transformation: sets of >= 3 images}, "dataset": name}}
    (K as a string: the record is JSON).
    """
    dataset, data_dir = settings.get("dataset") or None, settings.get("data_dir") or None
    top_k = tuple(int(k) for k in settings.get("top_k", (10, 25)))
    splits = list(settings.get("splits") or ())
    if not splits:
        found = inputs.set_splits(dataset, data_dir)
        splits = [t for t in ORDER if t in found] + [t for t in found if t not in ORDER]
    out: dict[str, dict] = {}
    for split in splits:
        sets = inputs.sets(dataset, data_dir, split)
        _, sizes = np.unique(sets.set_id, return_counts=True)
        for stage, feats in sets.features.items():
            try:
                scores = invariance_scores(feats, sets.set_id, sets.label, top_k)
            except UserError as e:
                raise UserError(f"invariance of {stage} on {sets.dataset} {split}: {e}") from None
            r = out.setdefault(stage, {"scores": {}, "images": {}, "sets": {},
                                       "dataset": sets.dataset})
            r["scores"][split] = {str(k): float(v) for k, v in scores.items()}
            r["images"][split] = int(len(feats))
            r["sets"][split] = int(np.sum(sizes >= MIN_SET_SIZE))
    return out


def merge(old: dict, new: dict) -> dict:
    """A stage's record already written, and this evaluation's (same step) -> the one
    to keep: records merge by transformation, as they merge by stage, so scoring
    --invariance occlusion again keeps the other transformations' scores. Sets of
    another dataset replace the old record whole (the scores would mix benchmarks)."""
    if old.get("dataset") != new.get("dataset"):
        return new
    found = list(dict.fromkeys([*old["scores"], *new["scores"]]))
    names = [t for t in ORDER if t in found] + [t for t in found if t not in ORDER]
    return dict(new, **{field: {t: new[field].get(t, old[field].get(t)) for t in names
                                if t in new[field] or t in old[field]}
                        for field in ("scores", "images", "sets")})


def summary(stage_record: dict) -> str:
    """One printed line per stage: each transformation's scores, K = top_k in order."""
    ks = next(iter(stage_record["scores"].values()))
    return f"K={'/'.join(ks)}: " + "  ".join(
        f"{t} {'/'.join(f'{v:.2f}' for v in per_k.values())}"
        for t, per_k in stage_record["scores"].items())


def details(stage_record: dict) -> list[str]:
    return [f"{t}: {stage_record['sets'][t]} sets, {stage_record['images'][t]} images"
            for t in stage_record["scores"]]


def rows(stage_record: dict) -> list[tuple[str, tuple[str, ...]]]:
    """results.md rows of a stage: one per transformation and K."""
    return [("invariance", (t, k, f"{v:.2f}"))
            for t, per_k in stage_record["scores"].items() for k, v in per_k.items()]
