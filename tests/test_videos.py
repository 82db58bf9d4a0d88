"""fashion_mnist_videos (datasets/videos.py) and the video pair sampler (data/video_pairs.py),
on a small fake Fashion-MNIST of bright blobs."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ssl_jax.data import video_pairs, video_sampler
from ssl_jax.datasets import fashion_mnist, prepare, videos
from ssl_jax.errors import UserError
from tests.conftest import write_idx

PER_CLASS = 3  # train: 30 videos; test: 1 a class, 10 videos


def fake_fashion_mnist(folder) -> str:
    """IDX files of textured ellipses (garments) on black: 4 train and 2 test a class."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    y, x = np.mgrid[0:28, 0:28] + 0.5
    for split, n in (("train", 4), ("test", 2)):
        labels = np.repeat(np.arange(10), n).astype(np.uint8)
        images = np.zeros((len(labels), 28, 28), np.uint8)
        for i in range(len(labels)):
            cy, cx = rng.uniform(11, 17, 2)
            ry, rx = rng.uniform(5, 12, 2)
            inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
            images[i][inside] = rng.integers(100, 256, inside.sum())
        image_file, label_file = fashion_mnist.FILES[split]
        write_idx(folder / image_file, images)
        write_idx(folder / label_file, labels)
    return str(folder)


def make(tmp_path_factory, name: str, **options) -> str:
    data_dir = tmp_path_factory.mktemp(name)
    prepare.prepare("fashion_mnist", str(data_dir), fake_fashion_mnist(data_dir / "idx"))
    prepare.prepare("fashion_mnist_videos", str(data_dir), videos_per_class=PER_CLASS,
                    seed=3, **options)
    return str(data_dir)


def read(data_dir: str, split: str) -> dict:
    """Every record of a split, decoded: image (N, 64, 64, 1) and the other features."""
    src = tfds.data_source(videos.DATASET, split=split, data_dir=data_dir)
    records = src.__getitems__(list(range(len(src))))
    return {k: np.stack([r[k] for r in records]) for k in records[0]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return make(tmp_path_factory, "videos")


# ---------------------------------------------------------------- the generator


def test_prepare_is_deterministic_and_videos_have_the_promised_lengths(data_dir,
                                                                      tmp_path_factory):
    again = make(tmp_path_factory, "again")
    for split, count in (("train", 10 * PER_CLASS), ("test", 10)):
        a, b = read(data_dir, split), read(again, split)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        vid, frame = a["video_id"], a["frame_index"]
        # Grouped by video, in frame order: ids 0.. contiguous, frames 0..T-1.
        lengths = np.bincount(vid)
        assert len(lengths) == count and np.all(np.diff(vid) >= 0)
        assert lengths.min() >= videos.MIN_LENGTH and lengths.max() <= videos.MAX_LENGTH
        np.testing.assert_array_equal(frame, np.concatenate([np.arange(n) for n in lengths]))
        # Class-major, one garment a video.
        np.testing.assert_array_equal(a["label"], vid // (count // 10))
        assert a["image"].shape[1:] == (64, 64, 1)
    lengths = np.bincount(read(data_dir, "train")["video_id"])
    assert len(set(lengths)) > 2  # lengths are drawn, not fixed
    # Another seed, other videos.
    other = tmp_path_factory.mktemp("other")
    prepare.prepare("fashion_mnist", str(other), fake_fashion_mnist(other / "idx"))
    prepare.prepare("fashion_mnist_videos", str(other), videos_per_class=PER_CLASS, seed=4)
    assert not np.array_equal(np.bincount(read(str(other), "test")["video_id"]),
                              np.bincount(read(data_dir, "test")["video_id"]))


def test_boxes_hold_the_garment_and_the_motion_is_smooth(data_dir):
    r = read(data_dir, "train")
    box, image = r["box"], r["image"][..., 0]
    assert box.dtype == np.float32
    assert np.all(box[:, :2] >= 0) and np.all(box[:, 2:] <= 64)
    assert np.all(box[:, 2:] > box[:, :2])
    y, x = np.mgrid[0:64, 0:64]
    inside = ((y >= box[:, 0, None, None]) & (y < box[:, 2, None, None])
              & (x >= box[:, 1, None, None]) & (x < box[:, 3, None, None]))
    bright = image > 40
    share = (bright & inside).sum(axis=(1, 2)) / np.maximum(bright.sum(axis=(1, 2)), 1)
    assert share.min() > 0.9 and share.mean() > 0.98
    # Frames move: consecutive frames differ, and less than a video's first and last.
    steps, spans = [], []
    for v in np.unique(r["video_id"]):
        frames = image[r["video_id"] == v].astype(np.float64)
        d = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2))
        assert d.min() > 0
        steps.append(d.mean())
        spans.append(np.abs(frames[-1] - frames[0]).mean())
    assert np.mean(steps) < 0.6 * np.mean(spans)


def test_occluder_and_illumination_change_appear(data_dir):
    r = read(data_dir, "train")
    occluded = (r["image"] == videos.OCCLUDER_VALUE).sum(axis=(1, 2, 3)) > 5
    assert 0.1 < occluded.mean() < 0.7  # some frames of videos, not all
    rng = np.random.default_rng(1)
    garment = np.full((28, 28, 1), 200, np.uint8)
    frames, boxes = videos.video_frames(garment, rng, length=8)
    assert frames.shape == (8, 64, 64, 1) and boxes.shape == (8, 4)


def test_unprepared_source_and_bad_options_are_named(tmp_path):
    with pytest.raises(UserError, match="--dataset fashion_mnist "):
        prepare.make_builder("fashion_mnist_videos", str(tmp_path))
    with pytest.raises(UserError, match="videos_per_class 0"):
        prepare.make_builder("fashion_mnist_videos", str(tmp_path), videos_per_class=0)
    with pytest.raises(UserError, match="--videos_per_class is for fashion_mnist_videos"):
        prepare.make_builder("fashion_mnist", str(tmp_path), videos_per_class=2)


def test_other_settings_and_too_few_garments_are_named(data_dir, tmp_path_factory):
    with pytest.raises(UserError, match="videos_per_class=3, seed=3, not"):
        prepare.make_builder("fashion_mnist_videos", data_dir, videos_per_class=2, seed=3)
    small = tmp_path_factory.mktemp("small")
    prepare.prepare("fashion_mnist", str(small), fake_fashion_mnist(small / "idx"))
    with pytest.raises(UserError, match="lower --videos_per_class"):
        prepare.prepare("fashion_mnist_videos", str(small), videos_per_class=5)
    assert not videos.FashionMnistVideos(data_dir=str(small), videos_per_class=1).is_prepared()


def test_video_index_of_a_dataset(data_dir, tiny_dataset):
    index = video_sampler.video_index(videos.DATASET, "test", data_dir)
    assert len(index.lengths) == 10
    with pytest.raises(UserError, match="no 'video_id' feature.*fashion_mnist_videos"):
        video_sampler.video_index("tiny_rgb", "train", tiny_dataset[0])


# ------------------------------------------------------------------ the sampler


def shuffled_index(rng, lengths):
    """A VideoIndex of videos of `lengths` whose records are in a random order."""
    vid = np.repeat(np.arange(len(lengths)) * 7 + 3, lengths)
    frame = np.concatenate([np.arange(n) + 2 for n in lengths])
    perm = rng.permutation(len(vid))
    return video_pairs.VideoIndex.from_columns(vid[perm], frame[perm]), vid[perm], frame[perm]


def test_pairs_stay_in_a_video_within_max_gap_both_ways():
    rng = np.random.default_rng(0)
    lengths = [12, 9, 16, 30, 10]
    index, vid, frame = shuffled_index(rng, lengths)
    rows = np.tile(index.pairable(), 40)
    for max_gap in (1, 3, 8):
        query, key, gaps, clamped = video_pairs.pairs(index, rows, max_gap, rng)
        np.testing.assert_array_equal(query, rows)
        np.testing.assert_array_equal(vid[key], vid[query])
        np.testing.assert_array_equal(frame[key] - frame[query], gaps)
        assert np.all((np.abs(gaps) >= 1) & (np.abs(gaps) <= max_gap))
        assert (gaps > 0).any() and (gaps < 0).any()
        assert set(np.abs(gaps)) == set(range(1, max_gap + 1))  # every gap occurs
        assert clamped == 0  # every video has max_gap + 1 frames
    # Uniform among the candidates: a middle frame of the 30-frame video, max_gap 3.
    middle = np.flatnonzero((vid == 3 * 7 + 3) & (frame == 17))
    gaps = video_pairs.pairs(index, np.repeat(middle, 6000), 3, rng)[2]
    counts = np.array([np.sum(gaps == g) for g in (-3, -2, -1, 1, 2, 3)])
    assert np.all(np.abs(counts - 1000) < 150)
    # Deterministic given the Generator's state.
    a = video_pairs.pairs(index, rows, 4, np.random.default_rng(5))
    b = video_pairs.pairs(index, rows, 4, np.random.default_rng(5))
    np.testing.assert_array_equal(a[1], b[1])


def test_short_videos_fall_back_to_their_largest_gap_and_are_counted():
    rng = np.random.default_rng(1)
    index, vid, frame = shuffled_index(rng, [3, 20, 2])
    rows = np.arange(len(vid))
    _, key, gaps, clamped = video_pairs.pairs(index, rows, 5, rng)
    short = np.isin(vid, [3, 2 * 7 + 3])
    assert clamped == short.sum() == 5
    np.testing.assert_array_equal(vid[key], vid)
    assert np.abs(gaps[short]).max() <= 2 and np.all(gaps != 0)


def test_bad_inputs_are_named():
    rng = np.random.default_rng(0)
    index = video_pairs.VideoIndex.from_columns([0, 0, 1, 2, 2], [0, 1, 0, 0, 1], name="vids")
    with pytest.raises(UserError, match="max_gap 0 must be an integer >= 1"):
        video_pairs.pairs(index, [0], 0, rng)
    with pytest.raises(UserError, match=r"record 2 is the only frame of video 1.*pairable"):
        video_pairs.pairs(index, [0, 2], 2, rng)
    np.testing.assert_array_equal(index.pairable(), [0, 1, 3, 4])
    with pytest.raises(UserError, match="video 4 has frame_index 1 twice, at records 1 and 2"):
        video_pairs.VideoIndex.from_columns([4, 4, 4], [0, 1, 1])
    with pytest.raises(UserError, match=r"video 4 has frame_index 0 then 2 \(frames missing"):
        video_pairs.VideoIndex.from_columns([4, 4], [2, 0])
    with pytest.raises(UserError, match="record 1 has box .* outside its 64x64 frame"):
        video_pairs.region_boxes([[0, 0, 10, 10], [60, 10, 70, 20]], (64, 64))
    with pytest.raises(UserError, match="one value per record"):
        video_pairs.VideoIndex.from_columns([0, 1], [0])


def test_region_crops_contain_the_box():
    rng = np.random.default_rng(2)
    top, left = rng.uniform(0, 50, (2, 200))
    h, w = rng.uniform(1, 14, (2, 200))
    box = np.stack([top, left, top + h, left + w], axis=1)
    for r in (None, rng):
        crop = video_pairs.region_boxes(box, (64, 64), context=0.5, rng=r)
        assert np.all(crop[:, :2] <= box[:, :2]) and np.all(crop[:, 2:] >= box[:, 2:])
        assert np.all(crop >= 0) and np.all(crop <= 64)
        assert np.all(crop[:, 2:] - crop[:, :2] >= np.minimum(8, 64) - 1e-4)
    # The crop of the object: a bright square in a frame is the bright part of its crop.
    image = np.zeros((64, 64, 1), np.uint8)
    image[20:30, 40:50] = 255
    c = video_pairs.region_boxes([[20, 40, 30, 50]], (64, 64), context=0.0, min_size=1)[0]
    np.testing.assert_array_equal(c, [20, 40, 30, 50])
    assert video_pairs.crop(image, c, 16).min() == 255
