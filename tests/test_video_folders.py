"""got10k_videos (datasets/video_folders.py): real videos in GOT-10k's layout, on a tiny copy
of that layout written at test time: a rectangle moving on a flat background, its colour
naming the frame, groundtruth.txt its box."""
from __future__ import annotations

import glob
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ssl_jax.data import sources, video_sampler
from ssl_jax.datasets import prepare, video_folders
from ssl_jax.errors import UserError
from tests import invariance_real_fixture as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = video_folders.DATASET
BACKGROUND = (30, 60, 90)
SMALL = 120  # the frame_size of the `small` copy: 320x240 -> 160x120, 200x400 -> 120x240
MARGIN = 3  # pixels around a box's edges left unchecked: JPEG (4:2:0) and resizing blur them
TOLERANCE = 30  # a channel's largest error away from the edges (JPEG at quality 90)

# track -> (meta_info.ini's major_class: None no file, "" no such line; frame (w, h);
# frames; absent frames (0-based)).
TRACKS = {
    "train/GOT-10k_Train_000001": ("animal", (320, 240), 7, {3}),
    "train/GOT-10k_Train_000002": ("animal", (320, 240), 3, {0, 2}),  # 1 left: skipped
    "train/GOT-10k_Train_000003": ("vehicle", (200, 400), 6, set()),
    "train/GOT-10k_Train_000004": (None, (320, 240), 5, set()),
    "val/GOT-10k_Val_000001": ("vehicle", (200, 400), 5, set()),
    "val/GOT-10k_Val_000002": ("", (320, 240), 8, set()),
}
OFF_FRAME = ("train/GOT-10k_Train_000003", 5)  # its box is wholly right of the frame
EDGE_FRAME = ("train/GOT-10k_Train_000004", 2)  # its box passes the right edge
CLASSES = ["animal", "unknown", "vehicle"]


def got_box(track: str, i: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the rectangle in frame i (0-based) of a track of frames of `size`
    (w, h), in file pixels."""
    w, h = size
    if (track, i) == OFF_FRAME:
        return (w + 10, 50, 40, 60)
    if (track, i) == EDGE_FRAME:
        return (w - 20, 100, 48, 36)
    return (40 + 12 * i, 30 + 6 * i, 48, 36) if w > h else (30 + 8 * i, 50 + 20 * i, 40, 60)


def colour(i: int) -> tuple[int, int, int]:
    """The rectangle's colour in frame i: green says which frame a record is."""
    return (220, 20 + 20 * i, 160)


def write_track(root, track: str, spec: tuple) -> None:
    """A track folder under root: spec (major_class, size, frames, absent) as in TRACKS."""
    major, size, n, absent = spec
    d = os.path.join(root, track)
    boxes = [got_box(track, i, size) for i in range(n)]
    for i, (x, y, w, h) in enumerate(boxes):
        fx._save(os.path.join(d, f"{i + 1:08d}.jpg"), size, BACKGROUND, (x, y, x + w, y + h),
                 colour(i))
    with open(os.path.join(d, "groundtruth.txt"), "w") as f:
        f.write("".join("{:.4f},{:.4f},{:.4f},{:.4f}\n".format(*b) for b in boxes))
    with open(os.path.join(d, "absence.label"), "w") as f:
        f.write("".join(f"{int(i in absent)}\n" for i in range(n)))
    with open(os.path.join(d, "cover.label"), "w") as f:
        f.write("8\n" * n)
    if major is not None:
        with open(os.path.join(d, "meta_info.ini"), "w") as f:
            f.write("[METAINFO]\nobject_class: thing\nmotion_class: walking\n"
                    + (f"major_class: {major}\n" if major else "") + "resolution: (1, 1)\n")


def make_layout(root) -> None:
    """TRACKS, train/list.txt naming its tracks (out of order) but not a fifth one that is
    there too; val/ without list.txt, with a folder and a file that are no tracks."""
    for track, spec in TRACKS.items():
        write_track(root, track, spec)
    write_track(root, "train/GOT-10k_Train_000009", ("plant", (320, 240), 4, set()))
    with open(os.path.join(root, "train", "list.txt"), "w") as f:
        f.write("".join(t.split("/")[1] + "\n" for t in reversed(list(TRACKS)[:4])))
    os.makedirs(os.path.join(root, "val", "notes"))
    with open(os.path.join(root, "val", "README.txt"), "w") as f:
        f.write("not a track")


def kept_frames(track: str) -> list[int]:
    """The frames of a track that the dataset keeps (present, a box inside the frame)."""
    _, _, n, absent = TRACKS[track]
    return [i for i in range(n) if i not in absent and (track, i) != OFF_FRAME]


def expected_videos(split: str, max_tracks: int | None = None) -> list[str]:
    folder = video_folders.SPLITS[split]
    listed = sorted(t for t in TRACKS if t.startswith(folder + "/"))[:max_tracks]
    return [t for t in listed if len(kept_frames(t)) >= 2]


def build(data_dir, folder, **options):
    """Prepares got10k_videos from folder -> its builder (skips, bad images, report)."""
    builder = prepare.make_builder(DATASET, str(data_dir), manual_dir=str(folder), **options)
    prepare.build(builder)
    return builder


def read(split: str, data_dir) -> dict:
    """A split's records: image a list of (h, w, 3) int arrays, the rest stacked."""
    src = tfds.data_source(DATASET, split=split, data_dir=str(data_dir),
                           decoders={"image": tfds.decode.SkipDecoding()})
    records = src.__getitems__(list(range(len(src))))
    out = {k: np.stack([r[k] for r in records])
           for k in ("label", "video_id", "frame_index", "box")}
    assert all(r["image"][:3] == b"\xff\xd8\xff" for r in records)  # JPEG
    out["image"] = [np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"), int)
                    for r in records]
    return out


def frames_shown(r: dict) -> list[int]:
    """Which frame of its track each record shows: the rectangle's green (colour()) at
    the centre of the record's box."""
    out = []
    for image, (top, left, bottom, right) in zip(r["image"], r["box"]):
        green = image[int((top + bottom) / 2), int((left + right) / 2), 1]
        out.append(int(np.round((green - 20) / 20)))
    return out


def shards(data_dir) -> dict[str, bytes]:
    return {os.path.basename(f): open(f, "rb").read() for f in sorted(
        glob.glob(os.path.join(str(data_dir), DATASET, "1.0.0", "*.array_record*")))}


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    folder = tmp_path_factory.mktemp("got10k")
    make_layout(folder)
    return folder


@pytest.fixture(scope="module")
def small(layout, tmp_path_factory):
    """(data_dir, builder) of the layout prepared with frame_size SMALL."""
    data_dir = tmp_path_factory.mktemp("small")
    return data_dir, build(data_dir, layout, frame_size=SMALL)


@pytest.fixture(scope="module")
def full(layout, tmp_path_factory):
    """(data_dir, builder) of the layout prepared with the default frame_size (256)."""
    data_dir = tmp_path_factory.mktemp("full")
    return data_dir, build(data_dir, layout)


# ---------------------------------------------------------------- the dataset


def test_records_are_the_tracks_present_frames_in_order(small):
    data_dir, _ = small
    info = sources.dataset_info(DATASET, str(data_dir))
    assert info["class_names"] == CLASSES and info["image_shape"] == (None, None, 3)
    assert info["num_examples"] == {
        s: sum(len(kept_frames(t)) for t in expected_videos(s)) for s in ("train", "test")}
    assert info["num_examples"] == {"train": 6 + 5 + 5, "test": 5 + 8}
    features = tfds.builder(DATASET, data_dir=str(data_dir)).info.features
    assert [features[f].np_dtype for f in ("video_id", "frame_index", "box")] == [
        np.int64, np.int64, np.float32]
    for split in ("train", "test"):
        r = read(split, data_dir)
        tracks = expected_videos(split)
        lengths = [len(kept_frames(t)) for t in tracks]
        # Video ids count the tracks written (train 2 is skipped), frames renumbered 0..
        np.testing.assert_array_equal(r["video_id"], np.repeat(np.arange(len(tracks)), lengths))
        np.testing.assert_array_equal(r["frame_index"],
                                      np.concatenate([np.arange(n) for n in lengths]))
        label = [CLASSES.index(TRACKS[t][0] or "unknown") for t in tracks]
        np.testing.assert_array_equal(r["label"], np.repeat(label, lengths))
        assert frames_shown(r) == [i for t in tracks for i in kept_frames(t)]
    assert kept_frames("train/GOT-10k_Train_000001") == [0, 1, 2, 4, 5, 6]  # 3 is absent


def check_boxes(r: dict, tracks: list[str], frame_size: int) -> None:
    """Each record's frame is the file's resized to frame_size (never enlarged); its box
    is the rectangle's, scaled, clipped, and holds the rectangle's pixels and no others."""
    files = [(t, i) for t in tracks for i in kept_frames(t)]
    assert len(files) == len(r["image"])
    for (track, i), image, box in zip(files, r["image"], r["box"]):
        (w, h), (sh, sw) = TRACKS[track][1], image.shape[:2]
        assert min(sh, sw) == min(frame_size, w, h)
        assert abs(sw / sh - w / h) < 0.02  # aspect kept
        x, y, bw, bh = got_box(track, i, (w, h))
        sy, sx = sh / h, sw / w
        want = np.clip([y * sy, x * sx, (y + bh) * sy, (x + bw) * sx], 0, [sh, sw, sh, sw])
        np.testing.assert_allclose(box, want, atol=1e-4, err_msg=f"{track} frame {i}")
        top, left, bottom, right = box
        assert 0 <= top < bottom <= sh and 0 <= left < right <= sw
        yy, xx = np.mgrid[0:sh, 0:sw] + 0.5  # pixel centres
        inside = ((yy > top + MARGIN) & (yy < bottom - MARGIN)
                  & (xx > left + MARGIN) & (xx < right - MARGIN))
        outside = ((yy < top - MARGIN) | (yy > bottom + MARGIN)
                   | (xx < left - MARGIN) | (xx > right + MARGIN))
        assert inside.sum() > 20
        assert np.abs(image[inside] - colour(i)).max() < TOLERANCE, (track, i)
        assert np.abs(image[outside] - BACKGROUND).max() < TOLERANCE, (track, i)


def test_boxes_hold_the_rectangle_in_frames_resized(small):
    data_dir, _ = small
    for split in ("train", "test"):
        check_boxes(read(split, data_dir), expected_videos(split), SMALL)
    edge = read("train", data_dir)["box"][6 + 5 + 2]  # train 4's frame 2
    assert edge[3] == 160  # clipped to the right edge of the 160x120 frame


def test_frames_smaller_than_frame_size_are_kept_as_they_are(full):
    data_dir, _ = full
    for split in ("train", "test"):
        check_boxes(read(split, data_dir), expected_videos(split), 256)


def test_report_counts_what_was_left_out(small):
    _, builder = small
    assert builder.skipped == ["train: track train/GOT-10k_Train_000002 (1 of 3 frames "
                               "present)"]
    assert builder.bad_images == []
    assert builder.report() == [
        "got10k_videos: train: 3 videos, 16 frames of 4 track(s) listed; test: 2 videos, "
        "13 frames of 2 track(s) listed; frames resized to a shorter side of at most 120.",
        "Left out 4 frame(s) of the tracks read: 3 absent (absence.label), 1 with no box "
        "inside the frame.",
        "Skipped 1 track(s) with fewer than 2 frames kept: train: track "
        "train/GOT-10k_Train_000002 (1 of 3 frames present)."]


def test_video_index_reads_the_videos(small):
    data_dir, _ = small
    index = video_sampler.video_index(DATASET, "train", str(data_dir))
    np.testing.assert_array_equal(np.diff(index.starts), [6, 5, 5])
    np.testing.assert_array_equal(index.video_ids, [0, 1, 2])


def test_prepare_command_writes_the_same_bytes_and_prints_the_report(small, layout,
                                                                    tmp_path):
    data_dir, _ = small
    cmd = [sys.executable, "-m", "ssl_jax.prepare", "--dataset", DATASET,
           "--manual_dir", str(layout), "--data_dir", str(tmp_path), "--frame_size", str(SMALL)]
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"Prepared {DATASET} in {tmp_path}/{DATASET}/1.0.0 in " in out.stdout
    assert "(train: 16, test: 13)" in out.stdout
    assert "Skipped 1 track(s) with fewer than 2 frames kept" in out.stdout
    first = shards(data_dir)
    assert len(first) == 2 and shards(tmp_path) == first  # another process: same bytes


def test_max_tracks_reads_the_first_tracks_and_other_settings_are_refused(layout, tmp_path):
    builder = build(tmp_path, layout, frame_size=SMALL, max_tracks=1)
    info = sources.dataset_info(DATASET, str(tmp_path))
    assert info["num_examples"] == {"train": 6, "test": 5}
    assert info["class_names"] == CLASSES  # of every track listed: the same ids as all
    assert builder.skipped == []
    check_boxes(read("train", tmp_path), ["train/GOT-10k_Train_000001"], SMALL)
    assert prepare.prepare(DATASET, str(tmp_path), manual_dir=str(layout), frame_size=SMALL,
                           max_tracks=1)[1] is False
    with pytest.raises(UserError, match=r"made from .*frame_size=120, max_tracks=1, not "
                                        r".*frame_size=120, max_tracks=all as asked"):
        prepare.make_builder(DATASET, str(tmp_path), manual_dir=str(layout), frame_size=SMALL)


# ------------------------------------------------------------------ bad input


def _truncate(path) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])  # the header is whole: it opens, then fails to decode


def test_bad_frames_stop_or_are_left_out_and_counted(tmp_path):
    """A track of 2 frames, one unreadable, then one of 5 frames, one unreadable; no val/."""
    folder = tmp_path / "got"
    write_track(folder, "train/a", ("animal", (200, 400), 2, set()))
    write_track(folder, "train/b", ("animal", (320, 240), 5, set()))
    bad = [folder / "train" / "a" / "00000001.jpg", folder / "train" / "b" / "00000002.jpg"]
    for path in bad:
        _truncate(path)
    with pytest.raises(UserError, match=re.escape(str(bad[0])) + r" cannot be decoded .*"
                                        r"Replace the file .*--skip_bad_images"):
        build(tmp_path / "tfds", folder)
    assert not glob.glob(str(tmp_path / "tfds" / "*" / "1.0.0"))  # nothing looks prepared
    builder = build(tmp_path / "tfds", folder, skip_bad_images=True)
    assert [b.split(" (")[0] for b in builder.bad_images] == ["train/a/00000001.jpg",
                                                              "train/b/00000002.jpg"]
    assert builder.skipped == ["train: track train/a (1 of 2 frames kept)"]
    assert "Left out 2 frame(s) of the tracks read: 2 unreadable (--skip_bad_images)." in (
        builder.report())
    assert list(builder.info.splits) == ["train"]  # no val/: no test split
    r = read("train", tmp_path / "tfds")
    np.testing.assert_array_equal(r["frame_index"], [0, 1, 2, 3])  # renumbered over the gap
    np.testing.assert_array_equal(r["video_id"], [0, 0, 0, 0])  # track a made no video
    assert frames_shown(r) == [0, 2, 3, 4]


def _one_track(folder) -> str:
    """A layout of one train track -> that track's folder."""
    write_track(folder, "train/one", ("animal", (320, 240), 5, set()))
    return os.path.join(folder, "train", "one")


def _edit(name: str, text: str):
    def make(folder):
        with open(os.path.join(_one_track(folder), name), "w") as f:
            f.write(text)
    return make


def _no_frame_present(folder):
    _edit("absence.label", "1\n1\n0\n1\n1\n")(folder)


def _listed_but_missing(folder):
    _one_track(folder)
    with open(os.path.join(folder, "train", "list.txt"), "w") as f:
        f.write("one\ntwo\n")


def _extra_frame(folder):
    d = _one_track(folder)
    os.link(os.path.join(d, "00000005.jpg"), os.path.join(d, "00000006.jpg"))


@pytest.mark.parametrize("make, options, message", [
    (None, {"manual_dir": None}, "got10k_videos needs --manual_dir DIR"),
    ("empty", {}, r"has neither a train/ nor a val/ folder\. got10k_videos reads GOT-10k "
                  r".*DIR/train/GOT-10k_Train_000001/\{00000001\.jpg"),
    ("train", {}, r"/train holds no tracks \(folders with a groundtruth\.txt\)\. "
                  r"got10k_videos reads .*DIR/train/GOT-10k_Train_000001/"),
    (_edit("groundtruth.txt", "1,2,3,4\n" * 4), {},
     r"train/one/groundtruth\.txt has 4 lines but .*train/one holds 5 frames "
     r"\(00000001\.jpg \.\. 00000005\.jpg\): one line a frame"),
    (_extra_frame, {}, r"groundtruth\.txt has 5 lines but .* holds 6 frames"),
    (_edit("groundtruth.txt", "1,2,3,4\na,b,c,d\n1,2,3,4\n1,2,3,4\n1,2,3,4\n"), {},
     r"train/one/groundtruth\.txt line 2 is 'a,b,c,d', not x,y,w,h \(4 numbers\)"),
    (_edit("groundtruth.txt", "1,2,3,4\n1,2,3\n1,2,3,4\n1,2,3,4\n1,2,3,4\n"), {},
     r"groundtruth\.txt line 2 is '1,2,3', not x,y,w,h"),
    (_edit("absence.label", "0\n0\n1\n"), {},
     r"train/one/absence\.label must have one line a frame, 0 or 1, for the 5 frames of "
     r".*groundtruth\.txt; it has 3 lines"),
    (_edit("absence.label", "0\n0\n2\n0\n0\n"), {},
     r"absence\.label must have .*; it has 5 lines, of \[0, 2\]"),
    (_no_frame_present, {}, r"train: none of the 1 track\(s\) read in .*/train has 2 frames "
                            r"where the object is present"),
    (_listed_but_missing, {}, r"train/list\.txt names 1 track\(s\) without a groundtruth\.txt"
                              r" .*'two'"),
    ("empty", {"frame_size": 0}, "--frame_size 0 must be at least 1"),
    ("empty", {"max_tracks": 0}, "--max_tracks 0 must be at least 1"),
])
def test_bad_input_says_what_to_do(tmp_path, make, options, message):
    folder = tmp_path / "download"
    if make == "empty":
        folder.mkdir()
    elif make == "train":
        (folder / "train" / "notes").mkdir(parents=True)
    elif callable(make):
        make(folder)
    options = {"manual_dir": str(folder), **options}
    with pytest.raises(UserError, match=message):
        prepare.prepare(DATASET, str(tmp_path / "tfds"), **options)
    assert not glob.glob(str(tmp_path / "tfds" / "*" / "1.0.0"))  # nothing looks prepared


def test_options_of_other_datasets_are_refused(tmp_path):
    with pytest.raises(UserError, match="--frame_size is for got10k_videos, not aloi"):
        prepare.make_builder("aloi_invariance", str(tmp_path), manual_dir=str(tmp_path),
                             frame_size=64)
    with pytest.raises(UserError, match="--seed is for .*, not got10k_videos"):
        prepare.make_builder(DATASET, str(tmp_path), manual_dir=str(tmp_path), seed=1)
