"""The invariance score (eval/invariance.py) on cases with known answers: one
worked by hand, sets whose expected score follows from the definition, row
permutations, a direct loop transcription of the definition, and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ssl_jax.eval.invariance import format_scores, invariance_scores

# ------------------------------------------------------------- worked by hand

# N = 10 images, D = 3 neurons. Set 7 (class 0): rows 0-3; set 3 (class 1):
# rows 4-7; set 5 (class 1): rows 8-9, 2 images, so skipped (it still counts in
# the thresholds and in G).
HAND_X = np.array([
    # neuron 0     neuron 1     neuron 2
    [5, 0, 9], [5, 1, 8], [9, 2, 7], [8, 9, 0],   # set 7
    [1, 4, 5], [2, 4, 4], [5, 4, 1], [0, 4, 2],   # set 3
    [5, 6, 3], [3, 7, 6],                         # set 5 (skipped)
], np.float32)
HAND_SETS = np.array([7, 7, 7, 7, 3, 3, 3, 3, 5, 5])
HAND_CLASSES = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])


def test_hand_worked_case():
    # C = 2 -> p = 50, j = floor(10 * 50 / 100) = 5: t_hi = sorted[5], t_lo = the
    # 5th largest = sorted[10 - 1 - 5] = sorted[4].
    # neuron 0: sorted 0 1 2 3 5 5 5 5 8 9 -> t_hi = 5, t_lo = 5; G = #(>= 5)/10 = 0.6
    #   (the tie: with > it would be 0.2).
    #   set 7 [5 5 9 8]: u = #(> 5) = 2 (the 5s are ties, not counted), l = #(< 5) = 0,
    #     f = 2 -> 2/4.
    #   set 3 [1 2 5 0]: u = 0, l = 3 -> f = 3, the lower side -> 3/4.
    #   (set 5 [5 3] would add l = 1 -> 1/2 to class 1 if it were not skipped.)
    # neuron 1: sorted 0 1 2 4 4 4 4 6 7 9 -> t_hi = 4, t_lo = 4; G = 7/10.
    #   set 7 [0 1 2 9]: u = 1, l = 3 -> f = 3 (lower side) -> 3/4.
    #   set 3 [4 4 4 4]: u = 0, l = 0 -> f = 0: class 1's count is 0 -> L = 0.
    # neuron 2: sorted 0..9 -> t_hi = 5, t_lo = 4; G = 5/10.
    #   set 7 [9 8 7 0]: u = 3, l = 1 -> f = 3 -> 3/4.
    #   set 3 [5 4 1 2]: u = 0 (5 is a tie), l = 2 -> f = 2 -> 2/4.
    # L / G: class 0: 0.5/0.6, 0.75/0.7, 0.75/0.5 = 5/6, 15/14, 3/2
    #        class 1: 0.75/0.6, 0/0.7, 0.5/0.5  = 5/4, 0, 1
    # Descending: class 0: 3/2, 15/14, 5/6; class 1: 5/4, 1, 0. Times 100 - p = 50:
    class0, class1 = [3 / 2, 15 / 14, 5 / 6], [5 / 4, 1.0, 0.0]
    expected = {k: 50 * (np.mean(class0[:min(k, 3)]) + np.mean(class1[:min(k, 3)])) / 2
                for k in (1, 2, 3, 5)}
    # K = 1: 68.75; K = 2: 50 * (9/7 + 9/8) / 2; K = 3 and 5 (capped at D = 3) equal.
    assert expected[1] == pytest.approx(68.75, abs=1e-12)
    assert expected[2] == pytest.approx(50 * (9 / 7 + 9 / 8) / 2, abs=1e-12)
    got = invariance_scores(HAND_X, HAND_SETS, HAND_CLASSES, top_k=(1, 2, 3, 5))
    assert list(got) == [1, 2, 3, 5]
    np.testing.assert_allclose([got[k] for k in got], [expected[k] for k in got],
                               rtol=1e-13, atol=0)
    assert format_scores(got).startswith("top-1 68.750  top-2 60.268")


def test_class_only_in_skipped_sets_counts_for_p_and_enters_the_mean_with_0():
    # Give the skipped set 5 its own class 2: C = 3 -> p = 200/3, j = 10 * 2 // 3 = 6,
    # t_hi = sorted[6], t_lo = sorted[3].
    # neuron 0: t_hi = 5, t_lo = 3, G = 0.6; set 7: u = 2, l = 0 -> 2/4; set 3: l = 3 -> 3/4.
    # neuron 1: t_hi = 4, t_lo = 4, G = 0.7; same as before: 3/4 and count 0.
    # neuron 2: t_hi = 6, t_lo = 3, G = 0.4; set 7: u = 3 -> 3/4; set 3: l = 2 -> 2/4.
    # class 0 top-1: 0.75/0.4 = 15/8; class 1 top-1: max(0.75/0.6, 0.5/0.4) = 5/4.
    # Class 2 has no set of >= 3 images: its L is 0 for every neuron, so it scores 0
    # and still counts in the mean over the C = 3 classes, as in the authors' code
    # (senthilps8/demystifyssl measure_invariances.py keeps every class).
    classes = HAND_CLASSES.copy()
    classes[8:] = 2
    got = invariance_scores(HAND_X, HAND_SETS, classes, top_k=(1,))
    p = (1 - 1 / 3) * 100
    np.testing.assert_allclose(got[1], (15 / 8 + 5 / 4 + 0) / 3 * (100 - p), rtol=1e-13)


# ------------------------------------------------------------- expected values

def _set_design(num_classes=10, num_sets=1002, size=5):
    """Sets of `size` rows in set order, set k of class k % num_classes: (N,), (N,).

    N = 5010, C = 10: p = 90, j = 4509, so exactly N - 1 - j = 500 = 100 whole sets'
    worth of values lie above t_hi and 500 below t_lo (for distinct values).
    """
    set_ids = np.repeat(np.arange(num_sets), size)
    return set_ids, set_ids % num_classes


def test_constant_sets_score_1_over_g_and_far_above_independent_images():
    rng = np.random.default_rng(0)
    size, d = 5, 64
    set_ids, class_ids = _set_design(size=size)
    n, num_sets, num_classes = len(set_ids), set_ids.max() + 1, 10
    p, j = (1 - 1 / num_classes) * 100, n * (num_classes - 1) // num_classes
    assert (n - 1 - j) % size == 0  # the thresholds fall between whole sets

    # Constant sets: per neuron, set values a permutation of 0..num_sets-1, noise
    # within +-0.25 (gaps between sets are 1, so no two sets interleave), float64 so
    # that no two values tie (float32 ones do, now and then, and move G). The 500
    # values above t_hi are then exactly the 100 top sets (u = s, f / s = 1) and the
    # 500 below t_lo the 100 bottom sets (l = s); every other set has f = 0. So L = 1
    # wherever a class has a firing set, G = (N - j) / N (distinct values), and the
    # score is (100 - p) * N / (N - j) for every K. (A class lacks a firing set for a
    # neuron with probability ~ 0.8^100 ~ 2e-10: none do.)
    levels = np.argsort(rng.random((num_sets, d)), axis=0)
    const = levels[set_ids] + rng.uniform(-0.25, 0.25, (n, d))
    constant = invariance_scores(const, set_ids, class_ids, top_k=(10, d))
    expected_constant = (100 - p) * n / (n - j)
    for k in (10, d):
        assert constant[k] == pytest.approx(expected_constant, rel=1e-12)

    # Independent images: float64 normals (distinct). Sets are then a uniformly
    # random partition, so a set's counts (u, l, rest) are multivariate
    # hypergeometric: of N, a = N - 1 - j above t_hi, a below t_lo, N - 2a between.
    a = n - 1 - j
    pmf = {}
    for u in range(size + 1):
        for l_ in range(size + 1 - u):
            pmf[u, l_] = (math.comb(a, u) * math.comb(a, l_) * math.comb(n - 2 * a, size - u - l_)
                          / math.comb(n, size))
    assert sum(pmf.values()) == pytest.approx(1.0, abs=1e-12)
    fire = sum(w for (u, l_), w in pmf.items() if max(u, l_) > 0)
    mean_r = sum(w * max(u, l_) / size for (u, l_), w in pmf.items()) / fire  # E[f/s | f > 0]
    var_r = sum(w * (max(u, l_) / size) ** 2 for (u, l_), w in pmf.items()) / fire - mean_r ** 2
    scale = (100 - p) * n / (n - j)  # (100 - p) / G
    expected_iid = scale * mean_r
    # At K = D the result is the mean of L over all C * D (class, neuron) cells, each
    # the mean of f / s over its ~num_sets / C * fire firing sets, unbiased for
    # E[f/s | f > 0] by exchangeability of the sets. Neurons are independent, so the
    # standard error of the grand mean is sqrt(var_r / (num_sets * fire * D)); 5 of
    # them is a miss once in ~2 million seeds.
    se = scale * math.sqrt(var_r / (num_sets * fire * d))
    iid = invariance_scores(rng.normal(size=(n, d)), set_ids, class_ids, top_k=(10, d))
    assert abs(iid[d] - expected_iid) < 5 * se
    # Far above: constant sets over independent images is 1 / E[f/s | f > 0] (~ 4 here).
    assert constant[d] / iid[d] == pytest.approx(1 / mean_r, rel=5 * se / expected_iid)
    # A class's top 10 of D cells average at least its mean and at most its largest
    # cell; a cell's standard error is se * sqrt(C * D), and the largest of C * D
    # near-normal cells exceeds the mean by 5 of them with probability < 640 * 3e-7.
    cell_se = se * math.sqrt(num_classes * d)
    assert iid[d] <= iid[10] < expected_iid + 5 * cell_se < expected_constant


# ------------------------------------------------------------- row order, definition

def _reference(x, set_ids, class_ids, top_k):
    """The definition, one set and one neuron at a time."""
    n, d = x.shape
    num_classes = len(set(class_ids.tolist()))
    p = min((1 - 1 / num_classes) * 100, 95)
    j = n * (num_classes - 1) // num_classes if num_classes < 20 else n * 95 // 100
    hi = np.sort(x, axis=0)[j]
    lo = np.sort(x, axis=0)[::-1][j]
    g = (x >= hi).mean(axis=0)
    local, count = {}, {}
    for s in sorted(set(set_ids.tolist())):
        rows = [i for i in range(n) if set_ids[i] == s]
        if len(rows) < 3:
            continue
        cls = class_ids[rows[0]]
        local.setdefault(cls, np.zeros(d))
        count.setdefault(cls, np.zeros(d))
        for k in range(d):
            f = max(sum(x[i, k] > hi[k] for i in rows), sum(x[i, k] < lo[k] for i in rows))
            if f > 0:
                local[cls][k] += f / len(rows)
                count[cls][k] += 1
    out = {}
    for k in top_k:
        per_class = []
        for cls in sorted(set(class_ids.tolist())):  # every class; one without sets: 0
            if cls not in local:
                per_class.append(0.0)
                continue
            rate = [local[cls][m] / count[cls][m] if count[cls][m] else 0.0 for m in range(d)]
            score = sorted((rate[m] / g[m] for m in range(d)), reverse=True)
            per_class.append(np.mean(score[:min(k, d)]))
        out[k] = np.mean(per_class) * (100 - p)
    return out


def _random_case(seed, n=150, d=7, num_classes=4, mixed=False):
    """Features with many ties (integer columns) and continuous ones, sets of 1-6
    rows each of one class (mixed: each row its own random class), rows shuffled;
    one class appears only in small sets."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, n)
    set_ids = np.repeat(np.arange(n), sizes)[:n]
    set_class = rng.integers(0, num_classes - 1, n)
    set_class[sizes < 3] = rng.integers(0, num_classes, int((sizes < 3).sum()))
    class_ids = rng.integers(0, num_classes, n) if mixed else set_class[set_ids]
    x = np.concatenate([rng.integers(0, 5, (n, d // 2)).astype(np.float32),
                        rng.normal(size=(n, d - d // 2)).astype(np.float32)], axis=1)
    perm = rng.permutation(n)
    return x[perm], set_ids[perm] * 3 + 11, class_ids[perm]


@pytest.mark.parametrize("seed, mixed, num_classes, n", [
    (0, False, 4, 150), (1, False, 4, 150), (2, False, 4, 150), (3, True, 4, 150),
    (4, True, 4, 150), (5, False, 2, 151), (6, True, 3, 149)])
def test_matches_the_definition_looped(seed, mixed, num_classes, n):
    # mixed: a set's class is its first row's, in the given order. C = 2 with N odd
    # puts both thresholds at one rank: j = N - 1 - j = 75.
    x, set_ids, class_ids = _random_case(seed, n=n, num_classes=num_classes, mixed=mixed)
    top_k = (1, 3, 10)
    got, want = invariance_scores(x, set_ids, class_ids, top_k=top_k), _reference(
        x, set_ids, class_ids, top_k)
    np.testing.assert_allclose([got[k] for k in top_k], [want[k] for k in top_k], rtol=1e-12)


def test_row_order_does_not_matter():
    x, set_ids, class_ids = _random_case(5, n=400, d=9)
    base = invariance_scores(x, set_ids, class_ids, top_k=(2, 5, 9))
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(len(x))
        assert invariance_scores(x[perm], set_ids[perm], class_ids[perm], top_k=(2, 5, 9)) == base


def test_a_mixed_class_set_takes_its_first_rows_class():
    # Set 7's first row says class 1, the rest class 0: scored as if all were class 1.
    classes = HAND_CLASSES.copy()
    classes[0] = 1
    as_first = invariance_scores(HAND_X, HAND_SETS, classes, top_k=(1, 3))
    relabelled = HAND_CLASSES.copy()
    relabelled[:4] = 1  # C stays 2: class 0 is still given to no set, but present
    relabelled[9] = 0  # in a skipped set's second row
    assert invariance_scores(HAND_X, HAND_SETS, relabelled, top_k=(1, 3)) == as_first
    assert as_first != invariance_scores(HAND_X, HAND_SETS, HAND_CLASSES, top_k=(1, 3))


# ------------------------------------------------------------- bad input

@pytest.mark.parametrize("change, match", [
    (dict(features=np.where(np.arange(10)[:, None] % 4 == 1, np.nan, HAND_X)),
     r"NaN or inf in 3 of 10 rows"),
    (dict(features=np.where(np.arange(10)[:, None] == 2, np.inf, HAND_X)), r"NaN or inf in 1 "),
    (dict(features=HAND_X[:, 0]), r"must be 2-D .* got shape \(10,\)"),
    (dict(features=HAND_X[None]), r"must be 2-D"),
    (dict(set_ids=HAND_SETS[:9]), r"one entry per image.*set_ids \(9,\)"),
    (dict(class_ids=HAND_CLASSES[1:]), r"one entry per image.*class_ids \(9,\)"),
    (dict(set_ids=np.arange(10) // 2), r"fewer than 3 images \(the largest has 2\).*at least 3"),
    (dict(class_ids=np.zeros(10, int)), r"at least 2 classes"),
    (dict(top_k=()), r"top_k must be a non-empty"),
    (dict(top_k=(10, 0)), r"integers >= 1"),
    (dict(top_k=(2.5,)), r"integers >= 1"),
])
def test_bad_input_is_named(change, match):
    args = dict(features=HAND_X, set_ids=HAND_SETS, class_ids=HAND_CLASSES, top_k=(1,))
    with pytest.raises(ValueError, match=match):
        invariance_scores(**{**args, **change})


def test_huge_finite_float64_values_are_not_mistaken_for_inf():
    # Their row sums overflow to inf: the exact check must not reject them.
    x = HAND_X.astype(np.float64) * 1e306
    assert invariance_scores(x, HAND_SETS, HAND_CLASSES, top_k=(1,))[1] == pytest.approx(68.75)


@pytest.mark.parametrize("num_classes, n", [(12, 36), (17, 153), (25, 300)])
def test_rank_j_is_exact_where_float_rounding_is_not(num_classes, n):
    # N a multiple of C: N * p / 100 is an integer, and the float p of C = 12 and 17
    # rounds below it (j one too small, as in the authors' `int(N * p // 100)`).
    # (36 * 11 / 12 = 33, float 32; 153 * 16 / 17 = 144, float 143.) C = 25 hits the
    # p = 95 cap. Sets of 3 images, set k of class k % C, distinct values.
    set_ids = np.arange(n) // 3
    class_ids = set_ids % num_classes
    x = np.random.default_rng(num_classes).permutation(n * 4).reshape(n, 4).astype(np.float64)
    got = invariance_scores(x, set_ids, class_ids, top_k=(1, 4))
    want = _reference(x, set_ids, class_ids, (1, 4))
    np.testing.assert_allclose([got[1], got[4]], [want[1], want[4]], rtol=1e-12)
