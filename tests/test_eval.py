"""Offline evaluators (eval/linear.py, knn.py, mlp.py) on features with known answers."""
import os

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
    flat = knn.knn_scores(TRAIN, LABELS, QUERY, num_classes=3, k=3, temperature=1.0)
    np.testing.assert_allclose(flat[0], [1.0, 2 * np.exp(-0.2), 0.0], rtol=1e-5)
    sharp = knn.knn_scores(TRAIN, LABELS, QUERY, num_classes=3, k=3, temperature=0.07)
    np.testing.assert_allclose(sharp[0], [1.0, 2 * np.exp(-0.2 / 0.07), 0.0], rtol=1e-5)
    every = knn.knn_scores(TRAIN, LABELS, QUERY, num_classes=3, k=5, temperature=1.0)
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
    s = knn.knn_scores(TRAIN, LABELS, QUERY, num_classes=3, k=5, temperature=0.005)
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
        got = knn.knn_scores(xtr, ytr, xte, num_classes=5, k=7, temperature=0.1, batch_size=bs)
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


def test_calibrate_bn_measures_running_statistics_on_data():
    from ssl_jax import augment, models, parallel
    from ssl_jax.data.pipeline import ArraySource
    from ssl_jax.eval import features

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
    source = ArraySource(images, np.zeros(64, np.int32))
    enc = models.make_encoder("convnet", widths=(4, 8))
    variables = enc.init(jax.random.key(0), np.zeros((2, 8, 8, 1), np.float32), train=True)
    view = augment.eval_view_config(crop_size=(8, 8), mean=(0.0,), std=(1.0,))
    mesh = parallel.make_mesh()
    with jax.set_mesh(mesh):
        new = features.calibrate_bn(enc, view, variables, source, batch_size=16, mesh=mesh,
                                    num_batches=3)
    # The first BN's input does not depend on any BN: its running mean is the EMA
    # (momentum 0.9, from 0) of the conv outputs' per-batch channel means.
    kernel = np.asarray(variables["params"]["conv1"]["kernel"])
    want = np.zeros(4)
    for i in range(3):
        x = images[16 * i:16 * (i + 1)].astype(np.float32) / 255.0
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        want = 0.9 * want + 0.1 * np.asarray(y).mean((0, 1, 2))
    np.testing.assert_allclose(new["batch_stats"]["bn1"]["mean"], want, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(new["params"]["conv1"]["kernel"], kernel)  # params untouched
    assert not np.allclose(new["batch_stats"]["bn2"]["var"], 1.0)


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


def adaptive_pool_reference(x, size):
    """numpy AdaptiveAvgPool2d: bin i of an axis of length L is
    [floor(i L / size), ceil((i + 1) L / size)). x: (B, H, W, C) -> (B, size, size, C)."""
    def bins(length):
        return [(i * length // size, -(-(i + 1) * length // size)) for i in range(size)]
    out = np.zeros((x.shape[0], size, size, x.shape[3]))
    for i, (h0, h1) in enumerate(bins(x.shape[1])):
        for j, (w0, w1) in enumerate(bins(x.shape[2])):
            out[:, i, j] = x[:, h0:h1, w0:w1].mean((1, 2))
    return out


@pytest.mark.parametrize("h,w,size", [(4, 4, 2), (3, 3, 2), (7, 5, 3), (2, 1, 3), (1, 1, 2)])
def test_adaptive_pool_matches_numpy_reference(h, w, size):
    from ssl_jax.eval import features
    x = np.random.default_rng(h * 10 + w).normal(size=(2, h, w, 5)).astype(np.float32)
    want = adaptive_pool_reference(x, size)
    np.testing.assert_allclose(features.adaptive_avg_pool(x, size), want, rtol=1e-5, atol=1e-6)
    flat = features.pool_stage(x, f"avg{size}x{size}")
    assert flat.shape == (2, size * size * 5)  # grid cells row-major, channels innermost
    np.testing.assert_allclose(flat, want.reshape(2, -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features.pool_stage(x, "global"), x.mean((1, 2)), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(features.pool_stage(x, "avg1x1"), x.mean((1, 2)), rtol=1e-5)


def test_adaptive_pool_bins_overlap_like_torch():
    from ssl_jax.eval import features
    x = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)  # rows 0 1 2 / 3 4 5 / 6 7 8
    got = np.asarray(features.adaptive_avg_pool(x, 2))[0, ..., 0]
    # 3 -> 2: bins {0, 1} and {1, 2} on each axis; the middle pixel is in all four.
    np.testing.assert_allclose(got, [[2.0, 3.0], [5.0, 6.0]])
    for bad in ("max2x2", "avg2x3", "avg0x0", "avg"):
        with pytest.raises(ValueError, match="use 'global' or 'avg"):
            features.pool_stage(x, bad)


def test_features_fn_pools_only_the_requested_stages():
    from ssl_jax import augment, models
    from ssl_jax.eval import features
    enc = models.make_encoder("convnet", widths=(4, 8))
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    # Shapes from init, values from numpy (positive: BN variances): an eager random
    # init takes seconds.
    shapes = jax.eval_shape(lambda: enc.init(jax.random.key(0), np.zeros((1, 8, 8, 1)),
                                             train=False))
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes)
    view = augment.eval_view_config(crop_size=(8, 8), mean=(0.0,), std=(1.0,))
    fns = features.make_features_fn(enc, view), features.make_features_fn(enc, view, "avg2x2",
                                                                           ["block2"])
    glob, grid = jax.jit(lambda v, x: [f(v, x) for f in fns])(variables, images)  # one compile
    assert sorted(glob) == ["block1", "block2"] and sorted(grid) == ["block2"]
    assert glob["block2"].shape == (3, 8) and grid["block2"].shape == (3, 2 * 2 * 8)
    # The grid's cells average to the global mean when they tile the map (4x4 -> 2x2).
    np.testing.assert_allclose(np.asarray(grid["block2"]).reshape(3, 4, 8).mean(1),
                               glob["block2"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pool='max'"):
        features.make_features_fn(enc, view, "max")


def test_feature_cache_round_trip_and_corrupt_files_are_ignored(tmp_path, caplog):
    from ssl_jax.eval import features
    key = dict(weights="abc", step=5, model={"name": "convnet", "widths": (4, 8)},
               view={"crop_size": (28, 28)}, pool="global", stages=["block2"], split="train",
               max_examples=0)
    k = features.cache_key(**key)
    assert k == features.cache_key(**dict(key, model={"name": "convnet", "widths": [4, 8]}))
    for change in (dict(weights="abd"), dict(step=6), dict(pool="avg2x2"), dict(max_examples=9),
                   dict(view={"crop_size": (24, 24)}), dict(stages=["block1", "block2"])):
        assert features.cache_key(**dict(key, **change)) != k, change
    path = features.cache_path(str(tmp_path / "features"), 5, "train[:10%]", k)
    assert os.path.basename(path) == f"step5_train__10___{k}.npz"
    assert features.load_cached(path, ["block2"]) is None  # not there yet

    feats = {"block2": np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)}
    labels = np.arange(6, dtype=np.int32)
    features.save_cached(path, feats, labels)
    assert os.listdir(tmp_path / "features") == [os.path.basename(path)]  # no temporary left
    got, got_labels = features.load_cached(path, ["block2"])
    np.testing.assert_array_equal(got["block2"], feats["block2"])
    np.testing.assert_array_equal(got_labels, labels)
    assert features.load_cached(path, ["block1"]) is None  # a stage it lacks: recompute

    with open(path, "r+b") as f:  # a truncated file, as a full disk might leave
        f.truncate(os.path.getsize(path) // 2)
    with caplog.at_level("WARNING"):
        assert features.load_cached(path, ["block2"]) is None
    assert "Ignoring the feature cache" in caplog.text


def test_eval_view_size_defaults_to_the_training_crop_and_can_differ():
    from configs import simclr
    from ssl_jax.eval import features
    c = simclr.get_config("runlocal")
    assert tuple(features.eval_view_config(c).crop_size) == tuple(c.aug.crop_size) == (28, 28)
    c.eval.crop_size = (32, 32)  # FixRes: evaluate larger than the training crop
    assert tuple(features.eval_view_config(c).crop_size) == (32, 32)


def test_light_augment_crops_and_flips_per_image_key():
    from ssl_jax.eval import features
    images = np.random.default_rng(0).integers(0, 256, (4, 10, 10, 1), dtype=np.uint8)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(np.arange(4))
    same = features.light_augment(keys, images, (1.0, 1.0), (1.0, 1.0), 0.0)
    np.testing.assert_array_equal(same, images)  # whole image, no flip: unchanged
    flipped = features.light_augment(keys, images[..., 0], (1.0, 1.0), (1.0, 1.0), 1.0)
    np.testing.assert_array_equal(flipped, images[:, :, ::-1, 0])  # (B, H, W) kept
    a = features.light_augment(keys, images, (0.35, 1.0))
    assert a.shape == images.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, features.light_augment(keys, images, (0.35, 1.0)))
    assert not np.array_equal(a, images)
    # Image i's view depends on its own key only, not on its neighbours in the batch.
    np.testing.assert_array_equal(features.light_augment(keys[2:], images[2:], (0.35, 1.0)),
                                  a[2:])


def test_extract_views_depend_on_the_image_not_the_batching():
    import functools
    from ssl_jax import augment, models, parallel
    from ssl_jax.data.pipeline import ArraySource
    from ssl_jax.eval import features
    enc = models.make_encoder("convnet", widths=(4, 8))
    shapes = jax.eval_shape(lambda: enc.init(jax.random.key(0), np.zeros((1, 8, 8, 1)),
                                             train=False))
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes)
    src = ArraySource(rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8),
                      np.arange(10, dtype=np.int32) % 3)
    fn = features.make_features_fn(enc, augment.eval_view_config(crop_size=(8, 8), mean=(0.0,),
                                                                 std=(1.0,)))
    mesh = parallel.make_mesh()
    aug = functools.partial(features.light_augment, crop_scale=(0.3, 1.0))
    with jax.set_mesh(mesh):
        run = lambda bs, seed, t=aug: features.extract(fn, variables, src, batch_size=bs,
                                                        mesh=mesh, transform=t, seed=seed)[0]
        a, b, c, centre = run(4, 7), run(8, 7), run(4, 8), run(4, 0, None)
    np.testing.assert_allclose(a["block2"], b["block2"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a["block2"], c["block2"])  # another seed, other views
    assert not np.allclose(a["block2"], centre["block2"])


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


def test_eval_overrides_parse_typed_and_refuse_unknown_or_training_keys():
    from configs import simclr
    from ssl_jax import config as cfg_lib
    from ssl_jax import eval as eval_lib
    argv, over = cfg_lib.split_overrides(["prog", "--config.eval.linear.lr=1", "--workdir", "w",
                                          "--config.eval.knn.also_k", "5"])
    assert argv == ["prog", "--workdir", "w"] and over == {"eval.linear.lr": "1",
                                                           "eval.knn.also_k": "5"}
    c = cfg_lib.apply_overrides(simclr.get_config("runlocal"), over)
    assert c.eval.linear.lr == 1.0 and isinstance(c.eval.linear.lr, float)
    assert c.eval.knn.also_k == (5,)
    with pytest.raises(KeyError, match="Did you mean lr"):
        cfg_lib.apply_overrides(c, {"eval.linear.lre": "1"})
    with pytest.raises(ValueError, match="only eval"):
        cfg_lib.apply_overrides(c, {"model.name": "resnet18"})
    with pytest.raises(ValueError, match="expected a int"):
        cfg_lib.apply_overrides(c, {"eval.linear.epochs": "'many'"})
    # A run stored before a field existed gets its default; stored values win.
    old = c.eval.to_dict()
    del old["linear"]["augment"], old["mlp"]
    old["linear"]["lr"] = 0.05
    filled = eval_lib.with_defaults(old)
    assert filled.linear.augment.views == 0 and filled.mlp.hidden == 200
    assert filled.linear.lr == 0.05 and filled.linear.epochs == 10
    # A sweep where a run stored one number (weight decays before they were swept).
    with c.eval.linear.ignore_type():
        c.eval.linear.weight_decay = 1e-4
    assert cfg_lib.apply_overrides(c, {"eval.linear.weight_decay": "(1e-5,1e-3)"}
                                   ).eval.linear.weight_decay == (1e-5, 1e-3)
