"""Offline evaluators (eval/linear.py, knn.py, mlp.py) on features with known answers."""

import jax
import numpy as np
import pytest

from ssl_jax.eval import knn, linear


def clusters(n, *, seed, num_classes=4, dim=16, spread=0.3):
    """n points around num_classes fixed centres (the same for every seed): (n, dim), (n,)."""
    centres = np.random.default_rng(0).normal(size=(num_classes, dim)) * 3
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    return (centres[y] + spread * rng.normal(size=(n, dim))).astype(np.float32), y


def correlated(n, *, seed):
    """2 classes, x = (s + noise, noise) with s = +-1, noise ~ N(0, 2^2): (n, 2), (n,).

    The class is exactly x0 - x1, but the class means differ only along x0. A
    heavily decayed probe shrinks towards the mean-difference direction, so it
    sees x0 alone (~69% = Phi(1/2)); a lightly decayed one separates perfectly.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    noise = 2.0 * rng.normal(size=n)
    return np.stack([(2 * y - 1) + noise, noise], 1).astype(np.float32), y


def test_separable_clusters_are_classified_perfectly():
    (xtr, ytr), (xte, yte) = clusters(800, seed=1), clusters(400, seed=2)
    lin = linear.train_linear_probe(xtr, ytr, xte, yte, num_classes=4, epochs=10, batch_size=128)
    assert lin["top1"] == 100.0 and lin["top5"] == 100.0 and lin["train_top1"] == 100.0
    kn = knn.knn_classify(xtr, ytr, xte, yte, num_classes=4, k=20)
    assert kn["top1"] == 100.0 and kn["top5"] == 100.0


def test_random_labels_give_chance():
    rng = np.random.default_rng(0)
    xtr, xte = rng.normal(size=(2000, 32)), rng.normal(size=(2000, 32))
    ytr, yte = rng.integers(0, 10, 2000), rng.integers(0, 10, 2000)
    lin = linear.train_linear_probe(xtr, ytr, xte, yte, num_classes=10, epochs=5, batch_size=256)
    kn = knn.knn_classify(xtr, ytr, xte, yte, num_classes=10, k=50)
    # Chance is 10% (top-5: 50%); the standard error at 2000 examples is 0.67% (1.1%), so
    # these bounds are > 5 sigma, and the data are fixed by the seed anyway.
    for r in (lin, kn):
        assert 6.0 < r["top1"] < 14.0 and 44.0 < r["top5"] < 56.0


# Five points on the unit circle; the query (1, 0) has similarity 1, 0.8, 0.8, 0, -1 to them.
TRAIN = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [0.0, 1.0], [-1.0, 0.0]], np.float32)
LABELS = np.array([0, 1, 1, 2, 2])
QUERY, TRUTH = np.array([[1.0, 0.0]], np.float32), np.array([0])


def test_knn_hand_computed_weighted_vote():
    # Votes exp(sim / T), scaled so the nearest neighbour weighs 1: class 0 gets 1,
    # class 1 gets 2 exp(-0.2 / T); k = 3 leaves class 2 out.
    flat = knn.knn_scores_at(TRAIN, LABELS, QUERY, num_classes=3, ks=(3,), temperature=1.0)[3]
    np.testing.assert_allclose(flat[0], [1.0, 2 * np.exp(-0.2), 0.0], rtol=1e-5)
    sharp = knn.knn_scores_at(TRAIN, LABELS, QUERY, num_classes=3, ks=(3,), temperature=0.07)[3]
    np.testing.assert_allclose(sharp[0], [1.0, 2 * np.exp(-0.2 / 0.07), 0.0], rtol=1e-5)
    every = knn.knn_scores_at(TRAIN, LABELS, QUERY, num_classes=3, ks=(5,), temperature=1.0)[5]
    np.testing.assert_allclose(every[0], [1.0, 2 * np.exp(-0.2), np.exp(-1) + np.exp(-2)],
                               rtol=1e-5)
    # T = 1: two near neighbours outvote the nearest (1.64 > 1); T = 0.07: the nearest wins.
    r = knn.knn_classify(TRAIN, LABELS, QUERY, TRUTH, num_classes=3, k=3, temperature=1.0)
    assert r["top1"] == 0.0 and r["top5"] == 100.0
    r = knn.knn_classify(TRAIN, LABELS, QUERY, TRUTH, num_classes=3, k=3, temperature=0.07)
    assert r["top1"] == 100.0 and r["top5"] >= r["top1"]


def test_knn_clips_k_ignores_norms_and_survives_tiny_temperature():
    r = knn.knn_classify(TRAIN * 7, LABELS, QUERY * 0.1, TRUTH, num_classes=3, k=500,
                         temperature=1.0)
    assert r["k"] == 5 and r["top1"] == 0.0  # same vote as k = 5 on the unit-norm points
    # exp(1 / 0.005) overflows float32; the scaled weights do not.
    s = knn.knn_scores_at(TRAIN, LABELS, QUERY, num_classes=3, ks=(5,), temperature=0.005)[5]
    assert np.isfinite(s).all() and s[0].argmax() == 0


def test_knn_matches_numpy_reference_across_padded_batches():
    rng = np.random.default_rng(3)
    xtr, ytr = rng.normal(size=(60, 8)), rng.integers(0, 5, 60)
    xte = rng.normal(size=(23, 8))
    a = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    b = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    sim = b @ a.T
    idx = np.argsort(-sim, axis=1)[:, :7]
    top = np.take_along_axis(sim, idx, 1)
    want = np.zeros((23, 5))
    np.add.at(want, (np.arange(23)[:, None], ytr[idx]), np.exp((top - top[:, :1]) / 0.1))
    for bs in (256, 5):  # one batch; and 5 batches, the last padded from 3 rows to 5
        got = knn.knn_scores_at(xtr, ytr, xte, num_classes=5, ks=(7,), temperature=0.1,
                                batch_size=bs)[7]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # Further k come from the same search and equal a search of their own.
    yte = rng.integers(0, 5, 23)
    many = knn.knn_classify(xtr, ytr, xte, yte, num_classes=5, k=7, also_k=(3, 7, 100),
                            temperature=0.1, batch_size=5)
    assert sorted(many["also"]) == ["k=100", "k=3"] and many["also"]["k=100"]["k"] == 60
    for name, k in (("k=3", 3), ("k=100", 100)):
        alone = knn.knn_classify(xtr, ytr, xte, yte, num_classes=5, k=k, temperature=0.1)
        assert {m: alone[m] for m in ("top1", "top5", "k")} == many["also"][name]
    assert many["top1"] == knn.knn_classify(xtr, ytr, xte, yte, num_classes=5, k=7,
                                            temperature=0.1)["top1"]


def test_standardizer_is_invariant_to_feature_scale():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 6)) * 10.0 ** rng.uniform(-3, 3, 6) + rng.normal(size=6) * 100
    x[:, 2] = 5.0  # a constant feature is switched off, not blown up
    x = x.astype(np.float32)

    def standardized(x):
        mean, inv_std = jax.jit(linear.standardizer)(x)
        return np.asarray((x - mean) * inv_std), np.asarray(inv_std)

    z, inv_std = standardized(x)
    assert inv_std[2] == 0.0 and np.all(z[:, 2] == 0.0)
    alive = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(z[:, alive].mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(z[:, alive].std(0), 1.0, atol=1e-3)
    scale = np.float32(10.0) ** rng.uniform(-2, 2, 6).astype(np.float32)
    np.testing.assert_allclose(standardized(x * scale)[0], z, atol=1e-3)
    # The dead-feature threshold is relative: uniformly tiny features are still features.
    np.testing.assert_allclose(standardized(x * np.float32(1e-7))[0], z, atol=1e-3)
    # Hence the probe too: scaling every feature its own way changes almost nothing.
    (xtr, ytr), (xte, yte) = clusters(600, seed=5, spread=2.0), clusters(600, seed=6, spread=2.0)
    scale = np.float32(10.0) ** rng.uniform(-3, 3, 16).astype(np.float32)
    kw = dict(num_classes=4, epochs=5, batch_size=100)
    a = linear.train_linear_probe(xtr, ytr, xte, yte, **kw)
    b = linear.train_linear_probe(xtr * scale, ytr, xte * scale, yte, **kw)
    assert 60.0 < a["top1"] < 100.0  # overlapping clusters: the comparison means something
    assert abs(a["top1"] - b["top1"]) <= 0.5


def test_weight_decay_sweep_picks_the_held_out_best_without_seeing_test():
    (xtr, ytr), (xte, yte) = correlated(1000, seed=0), correlated(1000, seed=1)
    kw = dict(num_classes=2, epochs=5, batch_size=100)
    s = linear.train_linear_probe(xtr, ytr, xte, yte, weight_decay=[1.0, 1e-4], **kw)
    assert s["weight_decay"] == 1e-4 and set(s["sweep"]) == {1.0, 1e-4}
    assert s["sweep"][1e-4] >= 99.0 and s["sweep"][1.0] <= 80.0
    assert s["top1"] >= 99.0
    # The choice depends on train only: scrambling the test labels changes nothing but the score.
    scrambled = linear.train_linear_probe(xtr, ytr, xte, 1 - yte, weight_decay=[1.0, 1e-4], **kw)
    assert scrambled["sweep"] == s["sweep"] and scrambled["weight_decay"] == 1e-4
    np.testing.assert_array_equal(scrambled["params"]["w"], s["params"]["w"])
    assert scrambled["top1"] <= 1.0


def test_linear_probes_one_per_stage():
    (xtr, ytr), (xte, yte) = clusters(300, seed=7), clusters(300, seed=8)
    noise = np.random.default_rng(9).normal(size=(600, 3)).astype(np.float32)
    out = linear.train_linear_probes({"stage1": noise[:300], "stage4": xtr}, ytr,
                                     {"stage1": noise[300:], "stage4": xte}, yte,
                                     num_classes=4, epochs=3, batch_size=100)
    assert sorted(out) == ["stage1", "stage4"]
    assert out["stage4"]["top1"] == 100.0 and out["stage1"]["top1"] < 40.0
    assert out["stage4"]["params"]["w"].shape == (16, 4)
    assert out["stage1"]["params"]["w"].shape == (3, 4)
    with pytest.raises(ValueError, match=r"stages \['stage4'\] are in only one"):
        linear.train_linear_probes({"stage1": xtr, "stage4": xtr}, ytr, {"stage1": xte}, yte,
                                   num_classes=4)


def _bad_inputs():
    x, y = clusters(20, seed=10)
    nan = x.copy()
    nan[3, 0] = np.nan
    return {  # name: ((train_x, train_y, test_x, test_y, num_classes), message pattern)
        "lengths": ((x, y[:10], x, y, 4), r"N = len\(labels\)"),
        "label too big": ((x, y, x, y, 3), r"labels must lie in \[0, 3\)"),
        "negative label": ((x, y, x, y - 1, 4), r"test labels must lie in \[0, 4\)"),
        "float labels": ((x, y.astype(np.float32), x, y, 4), "labels must be integers"),
        "nan": ((x, y, nan, y, 4), r"test features contain NaN or Inf \(rows \[3\]"),
        "width": ((x, y, x[:, :5], y, 4), "differ in width: 16 vs 5"),
        "empty": ((x[:0], y[:0], x, y, 4), "train split is empty"),
        "not 2-D": ((x[:, 0], y, x, y, 4), r"must be \(N, D\)"),
    }


@pytest.mark.parametrize("case", sorted(_bad_inputs()))
@pytest.mark.parametrize("evaluator", ["linear", "knn", "mlp"])
def test_bad_input_raises_a_clear_error(case, evaluator):
    from ssl_jax.eval import mlp
    (xtr, ytr, xte, yte, num_classes), message = _bad_inputs()[case]
    fn = {"linear": linear.train_linear_probe, "knn": knn.knn_classify,
          "mlp": mlp.train_mlp_probe}[evaluator]
    with pytest.raises(ValueError, match=message):
        fn(xtr, ytr, xte, yte, num_classes=num_classes)


def test_bad_settings_raise():
    x, y = clusters(20, seed=11)
    for wd in ([], -1.0, [1e-4, float("nan")]):
        with pytest.raises(ValueError, match="weight_decay must be >= 0"):
            linear.train_linear_probe(x, y, x, y, num_classes=4, weight_decay=wd)
    with pytest.raises(ValueError, match="k >= 1"):
        knn.knn_classify(x, y, x, y, num_classes=4, k=0)
    with pytest.raises(ValueError, match="temperature > 0"):
        knn.knn_classify(x, y, x, y, num_classes=4, temperature=0.0)


def rings(n, *, seed):
    """2 classes on concentric rings (radius 1 vs 2, noise 0.1) in 2-D: (n, 2), (n,).

    No line separates them (a linear probe is near chance); a small MLP does.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    angle = rng.uniform(0, 2 * np.pi, n)
    r = 1.0 + y + 0.1 * rng.normal(size=n)
    return np.stack([r * np.cos(angle), r * np.sin(angle)], 1).astype(np.float32), y


def test_mlp_probe_separates_what_a_linear_probe_cannot():
    from ssl_jax.eval import mlp
    (xtr, ytr), (xte, yte) = rings(2000, seed=1), rings(1000, seed=2)
    lin = linear.train_linear_probe(xtr, ytr, xte, yte, num_classes=2, epochs=10, batch_size=128)
    nonlin = mlp.train_mlp_probe(xtr, ytr, xte, yte, num_classes=2, epochs=10, batch_size=128)
    assert lin["top1"] < 70.0
    assert nonlin["top1"] > 98.0 and nonlin["train_top1"] > 98.0
    again = mlp.train_mlp_probe(xtr, ytr, xte, yte, num_classes=2, epochs=10, batch_size=128)
    assert again == nonlin  # deterministic given the seed


def test_mlp_probe_bn_uses_running_statistics_at_test():
    from ssl_jax.eval import mlp
    params, stats = mlp.init(jax.random.key(0), 3, 8, 2)
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    _, new = mlp.apply(params, stats, x, train=True)
    h = x @ np.asarray(params["w0"])
    np.testing.assert_allclose(new["mean0"], 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var0"], 0.9 + 0.1 * h.var(0), rtol=1e-5)
    # At test a row's logits do not depend on the other rows of its batch.
    one, _ = mlp.apply(params, new, x[:1], train=False)
    many, _ = mlp.apply(params, new, x, train=False)
    np.testing.assert_allclose(one, many[:1], rtol=1e-5, atol=1e-6)


def test_lowshot_draws_k_per_class_and_improves_with_k():
    from ssl_jax.eval import lowshot
    y = np.repeat(np.arange(4), [10, 3, 10, 10])
    rows = lowshot.sample_per_class(y, 5, 4, seed=0)
    assert np.bincount(y[rows]).tolist() == [5, 3, 5, 5]  # class 1 has only 3
    assert len(set(rows.tolist())) == len(rows)
    np.testing.assert_array_equal(rows, lowshot.sample_per_class(y, 5, 4, seed=0))
    assert not np.array_equal(rows, lowshot.sample_per_class(y, 5, 4, seed=1))

    # Noisy clusters: one example per class is a poor guess of the centre; 32 are not.
    (xtr, ytr), (xte, yte) = clusters(2000, seed=5, spread=4.0), clusters(1000, seed=6, spread=4.0)
    r = lowshot.lowshot(xtr, ytr, xte, yte, num_classes=4, shots=(1, 32), seeds=(0, 1, 2),
                        steps=100)
    assert sorted(r["per_k"]) == [1, 32] and len(r["per_k"][1]["top1"]) == 3
    assert r["per_k"][1]["std"] > 0.0
    assert r["per_k"][32]["mean"] > r["per_k"][1]["mean"] + 5.0
    assert r["top1"] == r["per_k"][32]["mean"]


def test_joint_probes_equal_probes_trained_alone_and_use_the_views():
    (xtr, ytr), (xte, yte) = clusters(400, seed=11, spread=2.0), clusters(400, seed=12, spread=2.0)
    other = np.random.default_rng(13).normal(size=(800, 5)).astype(np.float32) + ytr[:1]
    feats_tr, feats_te = {"a": xtr, "b": other[:400]}, {"a": xte, "b": other[400:]}
    kw = dict(num_classes=4, epochs=4, batch_size=64, weight_decay=(1e-4, 1e-1))
    joint = linear.train_linear_probes(feats_tr, ytr, feats_te, yte, **kw)
    for k in feats_tr:
        alone = linear.train_linear_probe(feats_tr[k], ytr, feats_te[k], yte, **kw)
        assert joint[k]["weight_decay"] == alone["weight_decay"] and joint[k]["sweep"] == alone["sweep"]
        np.testing.assert_allclose(joint[k]["params"]["w"], alone["params"]["w"], atol=1e-5)
        assert joint[k]["top1"] == alone["top1"] and joint[k]["objective"] > 0
    assert 60.0 < joint["a"]["top1"] < 100.0
    # Views identical to the centre view change nothing; label-free noise views
    # leave nothing to learn (so they are what the probe fits on).
    kw = dict(num_classes=4, epochs=4, batch_size=64, weight_decay=1e-4)
    base = linear.train_linear_probe(xtr, ytr, xte, yte, **kw)
    same = linear.train_linear_probe(xtr, ytr, xte, yte, train_views=[xtr.copy()] * 2, **kw)
    np.testing.assert_array_equal(same["params"]["w"], base["params"]["w"])
    noise = np.random.default_rng(14).normal(size=xtr.shape).astype(np.float32)
    assert linear.train_linear_probe(xtr, ytr, xte, yte, train_views=[noise], **kw)["top1"] < 45.0
    with pytest.raises(ValueError, match=r"train_views\[0\]\['x'\] must have"):
        linear.train_linear_probe(xtr, ytr, xte, yte, train_views=[xtr[:10]], **kw)
