r"""Real videos for positive pairs from video: a tracking dataset downloaded in GOT-10k's
layout, one record a frame, stored as fashion_mnist_videos (videos.py) stores its
synthetic ones, so video_pairs.py samples both alike.

    python -m ssl_jax.prepare --dataset got10k_videos --manual_dir DIR \
        [--frame_size 256] [--max_tracks N] [--skip_bad_images] [--data_dir D]

DIR is GOT-10k (http://got-10k.aitestbed.com/) unpacked: DIR/train/GOT-10k_Train_000001/
{00000001.jpg, 00000002.jpg, ..., groundtruth.txt, absence.label, meta_info.ini} and
DIR/val/GOT-10k_Val_000001/...; a list.txt in train/ or val/ names its tracks, else
every sub-folder holding a groundtruth.txt is one. groundtruth.txt: "x,y,w,h" a frame
(pixels, top-left origin); absence.label: 0/1 a frame, 1 = the object is out of view;
meta_info.ini: "major_class: ..." among other lines. GOT-10k's test set (a box for
the first frame only) is not read.
TrackingNet fits the same layout: each TRAIN_k/frames/<video>/<i>.jpg becomes
DIR/train/<video>/<i + 1, 8 digits>.jpg and TRAIN_k/anno/<video>.txt (x,y,w,h lines)
its groundtruth.txt; without absence.label every frame counts as present, and without
meta_info.ini the label is "unknown".

Dataset `got10k_videos`, version 1.0.0; splits `train` (DIR/train) and `test`
(DIR/val), each where its folder is there. One record a frame, records grouped by
video and in frame order:
- image: (h, w, 3) uint8, JPEG quality 95 (as the invariance readers store theirs):
  the frame resized (PIL, aspect kept) so that its shorter side is frame_size
  (default 256), never enlarged;
- label: ClassLabel, the track's major_class; names: the sorted major classes of
  every track listed in both splits (--max_tracks or not, so ids stay the same),
  "unknown" for a track without meta_info.ini or without that line;
- video_id: int64, 0.. within a split, the tracks written, in sorted folder order;
- frame_index: int64, 0 .. length-1 over the frames kept (below);
- box: (4,) float32, (top, left, bottom, right) in pixels of the stored frame,
  bottom/right exclusive: (y, x, y + h, x + w) scaled, clipped to the frame.
Frames that absence.label marks absent, and frames whose box has no area inside the
frame, are left out and the others renumbered consecutively: frame_index counts kept
frames, so the sampler's Δt (video_pairs.pairs' gap) counts kept frames too, and a
gap across a dropped frame spans more time. A track with fewer than 2 kept frames
makes no pair: it is skipped and counted. --max_tracks N reads the first N tracks
of each split (sorted), to try it on a part. An unreadable frame stops preparation
with its name, or with --skip_bad_images is left out (counted). report() gives what
was kept and left out. The same arguments give byte-identical records;
ssl_jax.data.video_sampler.video_index("got10k_videos", split) reads a split's VideoIndex.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Iterator
from concurrent import futures

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from ssl_jax.datasets import base, invariance_real
from ssl_jax.datasets.base import BadImageError
from ssl_jax.datasets.invariance_real_layouts import _lines, check_folder
from ssl_jax.errors import UserError

DATASET, DATASET_VERSION = "got10k_videos", "1.0.0"
DEFAULTS = {"frame_size": 256}
SPLITS = {"train": "train", "test": "val"}  # split -> its folder in DIR
MIN_FRAMES = 2  # a positive pair needs two frames of a video
UNKNOWN = "unknown"  # the label of a track without a major_class
HOMEPAGE = "http://got-10k.aitestbed.com/"
LAYOUT = ("DIR/train/GOT-10k_Train_000001/{00000001.jpg, ..., groundtruth.txt, "
          "absence.label, meta_info.ini} and/or DIR/val/GOT-10k_Val_000001/..., "
          "train/list.txt (optional) naming the track folders")
_FRAME = re.compile(r"(\d+)\.jpg", re.IGNORECASE)


@dataclasses.dataclass(frozen=True, eq=False)
class Track:
    """One track's annotations. folder: relative to DIR, '/'-separated; files: its
    frames' file names, frame 1 first; boxes: (n, 4) float64, x, y, w, h a frame in the
    file's pixels; present: (n,) bool, False where absence.label says absent."""
    folder: str
    major_class: str
    files: tuple[str, ...]
    boxes: np.ndarray
    present: np.ndarray


def list_tracks(root: str, folder: str) -> list[str]:
    """The tracks of DIR/folder, relative to DIR, sorted: those its list.txt names, or
    else every sub-folder holding a groundtruth.txt."""
    parent = os.path.join(root, folder)
    listed = _lines(os.path.join(parent, "list.txt"))
    if listed is None:
        names = [d for d in os.listdir(parent)
                 if os.path.isfile(os.path.join(parent, d, "groundtruth.txt"))]
    else:
        names = [n for n in listed if n]
        missing = [n for n in names if not os.path.isfile(os.path.join(parent, n,
                                                                        "groundtruth.txt"))]
        if missing:
            raise UserError(f"{os.path.join(parent, 'list.txt')} names {len(missing)} track(s) "
                            f"without a groundtruth.txt in {parent}, e.g. {missing[0]!r}: "
                            "unpack the missing tracks, or remove list.txt to read the "
                            "folders that are there.")
    if not names:
        raise UserError(f"{parent} holds no tracks (folders with a groundtruth.txt). "
                        f"{DATASET} reads GOT-10k ({HOMEPAGE}) unpacked as {LAYOUT}.")
    return [f"{folder}/{n}" for n in sorted(set(names))]


def major_class(root: str, track: str) -> str:
    """The track's meta_info.ini `major_class`, or UNKNOWN."""
    for line in _lines(os.path.join(root, track, "meta_info.ini")) or []:
        key, _, value = line.partition(":")
        if key.strip() == "major_class" and value.strip():
            return value.strip()
    return UNKNOWN


def _numbers(path: str, lines: list[str], count: int, what: str) -> np.ndarray:
    """(len(lines), count) float64 of a file's lines; a UserError names the file and line."""
    out = np.empty((len(lines), count), np.float64)
    for i, line in enumerate(lines):
        values = [v for v in re.split(r"[,\s]+", line) if v]
        try:
            if len(values) != count:
                raise ValueError
            out[i] = [float(v) for v in values]
        except ValueError:
            raise UserError(f"{path} line {i + 1} is {line!r}, not {what}. Download the "
                            "track again (or fix that line).") from None
    return out


def read_track(root: str, track: str) -> Track:
    """A track's frame files and annotations, checked: one groundtruth.txt line (and one
    absence.label line, where there is that file) a frame, frames numbered 1..n."""
    d = os.path.join(root, track)
    numbered = sorted((int(m[1]), n) for n in os.listdir(d) if (m := _FRAME.fullmatch(n)))
    gt_path, absence_path = os.path.join(d, "groundtruth.txt"), os.path.join(d, "absence.label")
    boxes = _numbers(gt_path, _lines(gt_path), 4, "x,y,w,h (4 numbers)")
    if [k for k, _ in numbered] != list(range(1, len(boxes) + 1)):
        frames = f" ({numbered[0][1]} .. {numbered[-1][1]})" if numbered else ""
        raise UserError(f"{gt_path} has {len(boxes)} lines but {d} holds {len(numbered)} "
                        f"frames{frames}: one line a frame, frames numbered from 1 "
                        "(00000001.jpg). Download the track again.")
    absence = _lines(absence_path)
    present = np.ones(len(boxes), bool)
    if absence is not None:
        flags = _numbers(absence_path, absence, 1, "0 or 1")[:, 0]
        if len(flags) != len(boxes) or not np.isin(flags, (0, 1)).all():
            raise UserError(f"{absence_path} must have one line a frame, 0 or 1, for the "
                            f"{len(boxes)} frames of {gt_path}; it has {len(flags)} lines, of "
                            f"{sorted({int(v) for v in flags})}. Download the track again.")
        present = flags == 0
    return Track(track, major_class(root, track), tuple(n for _, n in numbered), boxes,
                 present)


def load_frame(path: str, frame_size: int) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """A frame file -> (JPEG bytes of it, its shorter side resized to frame_size unless
    already shorter; its (w, h) in the file; its stored (w, h)). Raises BadImageError
    for a missing, empty or undecodable file."""
    im = invariance_real.open_image(path)
    w, h = im.size
    k = min(1.0, frame_size / min(w, h))
    size = (max(1, round(w * k)), max(1, round(h * k)))
    try:
        if im.format == "JPEG" and k < 0.5:  # DCT scaling: decodes less of a large frame
            im.draft("RGB", size)
        im = im.convert("RGB")  # decodes; ImageFile.LOAD_TRUNCATED_IMAGES is False
        if im.size != size:
            im = im.resize(size, Image.BILINEAR)  # as invariance_real resizes its crops
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for corrupt data
        raise BadImageError(f"cannot be decoded ({type(e).__name__}: {e})") from e
    return invariance_real.encode_jpeg(im), (w, h), size


def stored_box(xywh: np.ndarray, size: tuple[int, int], stored: tuple[int, int]
               ) -> np.ndarray | None:
    """A box x, y, w, h (4,) in the pixels of a frame of `size` (w, h) -> (4,) float32
    (top, left, bottom, right) in the frame as stored, of `stored` (w, h), clipped to
    it; None where no area of it is inside the frame (or it is not finite)."""
    x, y, w, h = xywh
    sx, sy = stored[0] / size[0], stored[1] / size[1]
    # Scaled, then clipped to the stored size: float32 then never passes the frame's edge.
    top, bottom = np.clip([y * sy, (y + h) * sy], 0, stored[1])
    left, right = np.clip([x * sx, (x + w) * sx], 0, stored[0])
    if not (bottom > top and right > left):  # False for NaN too
        return None
    return np.array([top, left, bottom, right], np.float32)


class Got10kVideos(base.StreamingBuilder, skip_registration=True):
    """The `got10k_videos` builder (see the module doc)."""

    byte_identical = True  # the same arguments give the same files

    name = DATASET
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Videos of a tracking dataset in GOT-10k's layout."}
    code_path = epath.Path(__file__)  # see fashion_mnist.FashionMnist.code_path

    def __init__(self, *, manual_dir: str | None = None, skip_bad_images: bool = False,
                 frame_size: int | None = None, max_tracks: int | None = None, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        self.frame_size = DEFAULTS["frame_size"] if frame_size is None else frame_size
        invariance_real.check_count("frame_size", self.frame_size, 1)
        invariance_real.check_count("max_tracks", max_tracks, 1)
        self.manual_dir = check_folder(manual_dir, DATASET, LAYOUT)
        self.settings = (f"{self.manual_dir}, frame_size={self.frame_size}, "
                         f"max_tracks={'all' if max_tracks is None else max_tracks}")
        self.skip_bad_images = skip_bad_images
        self.bad_images: list[str] = []  # frames left out as unreadable, with the reason
        self.skipped: list[str] = []  # "split: track ... (why)"
        self.dropped: collections.Counter = collections.Counter()  # why -> frames left out
        self.written: dict[str, list[int]] = {}  # split -> [videos, frames] written
        self.tracks = self._read_tracks(max_tracks)  # every annotation checked before writing
        super().__init__(**kwargs)
        self.refuse_other_settings(self.settings)

    def _read_tracks(self, max_tracks: int | None) -> dict[str, list[Track]]:
        """split -> the tracks to write; sets class_names, the skips and absent counts."""
        root = self.manual_dir
        folders = {s: f for s, f in SPLITS.items() if os.path.isdir(os.path.join(root, f))}
        if not folders:
            raise UserError(f"{root} has neither a train/ nor a val/ folder. {DATASET} "
                            f"reads GOT-10k ({HOMEPAGE}) unpacked as {LAYOUT}.")
        listed = {s: list_tracks(root, f) for s, f in folders.items()}
        self.class_names = sorted({major_class(root, t) for ts in listed.values() for t in ts})
        self.listed = {s: len(ts) for s, ts in listed.items()}
        out = {}
        for split, names in listed.items():
            out[split] = []
            for name in names[:max_tracks]:
                track = read_track(root, name)
                self.dropped["absent (absence.label)"] += int((~track.present).sum())
                if track.present.sum() < MIN_FRAMES:  # known now: no frame need be read
                    self.skipped.append(f"{split}: track {track.folder} ({track.present.sum()}"
                                        f" of {len(track.files)} frames present)")
                else:
                    out[split].append(track)
            if not out[split]:
                raise UserError(f"{split}: none of the {len(names[:max_tracks])} track(s) read "
                                f"in {os.path.join(root, folders[split])} has {MIN_FRAMES} "
                                "frames where the object is present (absence.label).")
        return out

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, homepage=HOMEPAGE,
            description=("Videos of a tracking dataset in GOT-10k's layout, one record a "
                         f"frame. Made by ssl_jax from {self.settings}"),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=list(self.class_names)),
                "video_id": tfds.features.Scalar(np.int64, doc="The video; contiguous."),
                "frame_index": tfds.features.Scalar(
                    np.int64, doc="0.. in time order, over the frames kept."),
                "box": tfds.features.Tensor(
                    shape=(4,), dtype=np.float32,
                    doc="The object's (top, left, bottom, right) in the stored frame."),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True)  # videos stay contiguous, frames in order

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._examples(split, tracks) for split, tracks in self.tracks.items()}

    def _load_track(self, track: Track) -> list:
        """-> [(file name, (JPEG bytes, box or None) or the BadImageError)] of the
        present frames, in order."""
        out = []
        for i in np.flatnonzero(track.present):
            path = os.path.join(self.manual_dir, track.folder, track.files[i])
            try:
                jpeg, size, stored = load_frame(path, self.frame_size)
                out.append((track.files[i], (jpeg, stored_box(track.boxes[i], size, stored))))
            except BadImageError as e:
                out.append((track.files[i], e))
        return out

    def _records(self, split: str, track: Track, loaded: list, video_id: int) -> list:
        kept = []
        for file_name, got in loaded:
            if isinstance(got, BadImageError):
                invariance_real.leave_out(
                    os.path.join(self.manual_dir, track.folder, file_name), got,
                    self.skip_bad_images, self.bad_images, f"{track.folder}/{file_name}",
                    "Replace the file (download the track again)")
                self.dropped["unreadable (--skip_bad_images)"] += 1
            elif got[1] is None:
                self.dropped["with no box inside the frame"] += 1
            else:
                kept.append(got)
        if len(kept) < MIN_FRAMES:
            self.skipped.append(f"{split}: track {track.folder} ({len(kept)} of "
                                f"{len(track.files)} frames kept)")
            return []
        label = self.class_names.index(track.major_class)
        return [{"image": jpeg, "label": label, "video_id": video_id, "frame_index": t,
                 "box": box} for t, (jpeg, box) in enumerate(kept)]

    def _examples(self, split: str, tracks: list[Track]) -> Iterator[dict]:
        """The records of a split, track by track, video ids counted over the tracks
        written. Tracks are decoded on threads (PIL releases the GIL), a bounded window
        ahead, and written in order."""
        workers = min(8, os.cpu_count() or 1)
        written = self.written.setdefault(split, [0, 0])
        with futures.ThreadPoolExecutor(workers) as pool:
            window: collections.deque = collections.deque()
            for i, track in enumerate(tracks):
                window.append((track, pool.submit(self._load_track, track)))
                while window and (len(window) >= 2 * workers or i == len(tracks) - 1):
                    done, loaded = window.popleft()
                    records = self._records(split, done, loaded.result(), written[0])
                    written[0] += bool(records)
                    written[1] += len(records)
                    yield from records

    def report(self) -> list[str]:
        """Lines that prepare prints after the counts: what was kept, what left out."""
        kept = "; ".join(f"{s}: {v} videos, {n} frames of {self.listed[s]} track(s) listed"
                         for s, (v, n) in self.written.items())
        lines = [f"{DATASET}: {kept}; frames resized to a shorter side of at most "
                 f"{self.frame_size}."] if kept else []
        if sum(self.dropped.values()):
            lines.append(f"Left out {sum(self.dropped.values())} frame(s) of the tracks read: "
                         + ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())
                                     if n) + ".")
        return lines + invariance_real.skip_report(
            self.skipped, f"track(s) with fewer than {MIN_FRAMES} frames kept")
