"""Frozen-feature extraction (eval/features.py): pooling, the features function,
BN calibration, the on-disk cache, the eval view and the probe's augmented views."""
import functools
import os

import jax
import numpy as np
import pytest

from ssl_jax import models, parallel
from ssl_jax.data.sources import ArraySource
from ssl_jax.eval import features
from ssl_jax.views import augment


def tiny_encoder(widths=(4, 8)):
    """A 2-block ConvNet for 8x8x1 images and variables for it: shapes from init,
    values from numpy (positive: BN variances); an eager random init takes seconds."""
    enc = models.make_encoder("convnet", widths=widths)
    shapes = jax.eval_shape(lambda: enc.init(jax.random.key(0), np.zeros((1, 8, 8, 1)),
                                             train=False))
    rng = np.random.default_rng(1)
    return enc, jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes)


def test_calibrate_bn_measures_running_statistics_on_data():

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
    x = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)  # rows 0 1 2 / 3 4 5 / 6 7 8
    got = np.asarray(features.adaptive_avg_pool(x, 2))[0, ..., 0]
    # 3 -> 2: bins {0, 1} and {1, 2} on each axis; the middle pixel is in all four.
    np.testing.assert_allclose(got, [[2.0, 3.0], [5.0, 6.0]])
    for bad in ("max2x2", "avg2x3", "avg0x0", "avg"):
        with pytest.raises(ValueError, match="use 'global' or 'avg"):
            features.pool_stage(x, bad)


def test_features_fn_pools_only_the_requested_stages():
    enc, variables = tiny_encoder()
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
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
    from ssl_jax.config import load_file
    c = load_file("configs/simclr.py:runlocal")
    assert tuple(features.eval_view_config(c).crop_size) == tuple(c.aug.crop_size) == (28, 28)
    c.eval.crop_size = (32, 32)  # FixRes: evaluate larger than the training crop
    assert tuple(features.eval_view_config(c).crop_size) == (32, 32)


def test_light_augment_crops_and_flips_per_image_key():
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


def test_light_augment_of_canvases_crops_inside_each_whole_image():
    """Images of varying size: the probe's crops come from each image's valid region of
    its canvas (the whole decoded image), at the size asked for; never from the padding."""
    from ssl_jax.views.canvas import Canvas

    pixels = np.zeros((6, 40, 40, 1), np.uint8)
    hw = np.array([[40, 40], [10, 30], [30, 10], [7, 7], [40, 12], [25, 40]], np.int32)
    for p, (h, w) in zip(pixels, hw):
        p[:h, :w] = 200
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(np.arange(6))
    for scale in ((0.08, 1.0), (1.0, 1.0)):
        out = np.asarray(features.light_augment(keys, Canvas(pixels, hw), scale, size=(16, 16)))
        assert out.shape == (6, 16, 16, 1)
        np.testing.assert_array_equal(out, 200)  # nothing of the black padding
    # The whole image (scale 1, aspect of the image allowed): a left-right gradient of the
    # valid region comes out as the same gradient, not squeezed into part of the output.
    ramp = np.zeros((1, 40, 40, 1), np.uint8)
    ramp[0, :20, :10, 0] = np.arange(10)[None, :] * 25
    whole = np.asarray(features.light_augment(keys[:1], Canvas(ramp, np.array([[20, 10]])),
                                              (1.0, 1.0), (0.5, 0.5), 0.0, size=(20, 10)))
    np.testing.assert_allclose(whole[0, :, :, 0], ramp[0, :20, :10, 0], atol=1)


def test_extract_views_depend_on_the_image_not_the_batching():
    enc, variables = tiny_encoder()
    rng = np.random.default_rng(1)
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
