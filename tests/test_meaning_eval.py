"""Evaluation, what it means, against answers known beforehand: evaluate() on a
fixed tiny encoder and fixed data extracts the features a NumPy forward pass
gives (eval view, eval-mode BN, global pooling), fits on the train split and
scores the test split (whose labels are built to differ from train's, so a swap
or a train-on-test shows), with pinned results; the linear probe reaches the
optimum of its objective computed independently (SciPy, float64)."""
import glob
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import scipy.optimize

from ssl_jax import evaluation, models
from ssl_jax.datasets import arrays
from ssl_jax.eval import linear
from ssl_jax.views import augment

NUM_CLASSES, MEAN, STD = 4, 0.5, 0.25
# Test image i is a copy of train image i; its label is train's except at rows 1 and 6.
TRAIN_Y = np.array([0, 1, 2, 3] * 3)
TEST_Y = TRAIN_Y[:8].copy()
TEST_Y[1], TEST_Y[6] = (TEST_Y[1] + 1) % 4, (TEST_Y[6] + 2) % 4


def _variables(encoder, rng):
    """Fixed values of every variable of `encoder`: kernels N(0, 1/fan_in), BN scale,
    bias, running mean and variance away from their initial (1, 0, 0, 1)."""
    shapes = jax.eval_shape(lambda: encoder.init(jax.random.key(0), np.zeros((1, 8, 8, 1)),
                                                 train=False))

    def value(path, s):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            return rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape)
        if "scale" in name or "var" in name:
            return rng.uniform(0.5, 1.5, s.shape)
        if "bias" in name:  # mostly negative: sparser ReLU features, less alike
            return rng.uniform(-1.0, 0.0, s.shape)
        return rng.uniform(-0.3, 0.3, s.shape)  # running mean
    return jax.tree_util.tree_map_with_path(lambda p, s: value(p, s).astype(np.float32), shapes)


def _numpy_features(variables, images):
    """The ConvNet (widths (4, 16)) in NumPy, float64: eval view (x / 255 - MEAN) / STD,
    each block conv3x3 (SAME, no bias) -> BN with running statistics -> [2x2 max-pool]
    -> ReLU; the last block globally averaged -> (N, 16)."""
    p, bs = variables["params"], variables["batch_stats"]
    x = (images.astype(np.float64) / 255.0 - MEAN) / STD
    for i, last in ((1, False), (2, True)):
        k = np.asarray(p[f"conv{i}"]["kernel"], np.float64)
        n, h, w, _ = x.shape
        pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x = sum(pad[:, dy:dy + h, dx:dx + w] @ k[dy, dx] for dy in range(3) for dx in range(3))
        bn, st = p[f"bn{i}"], bs[f"bn{i}"]
        x = (x - st["mean"]) / np.sqrt(st["var"] + 1e-5) * bn["scale"] + bn["bias"]
        if not last:
            x = x.reshape(n, h // 2, 2, w // 2, 2, -1).max(axis=(2, 4))
        x = np.maximum(x, 0.0)
    return x.mean(axis=(1, 2))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An export of a fixed ConvNet and a dataset `meaning_copies` (12 train images,
    8 test images that are copies of train's first 8, labels as above)."""
    rng = np.random.default_rng(0)
    # 2x2 blocks of 4x4 pixels at random grey levels: pooled features of pure noise
    # images are all alike (cosine > 0.996 here).
    levels = rng.integers(0, 256, (12, 2, 2, 1), dtype=np.uint8)
    images = np.repeat(np.repeat(levels, 4, axis=1), 4, axis=2)
    data_dir = str(tmp_path_factory.mktemp("data"))
    arrays.build_from_arrays("meaning_copies", data_dir,
                             {"train": (images, TRAIN_Y), "test": (images[:8], TEST_Y)},
                             num_classes=NUM_CLASSES)
    model = {"name": "convnet", "widths": [4, 16], "conv": "xla"}
    encoder = models.make_encoder("convnet", widths=(4, 16), conv="xla")
    variables = _variables(encoder, rng)
    out = tmp_path_factory.mktemp("export")
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(out / "encoder", variables)
    ckpt.wait_until_finished()
    view = augment.eval_view_config(crop_size=(8, 8), mean=(MEAN,), std=(STD,))
    meta = {"format_version": 1, "model": model,
            "preprocessing": {"input_shape": [8, 8, 1], "view": view.to_dict(),
                              "dtype": "uint8"},
            "stages": ["block1", "block2"],
            "source": {"workdir": "", "step": 7, "method": "simclr",
                       "dataset": "meaning_copies"},
            "data": {"dataset": "meaning_copies", "data_dir": data_dir, "train_split": "train",
                     "num_classes": NUM_CLASSES},
            # Batches of 5: both splits end in a padded batch. One neighbour; an
            # unregularised probe long enough to fit 12 points in 16-d.
            "eval": {"test_split": "test", "batch_size": 5, "seed": 0,
                     "knn": {"k": 1, "temperature": 0.07, "also_k": [12]},
                     "linear": {"epochs": 400, "lr": 1.0, "weight_decay": [0.0],
                                "batch_size": 256}}}
    with open(out / "export.json", "w") as f:
        json.dump(meta, f, default=list)
    return str(out), images, variables


def test_evaluate_scores_the_test_split_of_the_fixed_encoders_features(exported, tmp_path):
    out, images, variables = exported
    want = _numpy_features(jax.device_get(variables), images)
    unit = want / np.linalg.norm(want, axis=1, keepdims=True)
    # The premise of "a copy's nearest neighbour is its original": distinct directions
    # (float32 features are exact to ~1e-6; their cosines differ by > 1e-3).
    assert (unit @ unit.T - 2 * np.eye(12)).max() < 0.999

    results = evaluation.evaluate(exported=out, evals=("knn", "linear"), results_dir=str(tmp_path))

    # The features evaluate extracted (and cached), in split order, with their labels.
    for split, rows, labels in (("train", 12, TRAIN_Y), ("test", 8, TEST_Y)):
        (path,) = glob.glob(os.path.join(str(tmp_path), "features", f"step7_{split}_*.npz"))
        with np.load(path) as f:
            np.testing.assert_allclose(f["feat/block2"], want[:rows], rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(f["label"], labels)

    # Pinned: each test image is predicted its original's train label, which is its
    # own test label at 6 of 8 rows: 75%. Scoring the train split would give 100%,
    # and fitting on test and scoring train (a swap) 50% (both tried).
    assert (results["knn"]["train_examples"], results["knn"]["test_examples"]) == (12, 8)
    assert results["knn"]["stage"] == "block2"
    knn, lin = results["knn"]["stages"]["block2"], results["linear"]["stages"]["block2"]
    assert knn["k"] == 1 and knn["top1"] == 75.0 and knn["top5"] == 100.0
    assert results["knn"]["top1"] == results["linear"]["top1"] == 75.0
    assert lin["train_top1"] == 100.0  # the probe fits train: its test predictions are known
    assert lin["top1"] == 75.0 and lin["top5"] == 100.0
    # All 12 neighbours vote: each class's weight, from the NumPy features.
    sim = unit[:8] @ unit.T
    votes = np.zeros((8, NUM_CLASSES))
    np.add.at(votes, (np.arange(8)[:, None], TRAIN_Y[None, :]),
              np.exp((sim - sim.max(1, keepdims=True)) / 0.07))
    ranked = np.sort(votes, 1)
    assert np.all(ranked[:, -1] - ranked[:, -2] > 0.1 * ranked[:, -1])  # no near-ties
    assert 100.0 * np.mean(votes.argmax(1) == TEST_Y) == 62.5  # 5 of 8: pinned
    assert knn["also"]["k=12"]["top1"] == 62.5


def _probe_optimum(x, y, wd, num_classes):
    """min over (W, b) of mean CE(softmax(z W + b), y) + 0.5 wd |W|^2, z the train-
    standardised x (population std), solved in float64 by L-BFGS from scratch."""
    mean, std = x.mean(0), x.std(0)
    z = (x - mean) / std
    d = x.shape[1]

    def f(theta):
        w, b = theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
        logits = z @ w + b
        m = logits.max(1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
        p = np.exp(logits - lse[:, None])
        p[np.arange(len(y)), y] -= 1
        value = np.mean(lse - logits[np.arange(len(y)), y]) + 0.5 * wd * np.sum(w * w)
        grad = np.concatenate([(z.T @ p / len(y) + wd * w).ravel(), p.mean(0)])
        return value, grad
    res = scipy.optimize.minimize(f, np.zeros(d * num_classes + num_classes), jac=True,
                                  method="L-BFGS-B", options=dict(gtol=1e-12, ftol=1e-15,
                                                                  maxiter=10000))
    w, b = res.x[:d * num_classes].reshape(d, num_classes), res.x[d * num_classes:]
    return res.fun, lambda q: (q - mean) / std @ w + b


def test_linear_probe_reaches_the_optimum_of_its_objective():
    # 3 overlapping classes in 2-d, unequal in size (the bias matters), scales unequal
    # (the standardisation matters); the test points are shifted from train's.
    rng = np.random.default_rng(0)
    y = rng.choice(3, size=300, p=[0.5, 0.3, 0.2])
    centres = np.array([[0.0, 0.0], [1.5, 0.5], [0.0, 2.0]])
    x = ((centres[y] + rng.normal(size=(300, 2))) * [10.0, 0.1] + [5.0, -3.0])
    xte = x[:100] + rng.normal(size=(100, 2)) * [5.0, 0.05] + [4.0, 0.0]
    yte = y[:100]
    wd = 0.05
    best, logits_of = _probe_optimum(x, y, wd, 3)
    r = linear.train_linear_probe(x.astype(np.float32), y, xte.astype(np.float32), yte,
                                  num_classes=3, epochs=300, batch_size=300, lr=0.3,
                                  weight_decay=wd)
    assert r["objective"] == pytest.approx(best, rel=1e-3)
    p = r["params"]
    got = ((xte - p["mean"]) * p["inv_std"]) @ p["w"] + p["b"]
    want = logits_of(xte)
    # Logits up to a constant per row (softmax's invariance; the bias is not decayed).
    centre = lambda a: a - a.mean(1, keepdims=True)
    np.testing.assert_allclose(centre(got), centre(want), atol=2e-2)
    # The test accuracy is the optimum's, but for points within the tolerance of a
    # class boundary (either answer is right for those).
    margin = np.sort(want, 1)[:, -1] - np.sort(want, 1)[:, -2]
    sure = margin > 0.05
    right = want.argmax(1) == yte
    assert sure.sum() >= 95
    lo = 100.0 * np.sum(right & sure) / len(yte)
    assert lo - 1e-9 <= r["top1"] <= lo + 100.0 * np.sum(~sure) / len(yte) + 1e-9
