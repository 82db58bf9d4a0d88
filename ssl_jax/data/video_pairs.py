"""Positive pairs from video: two frames of one video at most max_gap frames apart.

    index = VideoIndex.from_columns(video_id, frame_index)  # (N,) each, any record order
    query, key, gaps, clamped = pairs(index, rows, max_gap, rng)
    crop = region_boxes(box[query], hw, rng=rng)  # and box[key]: the same object in both

Purushwalkam & Gupta (2020) take a query frame and a key frame of the same video
(Δt apart) as a positive pair, and, in their region variant, crop the same
object in both with a tracker. Here the per-frame boxes stored with the dataset
(ground truth) stand in for the tracker. A real tracker would add: boxes
computed from the frames (no annotation needed, so any video works), drift
(the box slides off the object over long gaps, so crops of far-apart frames
hold less of the same object), lost targets (frames without a box, to be
skipped or re-detected), and a confidence to drop bad pairs by.

Pure NumPy, host side; every draw comes from the numpy Generator passed in
(the same state gives the same pairs). Boxes are (top, left, bottom, right) in
pixels, bottom/right exclusive.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ssl_jax.errors import UserError


@dataclasses.dataclass(frozen=True, eq=False)
class VideoIndex:
    """Which records are which frame of which video.

    order: (N,) int64, the record rows sorted by (video, frame); starts: (V + 1,) int64,
    video v's rows are order[starts[v]:starts[v + 1]]; video_ids: (V,) the ids;
    video_of: (N,) int64, each row's video number v; position: (N,) int64, each row's
    place in its video (its frame_index minus the video's first).
    """
    order: np.ndarray
    starts: np.ndarray
    video_ids: np.ndarray
    video_of: np.ndarray
    position: np.ndarray
    name: str = "the dataset"

    @classmethod
    def from_columns(cls, video_id, frame_index, name: str = "the dataset") -> "VideoIndex":
        """video_id, frame_index: (N,) integers, one per record (row i = record i). Each
        video's frame indices must be consecutive integers without repeats; its records
        may be anywhere in the dataset, in any order."""
        video_id, frame_index = np.asarray(video_id), np.asarray(frame_index)
        if video_id.ndim != 1 or video_id.shape != frame_index.shape:
            raise UserError(f"{name}: video_id {video_id.shape} and frame_index "
                            f"{frame_index.shape} must be one value per record, (N,) each.")
        if not len(video_id):
            raise UserError(f"{name} has no records.")
        for what, v in (("video_id", video_id), ("frame_index", frame_index)):
            if not np.issubdtype(v.dtype, np.integer):
                raise UserError(f"{name}: {what} must be integers, got {v.dtype}.")
        video_id, frame_index = video_id.astype(np.int64), frame_index.astype(np.int64)
        order = np.lexsort((frame_index, video_id))
        vid, frame = video_id[order], frame_index[order]
        new = np.flatnonzero(np.diff(vid)) + 1
        starts = np.concatenate([[0], new, [len(vid)]]).astype(np.int64)
        step = np.diff(frame)
        inside = np.ones(len(vid) - 1, bool)
        inside[new - 1] = False  # steps between two videos do not count
        bad = np.flatnonzero(inside & (step != 1))
        if len(bad):
            j = bad[0]
            what = "twice" if step[j] == 0 else f"then {frame[j + 1]} (frames missing)"
            raise UserError(
                f"{name}: video {vid[j]} has frame_index {frame[j]} {what}, at records "
                f"{order[j]} and {order[j + 1]}; a video's frames must be numbered "
                "consecutively, each once. Re-prepare the dataset, or renumber its frames.")
        video_of = np.empty(len(vid), np.int64)
        video_of[order] = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
        position = np.empty(len(vid), np.int64)
        position[order] = np.arange(len(vid)) - np.repeat(starts[:-1], np.diff(starts))
        return cls(order=order, starts=starts, video_ids=vid[starts[:-1]], video_of=video_of,
                   position=position, name=name)

    @property
    def lengths(self) -> np.ndarray:
        """(V,) int64: frames a video."""
        return np.diff(self.starts)

    def pairable(self) -> np.ndarray:
        """(M,) int64: the rows whose video has at least 2 frames (the possible queries)."""
        return np.flatnonzero(self.lengths[self.video_of] >= 2)


def check_max_gap(max_gap) -> None:
    if int(max_gap) != max_gap or max_gap < 1:
        raise UserError(f"max_gap {max_gap} must be an integer >= 1 (config.video.max_gap): "
                        "the key is another frame, at most that many frames away.")


def pairs(index: VideoIndex, rows, max_gap: int, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """For each query row, a key row of the same video, 1 <= |Δframe| <= max_gap, drawn
    uniformly among the frames there are (before and after the query).

    rows: (B,) record rows. Returns query (B,) int64 (= rows), key (B,) int64, gaps (B,)
    int64 (key frame - query frame, never 0), and clamped: how many queries' videos are
    shorter than max_gap + 1 frames, so the largest gap they offer is below max_gap (the
    documented fallback: they are sampled among the gaps they have). One draw of rng.
    """
    check_max_gap(max_gap)
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= len(index.order))):
        raise ValueError(f"rows must be (B,) in [0, {len(index.order)}), got {rows}")
    video = index.video_of[rows]
    length, pos = index.lengths[video], index.position[rows]
    single = np.flatnonzero(length < 2)
    if len(single):
        r = rows[single[0]]
        raise UserError(
            f"{index.name}: record {r} is the only frame of video "
            f"{index.video_ids[video[single[0]]]}, so it has no key frame. Draw queries "
            "from VideoIndex.pairable() (videos of 2+ frames), or drop one-frame videos.")
    before = np.minimum(pos, max_gap)  # candidates earlier in the video
    after = np.minimum(length - 1 - pos, max_gap)
    u = np.floor(rng.random(len(rows)) * (before + after)).astype(np.int64)
    gaps = np.where(u < before, u - before, u - before + 1)
    key = index.order[index.starts[video] + pos + gaps]
    clamped = int(np.sum(length - 1 < max_gap))
    return rows, key, gaps, clamped


def check_boxes(box, hw, name: str = "the dataset", rows=None) -> np.ndarray:
    """box (B, 4) (top, left, bottom, right), hw (2,) or (B, 2) the frames' sizes ->
    box as float32; a box empty or outside its frame raises, naming its record."""
    box = np.asarray(box, np.float32).reshape(-1, 4)
    hw = np.broadcast_to(np.asarray(hw, np.float32), (len(box), 2))
    bad = ((box[:, 0] < 0) | (box[:, 1] < 0) | (box[:, 2] > hw[:, 0]) | (box[:, 3] > hw[:, 1])
           | (box[:, 2] <= box[:, 0]) | (box[:, 3] <= box[:, 1]) | ~np.isfinite(box).all(-1))
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        record = j if rows is None else int(np.asarray(rows)[j])
        raise UserError(
            f"{name}: record {record} has box {box[j].tolist()} (top, left, bottom, right), "
            f"empty or outside its {int(hw[j, 0])}x{int(hw[j, 1])} frame. Fix the box files "
            "and re-prepare the dataset, or use whole frames (no region crops).")
    return box


def region_boxes(box, hw, *, context=0.25, min_size: float = 8.0,
                 rng: np.random.Generator | None = None, name: str = "the dataset",
                 rows=None) -> np.ndarray:
    """The crop around each object box: box (B, 4), hw (2,) or (B, 2) -> (B, 4) float32.

    Each side is moved out by `context` times the box's size on that axis (with rng: a
    fraction drawn uniformly in [0, context] per side, so the object is not always
    centred; context may also be a (B, 4) array, each side's own fraction), grown to at
    least `min_size` pixels about its centre, slid into the frame where it fits, else
    clipped to it: the crop always contains the box. Crop the query
    with its box and the key with its own (pairs()) to get the same object in both frames.
    name, rows: the dataset and records the boxes are of, named by check_boxes' error.
    """
    box = check_boxes(box, hw, name, rows)
    hw = np.broadcast_to(np.asarray(hw, np.float32), (len(box), 2))
    size = np.concatenate([box[:, 2:] - box[:, :2]] * 2, axis=1)  # (h, w, h, w)
    margin = (context if rng is None else rng.uniform(0, context, box.shape)) * size
    crop = box + np.array([-1, -1, 1, 1], np.float32) * margin
    centre, half = (crop[:, :2] + crop[:, 2:]) / 2, (crop[:, 2:] - crop[:, :2]) / 2
    half = np.maximum(half, min_size / 2)
    lo, hi = centre - half, centre + half
    # Slid back into the frame where it fits (it still holds the box), else clipped.
    shift = np.maximum(-lo, 0) - np.maximum(hi - hw, 0)
    crop = np.concatenate([lo + shift, hi + shift], axis=1)
    crop = np.clip(crop, 0, np.concatenate([hw, hw], axis=1))
    # Clipping keeps the box inside (the box is inside the frame); float noise aside:
    crop[:, :2] = np.minimum(crop[:, :2], box[:, :2])
    crop[:, 2:] = np.maximum(crop[:, 2:], box[:, 2:])
    return crop.astype(np.float32)


def crop(image: np.ndarray, box, out_size: int) -> np.ndarray:
    """image (H, W, C) uint8, box (4,) -> (out_size, out_size, C) uint8: the pixels the
    box covers (outward to whole pixels), resized bilinearly (a host-side reference;
    the device can crop the same boxes)."""
    from PIL import Image

    t, l, b, r = np.asarray(box, np.float64)
    t, l, b, r = int(np.floor(t)), int(np.floor(l)), int(np.ceil(b)), int(np.ceil(r))
    part = image[t:b, l:r]
    pil = Image.fromarray(part[..., 0] if part.shape[-1] == 1 else part)
    out = np.asarray(pil.resize((out_size, out_size), Image.BILINEAR), np.uint8)
    return out.reshape(out_size, out_size, image.shape[-1])


POSITIVES = ("frame", "temporal", "region")  # config.video.positives


@dataclasses.dataclass(frozen=True, eq=False)
class PairSampler:
    """Each step's positive pairs: which records are queries, and each query's key.

    index: the train split's VideoIndex; max_gap: config.video.max_gap; seed: the run's.
    boxes: (N, 4) float32 per record, for region positives (None: whole frames);
    context: region_boxes' margin; region_size: the side the region crops are resized to.
    Picklable (grain worker processes); every draw is a pure function of (seed, step),
    so a resumed run draws what an uninterrupted one would.
    """
    index: VideoIndex
    max_gap: int
    seed: int
    boxes: np.ndarray | None = None
    context: float = 0.25
    region_size: int = 64

    def __post_init__(self):
        check_max_gap(self.max_gap)
        if not len(self.queries):
            raise UserError(f"{self.index.name}: every video has one frame, so no frame has a "
                            "key. Video positives need videos of 2+ frames.")

    @functools.cached_property
    def queries(self) -> np.ndarray:
        """(M,) int64: the records that can be queries (videos of 2+ frames)."""
        return self.index.pairable()

    def draw(self, rows: np.ndarray, step: int) -> dict:
        """rows: (G,) the query records of a whole global batch -> {"query", "key": (G,)
        int64, and for region positives "context": (G, 4) float32, each crop side's
        margin (region_boxes)}. Drawn for the global batch, so a process's slice does not
        depend on the process count."""
        rng = np.random.default_rng((self.seed, 1, step))
        query, key, _, _ = pairs(self.index, rows, self.max_gap, rng)
        out = {"query": query, "key": key}
        if self.boxes is not None:
            out["context"] = (self.context * rng.random((len(rows), 4))).astype(np.float32)
        return out

    def crops(self, images: np.ndarray, rows: np.ndarray, context: np.ndarray,
              hw: np.ndarray | None = None) -> np.ndarray:
        """Region positives: images (b, H, W, C) uint8 of records `rows` -> (b, R, R, C)
        uint8, the crop around each record's box (region_boxes with margins `context`),
        resized to R = region_size. hw (b, 2): the valid size of canvas images."""
        hw = np.asarray(images.shape[1:3] if hw is None else hw)
        windows = region_boxes(self.boxes[rows], hw, context=context, name=self.index.name,
                               rows=rows)
        return np.stack([crop(im, w, self.region_size) for im, w in zip(images, windows)])

    def describe(self) -> str:
        """One line for the run's log: the videos, and how many are shorter than the gap."""
        lengths = self.index.lengths
        short = (lengths >= 2) & (lengths - 1 < self.max_gap)
        single = int(np.sum(lengths < 2))
        what = "region" if self.boxes is not None else "temporal"
        return (f"{what} positives from {len(lengths)} videos ({len(self.index.order)} frames), "
                f"key frame at most max_gap={self.max_gap} frames away; {int(short.sum())} "
                f"videos ({int(lengths[short].sum())} frames) are shorter than "
                f"{self.max_gap + 1} frames and paired at the gaps they have"
                + (f"; {single} one-frame videos have no key and are left out" if single
                   else ""))
