"""The real benchmarks' transformation sets: ssl_jax/datasets/invariance_real.py, on tiny
copies of their layouts (tests/invariance_real_fixture.py): the shared helpers, ALOI
and bad input here; GOT-10k and PASCAL3D+ (box crops) in test_invariance_real_boxes.py."""
from __future__ import annotations

import glob
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ssl_jax.data import decode, sources
from ssl_jax.datasets import invariance_sets, prepare
from ssl_jax.errors import UserError
from tests import invariance_real_fixture as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALOI, GOT, PASCAL = "aloi_invariance", "got10k_occlusion", "pascal3d_instance"
CENTRE = decode.CenterCrop(16, crop_fraction=0.5)  # well inside an object's box
TOLERANCE = 8  # JPEG on solid colours (the fixture's JPEGs, then the dataset's)


def build(dataset: str, data_dir, folder, **options):
    """Prepares dataset from folder -> its builder (skipped sets, bad images, report)."""
    builder = prepare.make_builder(dataset, str(data_dir), manual_dir=str(folder), **options)
    prepare.build(builder)
    return builder


def read(dataset: str, split: str, data_dir) -> dict:
    """A split's records: the centre's mean colour (N, 3), the stored JPEGs' sizes (w, h),
    and the scalar features."""
    data_dir = str(data_dir)
    src = sources.open_source(dataset, split, data_dir, decode=CENTRE)
    raw = tfds.data_source(dataset, split=split, data_dir=data_dir,
                           decoders={"image": tfds.decode.SkipDecoding()})
    jpegs = [r["image"] for r in raw.__getitems__(list(range(len(raw))))]
    out = {"colour": src.image.reshape(len(src), -1, 3).mean(axis=1),
           "size": [Image.open(io.BytesIO(j)).size for j in jpegs], "jpeg": jpegs,
           "label": np.asarray(src.label)}
    for feature in ("set_id", "frame", "strength", "file_name"):
        out[feature] = sources.column(dataset, split, data_dir, feature)
    out["file_name"] = [f.decode() if isinstance(f, bytes) else str(f) for f in out["file_name"]]
    assert all(j[:3] == b"\xff\xd8\xff" for j in jpegs)  # JPEG
    return out


def check_sets(r: dict, sets: list[tuple[int, list[str]]], strengths: list[list[float]]):
    """The records are the expected sets, in order: [(label, [file names])] (and their
    strengths): set ids contiguous from 0, labels constant in a set, frames 0.. in order."""
    sizes = [len(files) for _, files in sets]
    assert min(sizes) >= 3
    np.testing.assert_array_equal(r["set_id"], np.repeat(np.arange(len(sets)), sizes))
    np.testing.assert_array_equal(r["frame"], np.concatenate([np.arange(n) for n in sizes]))
    np.testing.assert_array_equal(r["label"], np.repeat([label for label, _ in sets], sizes))
    assert r["file_name"] == [f for _, files in sets for f in files]
    np.testing.assert_allclose(r["strength"], np.concatenate(strengths), atol=1e-6)


def close(colour, expected) -> bool:
    return bool(np.abs(np.asarray(colour, float) - expected).max() <= TOLERANCE)


def prepared(tmp_path_factory, dataset: str, make) -> tuple:
    """(folder, data_dir, builder): a fixture layout written by make(folder), prepared
    as `dataset` with the defaults."""
    folder = tmp_path_factory.mktemp(dataset + "_layout")
    make(folder)
    data_dir = tmp_path_factory.mktemp(dataset + "_tfds")
    return folder, data_dir, build(dataset, data_dir, folder)


# ------------------------------------------------------------------ ALOI

@pytest.fixture(scope="module")
def aloi(tmp_path_factory):
    return prepared(tmp_path_factory, ALOI, fx.make_aloi)


def aloi_expected(objects, angles, lights, colours):
    """split -> ([(label, files)], [strengths], [[colours]]) of the fixture's sets."""
    label = {obj: i for i, obj in enumerate(fx.ALOI_OBJECTS)}
    view = [o for o in objects if o != 12]  # 12 has two views: skipped
    out = {"viewpoint": ([(label[o], [fx.aloi_file(o, "viewpoint", a) for a in angles])
                          for o in view],
                         [[a / 360 for a in angles] for _ in view],
                         [[fx.aloi_colour(o, "viewpoint", a) for a in angles] for o in view])}
    direction = [(o, c) for o in objects if o != 3 for c in fx.ALOI_CAMERAS]  # 3 has none
    out["illumination_direction"] = (
        [(label[o], [fx.aloi_file(o, "illumination_direction", n, c) for n in lights])
         for o, c in direction], [[0.0] * len(lights) for _ in direction],
        [[fx.aloi_colour(o, "illumination_direction", n, c) for n in lights]
         for o, c in direction])
    out["illumination_colour"] = (
        [(label[o], [fx.aloi_file(o, "illumination_colour", t) for t in colours])
         for o in objects], [[(t - 110) / 140 for t in colours] for _ in objects],
        [[fx.aloi_colour(o, "illumination_colour", t) for t in colours] for o in objects])
    return out


def check_aloi(data_dir, expected):
    for split, (sets, strengths, colours) in expected.items():
        r = read(ALOI, split, data_dir)
        check_sets(r, sets, strengths)
        for colour, want in zip(r["colour"], [c for cs in colours for c in cs]):
            assert close(colour, want), (split, colour, want)


def test_aloi_sets_are_objects_under_one_transformation(aloi):
    folder, data_dir, builder = aloi
    info = sources.dataset_info(ALOI, str(data_dir))
    assert info["num_examples"] == {"viewpoint": 24, "illumination_direction": 24,
                                    "illumination_colour": 20}
    assert info["class_names"] == ["1", "2", "3", "12"]  # the objects, in number order
    assert info["image_shape"] == (None, None, 3)
    features = tfds.builder(ALOI, data_dir=str(data_dir)).info.features
    assert [features[f].np_dtype for f in ("set_id", "frame", "strength")] == [
        np.int64, np.int64, np.float32]
    # Angles in number order (r45 before r135), lights within a camera, T ascending.
    check_aloi(data_dir, aloi_expected(fx.ALOI_OBJECTS, fx.ALOI_ANGLES, fx.ALOI_LIGHTS,
                                       fx.ALOI_COLOURS))
    assert builder.skipped == ["viewpoint: object 12 (2 image(s))"]
    assert builder.bad_images == []
    assert any(line.startswith("Skipped 1 set(s)") for line in builder.report())


def test_aloi_images_are_resized_as_invariance_sets_resizes(aloi):
    folder, data_dir, _ = aloi
    r = read(ALOI, "viewpoint", data_dir)
    for obj, i in ((1, 0), (2, 8), (3, 16)):
        png = open(os.path.join(folder, r["file_name"][i]), "rb").read()
        want, _ = invariance_sets.ShorterSide()(png, 3)
        assert r["size"][i] == (want.shape[1], want.shape[0])  # shorter side 256
        assert min(r["size"][i]) == 256
        got = np.asarray(Image.open(io.BytesIO(r["jpeg"][i])), float)
        assert np.abs(got - want).mean() < 3


def test_aloi_options_keep_the_first_objects_and_even_frames(aloi, tmp_path):
    folder, _, _ = aloi
    builder = build(ALOI, tmp_path, folder, aloi_objects=2, frames_per_set=4)
    assert sources.dataset_info(ALOI, str(tmp_path))["class_names"] == ["1", "2"]
    # Viewpoint: a quarter turn apart; colour: first to last (of 110 120 130 150 250).
    check_aloi(tmp_path, aloi_expected((1, 2), (0, 90, 180, 270), fx.ALOI_LIGHTS,
                                       (110, 120, 150, 250)))
    assert builder.skipped == []


def test_a_prepared_dataset_of_other_settings_is_not_taken(aloi):
    folder, data_dir, _ = aloi
    assert prepare.prepare(ALOI, str(data_dir), manual_dir=str(folder))[1] is False
    with pytest.raises(UserError, match=r"made from .*aloi_objects=all, frames_per_set=all, "
                                        r"not .*aloi_objects=2.* as asked: delete that folder"):
        prepare.prepare(ALOI, str(data_dir), manual_dir=str(folder), aloi_objects=2)


def _corrupt(path, data: bytes = b"\x89PNG\r\n\x1a\nnot really") -> None:
    with open(path, "wb") as f:
        f.write(data)


def test_bad_images_stop_or_are_left_out_and_counted(tmp_path):
    folder = tmp_path / "aloi"
    for obj in (1, 2, 3):  # colour images only: 5 a set
        for t in fx.ALOI_COLOURS:
            fx._save(folder / fx.aloi_file(obj, "illumination_colour", t), (12, 9),
                     fx.aloi_colour(obj, "illumination_colour", t))
    bad = [fx.aloi_file(1, "illumination_colour", 120)] + [
        fx.aloi_file(2, "illumination_colour", t) for t in (110, 130, 150)]
    _corrupt(folder / bad[0])
    _corrupt(folder / bad[1], b"")
    _corrupt(folder / bad[2])
    os.remove(folder / bad[3])
    os.symlink(folder / "gone.png", folder / bad[3])  # listed, but not there
    with pytest.raises(UserError, match=rf"{folder / bad[0]} cannot be decoded .* Replace the "
                                        r"file .*--skip_bad_images"):
        build(ALOI, tmp_path / "tfds", folder)
    assert not os.path.exists(tmp_path / "tfds" / ALOI / "1.0.0")
    builder = build(ALOI, tmp_path / "tfds", folder, skip_bad_images=True)
    assert [b.split(" (")[0] for b in builder.bad_images] == bad
    assert "is empty (0 bytes)" in builder.bad_images[1]
    assert "No such file" in builder.bad_images[3]
    # Object 2 keeps 2 images: skipped; object 3 is set 1; object 1's frames renumbered.
    assert builder.skipped == ["illumination_colour: object 2 (2 readable image(s) of 5)"]
    r = read(ALOI, "illumination_colour", tmp_path / "tfds")
    check_sets(r, [(0, [fx.aloi_file(1, "illumination_colour", t) for t in (110, 130, 150, 250)]),
                   (2, [fx.aloi_file(3, "illumination_colour", t) for t in fx.ALOI_COLOURS])],
               [[0, 20 / 140, 40 / 140, 1], [(t - 110) / 140 for t in fx.ALOI_COLOURS]])


def test_prepare_command_prints_the_counts_and_writes_the_same_bytes(aloi, tmp_path):
    folder, data_dir, _ = aloi
    cmd = [sys.executable, "-m", "ssl_jax.prepare", "--dataset", ALOI,
           "--manual_dir", str(folder), "--data_dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (f"Prepared {ALOI} in {tmp_path}/{ALOI}/1.0.0 in " in out.stdout and
            "(viewpoint: 24, illumination_direction: 24, illumination_colour: 20)" in out.stdout)
    assert "Skipped 1 set(s) without 3 usable images: viewpoint: object 12" in out.stdout

    def shards(d):
        return {os.path.basename(f): open(f, "rb").read()
                for f in sorted(glob.glob(os.path.join(d, ALOI, "1.0.0", "*.array_record*")))}
    first = shards(str(data_dir))
    assert len(first) == 3 and shards(str(tmp_path)) == first  # another process: same bytes


# ------------------------------------------------------------------ bad input

def _few_aloi(folder) -> None:  # two images an object: no set
    for obj in (1, 2):
        for t in (110, 120):
            fx._save(folder / fx.aloi_file(obj, "illumination_colour", t), (8, 6), (9, 9, 9))


def _one_level_got(folder) -> None:
    fx.make_got10k(folder)
    for track in fx.GOT_TRACKS:
        if track != "train/GOT-10k_Train_000002":
            shutil.rmtree(folder / track)


def _lone_pascal(folder) -> None:
    fx.make_pascal3d(folder)
    for mat in glob.glob(str(folder / "Annotations" / "*" / "*.mat")):
        if not mat.endswith("2008_000006.mat"):
            os.remove(mat)


def _twice_aloi(folder) -> None:
    _few_aloi(folder)
    fx._save(folder / "png2" / "1" / "1_i110.png", (16, 12), (9, 9, 9))


@pytest.mark.parametrize("dataset, make, options, message", [
    (ALOI, None, {"manual_dir": None}, "aloi_invariance needs --manual_dir DIR"),
    (GOT, "missing", {}, r"is not a folder\. got10k_occlusion reads DIR/train/GOT-10k_Train"),
    (ALOI, "empty", {}, r"holds no ALOI images\. .*aloi_red4_view\.tar.*DIR/aloi_red4_view/"
                        r"png4/<object>/<object>_r<angle>\.png"),
    (GOT, "empty", {}, r"holds no GOT-10k tracks .*DIR/train/GOT-10k_Train_000001/"),
    (PASCAL, "empty", {}, r"has no Images or Annotations folder\. .*DIR/Images/<class>_pascal/"),
    (ALOI, _few_aloi, {}, r"illumination_colour: no set of at least 3 images"),
    (GOT, _one_level_got, {}, r"occlusion: no set of at least 3 images .*1 cover level"),
    (PASCAL, _lone_pascal, {}, r"instance: no set of at least 3 images .*1 usable objects"),
    (ALOI, _twice_aloi, {}, r"png2/1/1_i110.png and png4/1/1_i110.png .* are the same ALOI "
                            r"image .* keep one"),
    (ALOI, _few_aloi, {"frames_per_set": 2}, "--frames_per_set 2 must be at least 3: the "
                                             "invariance metric needs at least 3 images a set"),
    (ALOI, _few_aloi, {"aloi_objects": 0}, "--aloi_objects 0 must be at least 1"),
    (GOT, "empty", {"max_tracks": 0}, "--max_tracks 0 must be at least 1"),
    (ALOI, "empty", {"max_tracks": 3}, "--max_tracks is for got10k_occlusion and got10k_videos, not aloi"),
    (PASCAL, "empty", {"aloi_objects": 3}, "--aloi_objects is for aloi_invariance, not pascal"),
    ("fashion_mnist", None, {"frames_per_set": 3, "manual_dir": None},
     "--frames_per_set is for aloi_invariance and got10k_occlusion and pascal3d_instance"),
])
def test_bad_input_says_what_to_do(tmp_path, dataset, make, options, message):
    folder = tmp_path / "download"
    if make == "empty":
        folder.mkdir()
    elif callable(make):
        make(folder)
    options = {"manual_dir": str(folder), **options}
    with pytest.raises(UserError, match=message):
        prepare.prepare(dataset, str(tmp_path / "tfds"), **options)
    assert not glob.glob(str(tmp_path / "tfds" / "*" / "1.0.0"))  # nothing looks prepared
