"""The real benchmarks whose sets are box crops: GOT-10k (occlusion) and PASCAL3D+
(instance), on tiny copies of their layouts. ALOI, shared helpers and bad input:
test_invariance_real.py."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ssl_jax.data import sources
from ssl_jax.datasets import invariance_real
from ssl_jax.datasets import invariance_real_layouts as layouts
from ssl_jax.errors import UserError
from tests import invariance_real_fixture as fx
from tests.test_invariance_real import (GOT, PASCAL, build, check_sets, close, prepared,
                                        read)


# ------------------------------------------------------------------ GOT-10k

@pytest.fixture(scope="module")
def got(tmp_path_factory):
    return prepared(tmp_path_factory, GOT, fx.make_got10k)


T1, T3, V1 = "train/GOT-10k_Train_000001", "train/GOT-10k_Train_000003", "val/GOT-10k_Val_000001"


def got_expected(tracks: dict[str, list[int]], classes: list[str]):
    """{track: [frame indices]} -> the sets, strengths, colours."""
    sets = [(classes.index(fx.GOT_TRACKS[t][0]), [f"{t}/{i + 1:08d}.jpg" for i in frames])
            for t, frames in tracks.items()]
    strengths = [[1 - fx.GOT_TRACKS[t][2][i] / 8 for i in frames] for t, frames in tracks.items()]
    colours = [fx.got_colour(t, i) for t, frames in tracks.items() for i in frames]
    return sets, strengths, colours


def test_got10k_sets_span_the_cover_levels_of_a_track(got):
    _, data_dir, builder = got
    info = sources.dataset_info(GOT, str(data_dir))
    classes = ["car", "sea turtle", "zebra"]
    assert info["class_names"] == classes and list(info["num_examples"]) == ["occlusion"]
    r = read(GOT, "occlusion", data_dir)
    # One frame a cover level (the middle one in time), most visible first; train 1's
    # absent frame 8 (cover 0) is left out.
    sets, strengths, colours = got_expected({T1: [2, 3, 5, 6, 7], T3: [0, 1, 2, 3, 4, 5],
                                             V1: [0, 2, 3]}, classes)
    check_sets(r, sets, strengths)
    for colour, want in zip(r["colour"], colours):  # each crop is its frame's box
        assert close(colour, want), (colour, want)
    assert builder.skipped == [
        "occlusion: track train/GOT-10k_Train_000002 (1 cover level(s) among 6 usable frames)",
        "occlusion: track train/GOT-10k_Train_000004 (no cover.label (GOT-10k's test tracks "
        "have none))"]
    assert any("3 of 5 GOT-10k tracks" in line for line in builder.report())


def test_got10k_crops_are_the_box_and_a_tenth_around_it(got):
    _, data_dir, _ = got
    r = read(GOT, "occlusion", data_dir)
    for i, file_name in enumerate(r["file_name"]):
        track, frame = file_name.rsplit("/", 1)
        frame = int(frame[:-4]) - 1
        x, y, w, h = fx.got_box(track, frame)
        width = fx.GOT_TRACKS[track][1][0]
        left, right = x - 0.1 * w, min(width, x + 1.1 * w)  # clipped to the image
        k = 256 / (1.2 * h)
        assert r["size"][i] == (round((right - left) * k), 256), file_name
        image = np.asarray(Image.open(io.BytesIO(r["jpeg"][i])), float)
        rows, columns = (max(1, int(0.04 * n)) for n in image.shape[:2])  # margin: 8%
        assert close(image[:, :columns].mean(axis=(0, 1)), fx.BACKGROUND)  # the context
        assert close(image[:rows].mean(axis=(0, 1)), fx.BACKGROUND)
        right_edge = image[image.shape[0] // 3:-image.shape[0] // 3, -columns:].mean(
            axis=(0, 1))
        clipped = x + w > width  # train 3's frame 4: the box runs to the crop's edge
        assert close(right_edge, fx.got_colour(track, frame) if clipped else fx.BACKGROUND)
        assert clipped == (file_name == f"{T3}/00000005.jpg")


def test_got10k_options_take_tracks_and_levels_evenly(got, tmp_path):
    folder, _, _ = got
    build(GOT, tmp_path, folder, frames_per_set=3, max_tracks=2)
    classes = ["sea turtle", "zebra"]
    assert sources.dataset_info(GOT, str(tmp_path))["class_names"] == classes
    # Levels kept from the most visible to the most occluded.
    sets, strengths, _ = got_expected({T1: [2, 5, 7], T3: [0, 3, 5]}, classes)
    check_sets(read(GOT, "occlusion", tmp_path), sets, strengths)


def test_a_box_without_pixels_in_its_image_is_a_bad_image(tmp_path):
    fx._save(tmp_path / "a.jpg", (20, 10), fx.BACKGROUND)
    with pytest.raises(invariance_real.BadImageError, match=r"no pixels in its box .* 20x10"):
        invariance_real.load_image(str(tmp_path / "a.jpg"), (25.0, 0.0, 40.0, 10.0))
    jpeg = invariance_real.load_image(str(tmp_path / "a.jpg"), (-5.0, 2.0, 10.0, 8.0))
    assert Image.open(io.BytesIO(jpeg)).size == (427, 256)  # (0, 2, 10, 8): 10 x 6


# ------------------------------------------------------------------ PASCAL3D+

@pytest.fixture(scope="module")
def pascal(tmp_path_factory):
    return prepared(tmp_path_factory, PASCAL, fx.make_pascal3d)


def test_pascal3d_sets_are_instances_of_a_class_in_one_pose(pascal):
    _, data_dir, builder = pascal
    info = sources.dataset_info(PASCAL, str(data_dir))
    assert info["class_names"] == fx.PASCAL_CLASSES and list(info["num_examples"]) == [
        "instance"]
    r = read(PASCAL, "instance", data_dir)
    sets = [(fx.PASCAL_CLASSES.index(cls), [f"Images/{cls}_pascal/{image}.jpg"
                                            for image, _ in objects])
            for (cls, _), objects in fx.PASCAL_SETS.items()]
    check_sets(r, sets, [[0.0] * 3] * 3)
    colours = [fx.pascal_colour(image, k) for objects in fx.PASCAL_SETS.values()
               for image, k in objects]
    for colour, want in zip(r["colour"], colours):  # each crop is its object's box
        assert close(colour, want), (colour, want)
    # Bins hold 350 with 10 and 20, the coarse azimuth where there is no continuous one;
    # truncated, occluded, difficult, viewpoint-less and other classes' objects are out.
    assert builder.skipped == ["instance: car azimuth 180 (1 object(s))"]
    assert any(line.startswith("10 of 15 PASCAL3D+ objects") for line in builder.report())


def test_pascal3d_crops_are_the_box_and_a_tenth_around_it(pascal):
    _, data_dir, _ = pascal
    r = read(PASCAL, "instance", data_dir)
    boxes = {(image, k): (obj[1], size) for _, image, size, objects in fx.PASCAL_IMAGES
             for k, obj in enumerate(objects)}
    for i, (image, k) in enumerate(o for objects in fx.PASCAL_SETS.values() for o in objects):
        (x1, y1, x2, y2), (width, height) = boxes[image, k]
        left, top, w, h = x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1  # 1-based, inclusive
        cw = min(width, left + 1.1 * w) - max(0, left - 0.1 * w)  # a tenth around, clipped
        ch = min(height, top + 1.1 * h) - max(0, top - 0.1 * h)
        scale = min(256 / min(cw, ch), 512 / max(cw, ch))
        assert r["size"][i] == (round(cw * scale), round(ch * scale)), image
        pixels = np.asarray(Image.open(io.BytesIO(r["jpeg"][i])), float)
        rows, columns = (max(1, int(0.04 * n)) for n in pixels.shape[:2])  # margin: 8%
        third = (slice(pixels.shape[0] // 3, -pixels.shape[0] // 3),
                 slice(pixels.shape[1] // 3, -pixels.shape[1] // 3))
        for side, strip in enumerate((pixels[third[0], :columns], pixels[third[0], -columns:],
                                      pixels[:rows, third[1]], pixels[-rows:, third[1]])):
            colour = strip.mean(axis=(0, 1))
            assert close(colour, fx.BACKGROUND), (image, k, side, colour)  # the context


def test_pascal3d_annotations_of_one_object_and_of_several_read_alike(tmp_path):
    one = [("car", (1, 2, 3, 4), 30, {})]
    fx.write_annotation(tmp_path / "one.mat", "one.jpg", one)
    fx.write_annotation(tmp_path / "two.mat", "two.jpg", one + [("bus", (5, 6, 7, 8), None, {})])
    name, objects = layouts._pascal_objects(str(tmp_path / "one.mat"))
    assert name == "one.jpg" and len(objects) == 1
    name, objects = layouts._pascal_objects(str(tmp_path / "two.mat"))
    assert name == "two.jpg" and [getattr(o, "class") for o in objects] == ["car", "bus"]
    assert layouts._azimuth(objects[0].viewpoint) == 30.0
    np.testing.assert_array_equal(objects[1].bbox, [5, 6, 7, 8])
    (tmp_path / "bad.mat").write_bytes(b"MATLAB 5.0 MAT-file, damaged")
    with pytest.raises(UserError, match="bad.mat is not a readable PASCAL3D\\+ annotation"):
        layouts._pascal_objects(str(tmp_path / "bad.mat"))
