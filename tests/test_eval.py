"""Offline evaluators on features with known answers."""
import numpy as np
import pytest

from ssl_jax.eval import knn, linear


def clusters(n, num_classes=4, dim=16, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 3
    y = rng.integers(0, num_classes, n)
    return (centres[y] + spread * rng.normal(size=(n, dim))).astype(np.float32), y


def test_separable_clusters_are_classified_perfectly():
    xtr, ytr = clusters(800)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    yte = np.random.default_rng(5).integers(0, 4, 400)
    xte = (centres[yte] + 0.3 * np.random.default_rng(6).normal(size=(400, 16))).astype(np.float32)
    lin = linear.train_linear_probe(xtr, ytr, xte, yte, num_classes=4, epochs=10, batch_size=128)
    assert lin["top1"] == 100.0 and lin["top5"] == 100.0
    kn = knn.knn_classify(xtr, ytr, xte, yte, num_classes=4, k=20)
    assert kn["top1"] == 100.0


def test_random_labels_give_chance():
    rng = np.random.default_rng(0)
    xtr, xte = rng.normal(size=(2000, 32)), rng.normal(size=(2000, 32))
    ytr, yte = rng.integers(0, 10, 2000), rng.integers(0, 10, 2000)
    lin = linear.train_linear_probe(xtr, ytr, xte, yte, num_classes=10, epochs=5, batch_size=256)
    kn = knn.knn_classify(xtr, ytr, xte, yte, num_classes=10, k=50)
    # Chance is 10%; the standard error at 2000 examples is 0.67%, so 14% is > 5 sigma.
    assert 6.0 < lin["top1"] < 14.0 and 6.0 < kn["top1"] < 14.0
    assert 44.0 < kn["top5"] < 56.0


def test_knn_hand_computed_weighted_vote():
    # Two neighbours of class 1 at similarity ~0.8 outweigh... one of class 0 at 1.0
    # only when the temperature is large; at a small temperature the closest wins.
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]], np.float32)
    labels = np.array([0, 1, 1, 2])
    query, truth = np.array([[1.0, 0.0]], np.float32), np.array([0])
    # weights: class 0: e^(1/T); class 1: 2 e^(0.8/T).  T=0.07 -> class 0; T=1 -> class 1.
    sharp = knn.knn_scores(train, labels, query, num_classes=3, k=3, temperature=0.07)
    flat = knn.knn_scores(train, labels, query, num_classes=3, k=3, temperature=1.0)
    np.testing.assert_allclose(flat[0], [np.e, 2 * np.exp(0.8), 0.0], rtol=1e-5)
    assert sharp[0].argmax() == 0 and flat[0].argmax() == 1
    assert sharp[0, 2] == 0.0  # k=3 leaves out the farthest point (class 2)
    r = knn.knn_classify(train, labels, query, truth, num_classes=3, k=3, temperature=1.0)
    assert r["top1"] == 0.0 and r["top5"] == 100.0
    # k larger than the bank is clipped, and scaling a feature vector changes nothing (cosine).
    r2 = knn.knn_classify(train * 7, labels, query, truth, num_classes=3, k=500, temperature=0.07)
    assert r2["k"] == 4 and r2["top1"] == 100.0


def test_linear_probe_invariant_to_feature_scale_and_sweeps_weight_decay():
    xtr, ytr = clusters(600, spread=2.0)
    xte, yte = clusters(600, spread=2.0)
    a = linear.train_linear_probe(xtr, ytr, xte, yte, num_classes=4, epochs=5, batch_size=100)
    b = linear.train_linear_probe(xtr * 1e3, ytr, xte * 1e3, yte, num_classes=4, epochs=5,
                                  batch_size=100)
    assert abs(a["top1"] - b["top1"]) <= 0.5
    s = linear.train_linear_probe(xtr, ytr, xte, yte, num_classes=4, epochs=5, batch_size=100,
                                  weight_decay=[1e-4, 10.0])
    assert s["weight_decay"] == 1e-4  # a huge decay cannot win on held-out data
    assert set(s["sweep"]) == {1e-4, 10.0} and s["sweep"][1e-4] > s["sweep"][10.0]


def test_bad_input_errors():
    x, y = clusters(20)
    with pytest.raises(ValueError, match="N = len"):
        linear.train_linear_probe(x, y[:10], x, y, num_classes=4, epochs=1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        knn.knn_classify(x, y, x, y, num_classes=3)
    bad = x.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        knn.knn_classify(x, y, bad, y, num_classes=4)
