"""The transformation sets of Purushwalkam & Gupta 2020: ssl_jax/datasets/invariance_sets.py
(the dataset) and ssl_jax/datasets/transforms.py (the frames of one image)."""
from __future__ import annotations

import glob
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from ssl_jax.data import decode, sources
from ssl_jax.datasets import arrays, invariance_sets, prepare, transforms
from ssl_jax.errors import UserError
from tests import imagenet_fixture as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE, SETS = "toy_garments", "toy_garments_invariance"
CLASSES, PER_CLASS = 3, 14  # images per class in the source's test split
SETS_PER_CLASS, SET_SIZE = 2, 4
SPLITS = ("occlusion", "viewpoint", "illumination", "instance")


def garments(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28, 1) uint8 images like Fashion-MNIST's (a bright textured box of random
    size and place on black, never darker than 150), labels (n,) = i % CLASSES."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28, 1), np.uint8)
    for i in range(n):
        h, w = rng.integers(12, 22, 2)
        top, left = rng.integers(1, 28 - h), rng.integers(1, 28 - w)
        images[i, top:top + h, left:left + w] = rng.integers(150, 256, (h, w, 1))
    return images, np.arange(n) % CLASSES


def make_source(data_dir) -> tuple[np.ndarray, np.ndarray]:
    """Writes the source dataset in data_dir -> its test split (images, labels)."""
    test = garments(CLASSES * PER_CLASS, seed=0)
    arrays.build_from_arrays(SOURCE, str(data_dir), {"train": garments(6, seed=1), "test": test},
                             class_names=["top", "trouser", "bag"])
    return test


def sets(data_dir, **options) -> tuple[str, bool]:
    options = {"sets_per_class": SETS_PER_CLASS, "set_size": SET_SIZE, **options}
    return prepare.prepare("invariance_sets", str(data_dir), source=SOURCE, **options)


def read(split: str, data_dir) -> dict:
    """Every record of a split: image (N, 28, 28, 1), label, set_id, frame, strength (N,)."""
    src = sources.open_source(SETS, split, str(data_dir))
    out = {"image": src.image, "label": src.label}
    for feature in ("set_id", "frame", "strength"):
        out[feature] = sources.column(SETS, split, str(data_dir), feature)
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(data_dir, source test images, labels), the sets prepared with the defaults' seed."""
    data_dir = tmp_path_factory.mktemp("inv")
    images, labels = make_source(data_dir)
    path, built = sets(data_dir)
    assert built and path == os.path.join(data_dir, SETS, "1.0.0")
    return data_dir, images, labels


def test_four_splits_of_contiguous_labelled_sets(prepared):
    data_dir, images, labels = prepared
    info = sources.dataset_info(SETS, str(data_dir))
    n = CLASSES * SETS_PER_CLASS * SET_SIZE
    assert info["num_examples"] == dict.fromkeys(SPLITS, n)
    assert info["image_shape"] == (28, 28, 1)
    assert info["class_names"] == ["top", "trouser", "bag"]
    features = tfds.builder(SETS, data_dir=str(data_dir)).info.features
    assert [features[f].np_dtype for f in ("set_id", "frame", "strength")] == [
        np.int64, np.int64, np.float32]
    instance = read("instance", data_dir)
    for split in SPLITS:
        r = read(split, data_dir)
        assert r["image"].shape == (n, 28, 28, 1) and r["image"].dtype == np.uint8
        set_ids = np.repeat(np.arange(CLASSES * SETS_PER_CLASS), SET_SIZE)
        np.testing.assert_array_equal(r["set_id"], set_ids)  # contiguous, in order
        np.testing.assert_array_equal(r["frame"], np.tile(np.arange(SET_SIZE), len(set_ids)
                                                          // SET_SIZE))
        np.testing.assert_array_equal(r["label"], set_ids // SETS_PER_CLASS)  # one class a set
        assert np.all(r["strength"][r["frame"] == 0] == 0)
        # Frame 0 of every split's set k is the same source image, of the set's class.
        np.testing.assert_array_equal(r["image"][r["frame"] == 0],
                                      instance["image"][instance["frame"] == 0])
        for image, label in zip(r["image"][r["frame"] == 0], r["label"][r["frame"] == 0]):
            (match,) = np.flatnonzero((images == image).all(axis=(1, 2, 3)))
            assert labels[match] == label


def test_the_splits_are_the_transforms_of_their_set_seeds(prepared):
    data_dir, _, _ = prepared
    for split in ("occlusion", "viewpoint", "illumination"):
        r = read(split, data_dir)
        for set_id in (0, 5):
            rows = r["set_id"] == set_id
            frames, strengths = invariance_sets.TRANSFORMS[split](
                r["image"][rows][0], np.random.default_rng([0, SPLITS.index(split) + 1, set_id]),
                SET_SIZE)
            np.testing.assert_array_equal(r["image"][rows], frames)
            np.testing.assert_array_equal(r["strength"][rows], strengths)


def test_instance_sets_are_distinct_source_images_of_their_class(prepared):
    data_dir, images, labels = prepared
    r = read("instance", data_dir)
    used = []
    for set_id in range(CLASSES * SETS_PER_CLASS):
        rows = r["set_id"] == set_id
        matches = [np.flatnonzero((images == im).all(axis=(1, 2, 3))) for im in r["image"][rows]]
        assert all(len(m) == 1 for m in matches)  # each a source image, unchanged
        ix = [int(m[0]) for m in matches]
        assert set(labels[ix]) == {set_id // SETS_PER_CLASS}
        used += ix
    assert len(set(used)) == len(used)  # no image in two places, sets disjoint


# ------------------------------------------------------------ the transforms

def test_occlusion_grows_to_60_percent_of_the_object_box():
    images, _ = garments(8, seed=3)
    for seed, image in enumerate(images):
        frames, strengths = transforms.occlusion_frames(image, np.random.default_rng(seed), 8)
        np.testing.assert_array_equal(frames[0], image)
        assert strengths[0] == 0 and np.all(np.diff(strengths) > 0)
        assert abs(strengths[-1] - 0.6) < 0.04, strengths
        top, left, bottom, right = transforms.object_box(image)
        changed = (frames != image).any(axis=-1)
        assert not changed[:, :top].any() and not changed[:, bottom:].any()
        assert not changed[:, :, :left].any() and not changed[:, :, right:].any()
        # The image's pixels are never the fill colour: what changed is what is covered.
        np.testing.assert_allclose(changed[:, top:bottom, left:right].mean(axis=(1, 2)),
                                   strengths, atol=1e-6)
        assert np.all(changed[:-1] <= changed[1:])  # occluders only grow


def test_object_box_is_the_whole_image_when_nothing_is_bright():
    assert transforms.object_box(np.zeros((5, 7, 3), np.uint8)) == (0, 0, 5, 7)


def test_warp_rotates_about_the_centre():
    image = np.random.default_rng(0).integers(0, 256, (6, 6, 1), dtype=np.uint8)
    fill = np.zeros(1, np.uint8)
    same = transforms.warp(image, transforms.homography(6, 6, angle=0, scale=1, tilt=0, axis=0),
                           fill)
    np.testing.assert_array_equal(same, image)
    quarter = transforms.warp(image, transforms.homography(6, 6, angle=90, scale=1, tilt=0,
                                                           axis=1), fill)
    np.testing.assert_allclose(quarter, np.rot90(image, -1), atol=1)  # clockwise on screen


def test_viewpoint_frames_move_further_from_the_image():
    images, _ = garments(16, seed=4)
    diffs = []
    for seed, image in enumerate(images):
        frames, strengths = transforms.viewpoint_frames(image, np.random.default_rng(seed), 6)
        np.testing.assert_array_equal(frames[0], image)
        np.testing.assert_allclose(strengths, np.linspace(0, 1, 6))
        diffs.append(np.abs(frames.astype(float) - image).mean(axis=(1, 2, 3)))
        assert all(diffs[-1][1:] > 0)
        assert np.corrcoef(np.arange(6), diffs[-1])[0, 1] > 0.7
    assert np.all(np.diff(np.mean(diffs, axis=0)) > 0)
    # The background shown is the border value: black here.
    assert np.all(frames[:, 0, 0] == 0) and np.all(frames[:, -1, -1] == 0)


def test_illumination_brightens_one_side_and_darkens_the_other():
    images, _ = garments(6, seed=5)
    grey = np.full((28, 28, 1), 128, np.uint8)
    for seed, image in enumerate(images):
        # The parameters do not depend on the image: a grey image shows the gradient.
        light, _ = transforms.illumination_frames(grey, np.random.default_rng(seed), 5)
        bright = light[-1, ..., 0] > np.median(light[-1])
        dark = light[-1, ..., 0] < np.median(light[-1])
        assert light[-1, ..., 0][bright].mean() > 1.5 * light[-1, ..., 0][dark].mean()
        frames, strengths = transforms.illumination_frames(image, np.random.default_rng(seed), 5)
        np.testing.assert_array_equal(frames[0], image)
        np.testing.assert_allclose(strengths, np.linspace(0, 1, 5))
        on = image[..., 0] > 0

        def gain(frame, side):
            return frame[..., 0][side & on].sum() / image[..., 0][side & on].sum()
        gaps = [gain(f, bright) - gain(f, dark) for f in frames]
        # (Less than the gains' 1.6 apart: the bright side clips at 255.)
        assert gaps[0] == 0 and 0 < gaps[1] < gaps[-1] and gaps[-1] > 0.15, gaps


def test_illumination_shifts_colour_in_rgb():
    grey = np.full((16, 16, 3), 128, np.uint8)
    frames, _ = transforms.illumination_frames(grey, np.random.default_rng(0), 4)
    means = frames.mean(axis=(1, 2))  # (4, 3)
    assert np.ptp(means[0]) == 0 and np.ptp(means[-1] / means[-1].mean()) > 0.05


# ------------------------------------------------------------ determinism

def _shards(path: str) -> dict[str, bytes]:
    return {os.path.basename(f): open(f, "rb").read()
            for f in sorted(glob.glob(os.path.join(path, "*.array_record*")))}


def _command(*args: str) -> subprocess.CompletedProcess:
    """Runs `python -m ssl_jax.prepare --dataset invariance_sets --source SOURCE args`."""
    cmd = [sys.executable, "-m", "ssl_jax.prepare", "--dataset", "invariance_sets",
           "--source", SOURCE, *args]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=300)


def test_the_same_arguments_give_the_same_bytes(prepared, tmp_path):
    data_dir, _, _ = prepared
    first = _shards(os.path.join(data_dir, SETS, "1.0.0"))
    assert len(first) == 4
    make_source(tmp_path / "again")  # in another process (protobuf's map order varies)
    out = _command("--sets_per_class", str(SETS_PER_CLASS), "--set_size", str(SET_SIZE),
                   "--data_dir", str(tmp_path / "again"))
    assert out.returncode == 0, out.stderr
    assert _shards(str(tmp_path / "again" / SETS / "1.0.0")) == first
    make_source(tmp_path / "seed1")
    other = _shards(sets(tmp_path / "seed1", seed=1)[0])
    assert all(other[f] != first[f] for f in first)


def test_a_prepared_dataset_of_other_settings_is_not_taken(prepared):
    data_dir, _, _ = prepared
    assert sets(data_dir)[1] is False  # same settings: already there
    with pytest.raises(UserError, match="seed=0, not .*seed=1 as asked: delete that folder"):
        sets(data_dir, seed=1)


# ------------------------------------------------------------ bad input

def _unlabelled(data_dir) -> None:
    class Unlabelled(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "toy_unlabelled"
        VERSION = tfds.core.Version("1.0.0")
        code_path = epath.Path(__file__)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(8, 8, 1))}), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i in range(3):
                yield i, {"image": arrays.encode_png(np.zeros((8, 8, 1), np.uint8))}
    Unlabelled(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


@pytest.mark.parametrize("options, message", [
    ({"source": "no_such"}, r"--source no_such: .*python -m ssl_jax\.prepare "
                            r"--dataset image_folder .*--name no_such"),
    ({"source": None}, "needs --source"),
    ({"set_size": 2}, "needs at least 3 images a set"),
    ({"sets_per_class": 0}, "--sets_per_class 0 must be at least 1"),
    ({"seed": -1}, "--seed -1 must be at least 0"),
    ({"sets_per_class": 4}, r"Class 'top' has 14 images in toy_garments test; the instance "
                            r"sets need 16 .* Lower --sets_per_class"),
    ({"source_split": "validation"}, r"toy_garments has splits \['test', 'train'\]"),
    ({"source": "toy_unlabelled"}, "has no labels"),
    ({"manual_dir": "/somewhere"}, "--manual_dir .* not invariance_sets"),
])
def test_bad_input_says_what_to_do(prepared, tmp_path, options, message):
    data_dir, _, _ = prepared
    make_source(tmp_path)
    _unlabelled(tmp_path)
    with pytest.raises(UserError, match=message):
        prepare.prepare("invariance_sets", str(tmp_path), **{
            "source": SOURCE, "sets_per_class": SETS_PER_CLASS, "set_size": SET_SIZE, **options})
    assert not os.path.exists(tmp_path / SETS)  # not even an empty folder


def test_options_of_invariance_sets_are_refused_elsewhere(tmp_path):
    with pytest.raises(UserError, match="--seed is for invariance_sets and fashion_mnist_videos, not fashion_mnist"):
        prepare.make_builder("fashion_mnist", str(tmp_path), seed=0)
    with pytest.raises(UserError, match="--source is for invariance_sets, not imagenet2012"):
        prepare.make_builder("imagenet2012", str(tmp_path), source="fashion_mnist")


def test_unlabelled_records_are_refused(tmp_path):
    images, _ = garments(12, seed=0)
    arrays.build_from_arrays(SOURCE, str(tmp_path), {"test": (images, np.full(12, -1))},
                             num_classes=3)
    with pytest.raises(UserError, match="records without a label .* --source_split"):
        sets(tmp_path, sets_per_class=1, set_size=3)


# ------------------------------------------------------------ the command

def test_prepare_command_prints_the_counts_then_does_nothing(tmp_path):
    make_source(tmp_path)
    args = ("--sets_per_class", "1", "--set_size", "3", "--seed", "7", "--data_dir", str(tmp_path))
    out = _command(*args)
    assert out.returncode == 0, out.stderr
    assert (f"Prepared {SETS} in {tmp_path}/{SETS}/1.0.0 in " in out.stdout
            and "occlusion: 9, viewpoint: 9, illumination: 9, instance: 9" in out.stdout)
    again = _command(*args)
    assert again.returncode == 0 and f"{SETS} is already prepared" in again.stdout
    bad = _command("--set_size", "2", "--data_dir", str(tmp_path / "x"))
    assert bad.returncode == 2 and "error: --set_size 2 is too small" in bad.stderr


# ------------------------------------------------------------ a source of varying size

def test_a_varying_size_source_gives_jpeg_sets_of_shorter_side_256(tmp_path):
    fx.make_image_folder(tmp_path / "photos", train_per_class=1, val_per_class=3)
    data_dir = str(tmp_path / "tfds")
    prepare.prepare("image_folder", data_dir, manual_dir=str(tmp_path / "photos"),
                    name="toy_photos")
    prepare.prepare("invariance_sets", data_dir, source="toy_photos", sets_per_class=1,
                    set_size=3)  # from the validation split: 3 images a class
    assert sources.dataset_info("toy_photos_invariance", data_dir)["image_shape"] == (
        None, None, 3)
    source = tfds.data_source("toy_photos", split="validation", data_dir=data_dir,
                              decoders={"image": tfds.decode.SkipDecoding()})
    originals = [invariance_sets.ShorterSide()(r["image"], 3)[0] for r in source]
    for split in SPLITS:
        raw = tfds.data_source("toy_photos_invariance", split=split, data_dir=data_dir,
                               decoders={"image": tfds.decode.SkipDecoding()})
        records = raw.__getitems__(list(range(len(raw))))
        assert len(records) == 9 and [r["set_id"] for r in records] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        for r in records:
            assert r["image"][:3] == b"\xff\xd8\xff"  # JPEG
            w, h = Image.open(io.BytesIO(r["image"])).size
            assert min(w, h) == 256 or max(w, h) == 512
            if r["frame"] == 0:  # the source image, resized (JPEG: nearly)
                image = np.asarray(Image.open(io.BytesIO(r["image"])), float)
                diffs = [np.abs(image - o).mean() for o in originals if o.shape == image.shape]
                assert min(diffs) < 6  # noisy fixture images: JPEG's error is ~3
    src = sources.open_source("toy_photos_invariance", "viewpoint", data_dir,
                              decode=decode.CenterCrop(224))
    assert src.image.shape == (9, 224, 224, 3)
