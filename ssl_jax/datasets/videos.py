r"""Short synthetic videos of real garments: Fashion-MNIST in motion, one record a frame.

    python -m ssl_jax.prepare --dataset fashion_mnist_videos \
        [--videos_per_class 100] [--seed 0] [--data_dir D]

made from the prepared `fashion_mnist` in the same data_dir (prepare it first).
Purushwalkam & Gupta (2020) take positives from video: two frames of one object
a few frames apart. Here each video is one Fashion-MNIST garment (a real image)
on a 64x64 black canvas, moving along a smooth path while it rotates in plane,
turns in depth (perspective), scales, changes illumination and is partly hidden
by a grey occluder in a run of frames: synthetic motion, every parameter
interpolated (smoothstep) between a start and an end state drawn per video.

Dataset `fashion_mnist_videos`, version 1.0.0; splits `train` (videos_per_class
videos a class from fashion_mnist train: 1000 by default) and `test`
(max(1, videos_per_class // 5) a class from its test split). One record a
frame, records grouped by video and in frame order:
- image: (64, 64, 1) uint8, PNG;
- label: fashion_mnist's ClassLabel, the garment's class;
- video_id: int64, 0.. within a split, class-major (c * per_class + k);
- frame_index: int64, 0 .. length-1; length drawn in [MIN_LENGTH, MAX_LENGTH];
- box: (4,) float32, (top, left, bottom, right) in pixels, bottom/right
  exclusive: the box of the whole transformed garment mask (its occluded part
  included, as a tracking annotation), clipped to the canvas.
The garments of a class are drawn without replacement from a Generator seeded
by (seed, split); a video's motion from one seeded by (seed, split, video_id).
The same arguments give byte-identical records. video_pairs.py samples the
(query, key) frame pairs; data/video_sampler.py reads a split's VideoIndex.
"""
from __future__ import annotations


import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ssl_jax.data import sources
from ssl_jax.datasets import arrays, base, transforms
from ssl_jax.errors import UserError

DATASET, SOURCE = "fashion_mnist_videos", "fashion_mnist"
DATASET_VERSION = "1.0.0"
DEFAULTS = {"videos_per_class": 100, "seed": 0}
SPLITS = ("train", "test")
TEST_SHARE = 5  # test has videos_per_class // TEST_SHARE videos a class (at least 1)
CANVAS = 64
MIN_LENGTH, MAX_LENGTH = 8, 16  # frames a video, both included
SCALE = (0.9, 1.4)  # the garment's (28 px) scale at the start and at the end
CENTRE = (24.0, 40.0)  # where its centre may be, each axis, in canvas pixels
MAX_ROTATION = 30.0  # degrees in plane, start and end each in [-30, 30]
MAX_TILT = 50.0  # degrees turned in depth, start and end each in [-50, 50]
GAIN = (0.6, 1.3)  # global illumination gain, start and end
MAX_GRADIENT = 0.5  # brightness gradient across the garment, 1 +- this at its sides
OCCLUDER_SIZE = (0.25, 0.5)  # the occluder's sides, as fractions of the garment's box
OCCLUDER_VALUE = 96  # a flat grey: another object, not the garment's texture


def smoothstep(length: int) -> np.ndarray:
    """(length,) float64: each frame's share of the way from start to end, eased so the
    motion starts and stops smoothly (0 -> 1)."""
    u = transforms.ramp(length)
    return u * u * (3 - 2 * u)


def video_frames(garment: np.ndarray, rng: np.random.Generator,
                 length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One garment (h, w, 1) uint8 (h, w <= CANVAS) -> frames (T, CANVAS, CANVAS, 1) uint8
    and boxes (T, 4) float32 (top, left, bottom, right; pixels, bottom/right exclusive).

    T is `length`, or drawn in [MIN_LENGTH, MAX_LENGTH]. Every parameter is drawn from
    rng before the garment is looked at; the same draws give the same frames.
    """
    if length is None:
        length = int(rng.integers(MIN_LENGTH, MAX_LENGTH + 1))
    start_end = lambda lo, hi: rng.uniform(lo, hi, 2)  # noqa: E731
    scale, angle = start_end(*SCALE), start_end(-MAX_ROTATION, MAX_ROTATION)
    tilt, cy, cx = start_end(-MAX_TILT, MAX_TILT), start_end(*CENTRE), start_end(*CENTRE)
    axis = int(rng.integers(2))
    gain, direction = start_end(*GAIN), rng.uniform(0, 2 * np.pi)
    gradient = start_end(-MAX_GRADIENT, MAX_GRADIENT)
    # The occluder: a rectangle fixed to the garment's box (it moves with it), shown in a
    # run of 1/4 to 1/2 of the frames.
    occ_hw = rng.uniform(*OCCLUDER_SIZE, 2)
    occ_at = rng.uniform(0, 1, 2) * (1 - occ_hw)  # its top-left, as fractions of the box
    run = int(rng.integers(max(1, length // 4), max(1, length // 2) + 1))
    first = int(rng.integers(0, length - run + 1))

    h, w, _ = garment.shape
    canvas = np.zeros((CANVAS, CANVAS, 1), np.uint8)
    top, left = (CANVAS - h) // 2, (CANVAS - w) // 2
    canvas[top:top + h, left:left + w] = garment
    mask = np.zeros_like(canvas)
    mask[top:top + h, left:left + w] = np.where(
        garment > transforms.OBJECT_THRESHOLD, 255, 0).astype(np.uint8)
    if not mask.any():  # a blank garment: its box is the whole 28x28 square
        mask[top:top + h, left:left + w] = 255
    y, x = np.mgrid[0:CANVAS, 0:CANVAS] + 0.5
    along = (x - CANVAS / 2) * np.cos(direction) + (y - CANVAS / 2) * np.sin(direction)
    along /= np.abs(along).max()  # -1 .. 1 across the canvas

    frames = np.zeros((length, CANVAS, CANVAS, 1), np.uint8)
    boxes = np.zeros((length, 4), np.float32)
    black = np.zeros(1, np.uint8)
    for t, s in enumerate(smoothstep(length)):
        lerp = lambda v: v[0] + s * (v[1] - v[0])  # noqa: E731
        forward = transforms.homography(CANVAS, CANVAS, angle=lerp(angle), scale=lerp(scale),
                                        tilt=lerp(tilt), axis=axis)
        shift = np.array([[1, 0, lerp(cx) - CANVAS / 2], [0, 1, lerp(cy) - CANVAS / 2],
                          [0, 0, 1]])
        forward = shift @ forward
        frame = transforms.warp(canvas, forward, black).astype(np.float64)
        # The box of every pixel the warped mask touches: it holds each pixel that a
        # garment pixel above OBJECT_THRESHOLD reaches, so nothing of the garment is out.
        b_top, b_left, b_bottom, b_right = transforms.object_box(
            transforms.warp(mask, forward, black), threshold=0)
        light = lerp(gain) * (1 + lerp(gradient) * along)[..., None]
        frame = np.clip(np.round(frame * light), 0, 255)
        if first <= t < first + run:
            bh, bw = b_bottom - b_top, b_right - b_left
            o_top, o_left = b_top + int(occ_at[0] * bh), b_left + int(occ_at[1] * bw)
            frame[o_top:o_top + max(1, int(occ_hw[0] * bh)),
                  o_left:o_left + max(1, int(occ_hw[1] * bw))] = OCCLUDER_VALUE
        frames[t] = frame.astype(np.uint8)
        boxes[t] = (b_top, b_left, b_bottom, b_right)
    return frames, boxes


def check_options(videos_per_class: int, seed: int) -> None:
    if videos_per_class < 1:
        raise UserError(f"--videos_per_class {videos_per_class} must be at least 1.")
    if seed < 0:
        raise UserError(f"--seed {seed} must be at least 0.")


def per_class(split: str, videos_per_class: int) -> int:
    return videos_per_class if split == "train" else max(1, videos_per_class // TEST_SHARE)


def choose_garments(labels: np.ndarray, num_classes: int, count: int, seed: int,
                    split: str) -> np.ndarray:
    """labels (N,) -> (num_classes, count) int64 record indices, different images a class."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    out = np.empty((num_classes, count), np.int64)
    for c in range(num_classes):
        ix = np.flatnonzero(labels == c)
        if len(ix) < count:
            raise UserError(f"Class {c} has {len(ix)} images in {SOURCE} {split}; the videos "
                            f"need {count} different ones a class: lower --videos_per_class.")
        out[c] = rng.choice(ix, count, replace=False)
    return out


class FashionMnistVideos(base.StreamingBuilder, skip_registration=True):
    """The `fashion_mnist_videos` builder (see the module doc)."""

    byte_identical = True  # the same arguments give the same files

    name = DATASET
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Synthetic videos of Fashion-MNIST garments."}
    code_path = epath.Path(__file__)  # see fashion_mnist.FashionMnist.code_path

    def __init__(self, *, data_dir: str, videos_per_class: int | None = None,
                 seed: int | None = None, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        self.videos_per_class = (DEFAULTS["videos_per_class"] if videos_per_class is None
                                 else videos_per_class)
        self.seed = DEFAULTS["seed"] if seed is None else seed
        check_options(self.videos_per_class, self.seed)
        info = sources.dataset_info(SOURCE, data_dir)  # not prepared: names the command
        self.class_names, self.source_dir = info["class_names"], data_dir
        self.settings = f"{SOURCE}, videos_per_class={self.videos_per_class}, seed={self.seed}"
        super().__init__(data_dir=data_dir, **kwargs)
        self.refuse_other_settings(self.settings)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Synthetic videos of garments, made by ssl_jax from {self.settings}",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(CANVAS, CANVAS, 1)),
                "label": tfds.features.ClassLabel(names=list(self.class_names)),
                "video_id": tfds.features.Scalar(np.int64, doc="The video; contiguous."),
                "frame_index": tfds.features.Scalar(np.int64, doc="0.. in time order."),
                "box": tfds.features.Tensor(shape=(4,), dtype=np.float32,
                                            doc="The garment's (top, left, bottom, right)."),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True)  # videos stay contiguous, frames in order

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        out = {}
        for split in SPLITS:  # every check before anything is written
            labels = np.asarray(sources.column(SOURCE, split, self.source_dir, "label"))
            chosen = choose_garments(labels, len(self.class_names),
                                     per_class(split, self.videos_per_class), self.seed, split)
            out[split] = self._examples(split, chosen)
        return out

    def _examples(self, split: str, chosen: np.ndarray):
        src = sources.open_source(SOURCE, split, self.source_dir)
        for c in range(chosen.shape[0]):
            for k, i in enumerate(chosen[c]):
                video_id = c * chosen.shape[1] + k
                garment = np.asarray(src[int(i)]["image"], np.uint8).reshape(28, 28, 1)
                rng = np.random.default_rng([self.seed, SPLITS.index(split) + 1, video_id])
                frames, boxes = video_frames(garment, rng)
                for t, (frame, box) in enumerate(zip(frames, boxes)):
                    yield {"image": arrays.encode_png(frame), "label": c, "video_id": video_id,
                           "frame_index": t, "box": box}
