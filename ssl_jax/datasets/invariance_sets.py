r"""The transformation sets of Purushwalkam & Gupta (2020), "Demystifying Contrastive
Self-Supervised Learning", made from any prepared image dataset with labels.

    python -m ssl_jax.prepare --dataset invariance_sets --source fashion_mnist \
        [--source_split test] [--sets_per_class 30] [--set_size 8] [--seed 0] [--data_dir D]

writes the dataset `<source>_invariance` (fashion_mnist_invariance), version
1.0.0, with four splits of sets, each set `set_size` images, contiguous:
- occlusion: one image under growing occluders (0 -> 60% of the object's box);
- viewpoint: one image rotated in-plane, scaled and turned in depth (a proxy);
- illumination: one image under a growing brightness gradient, intensity and
  colour change;
- instance: `set_size` different images of one class, untransformed.
(transforms.py makes the frames.) Features: `image`, `label` (the source's
ClassLabel), `set_id` (int64; 0.. within a split, class-major), `frame` (int64:
0 = the untransformed image, the transformation growing with it) and `strength`
(float32: the occluded fraction of the object's box; for viewpoint and
illumination each frame's share of the set's full transformation, 0 -> 1; 0 for
instance). Images keep the source's shape and dtype when it has one shape
(stored as PNG, lossless); a source of varying size (imagenet2012, an image
folder) is read with its shorter side resized to 256 (the longer capped at 512)
and stored as JPEG, quality 95.

Which images: for each class, `sets_per_class * set_size` different images of
the source split drawn with a numpy Generator seeded by `seed`; group k of class c
is instance set k, and its first image is the one that occlusion, viewpoint and
illumination set k transform, so the four splits' sets are about the same
images. The transformations of a set draw from a Generator seeded by (seed,
split, set_id). The same arguments give byte-identical records.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
from collections.abc import Callable, Iterator
from concurrent import futures

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from ssl_jax.data import sources
from ssl_jax.datasets import arrays, base, transforms
from ssl_jax.errors import UserError

DATASET_VERSION = "1.0.0"
DEFAULTS = {"sets_per_class": 30, "set_size": 8, "seed": 0}
MIN_SET_SIZE = 3  # the invariance metric needs at least 3 images a set
SHORTER_SIDE, LONGEST_SIDE = 256, 512  # varying-size sources: the images' size
JPEG_QUALITY = 95  # visually lossless (image_folder's re-encoding quality)
# split -> frames of one image; instance sets are made of different images instead.
TRANSFORMS: dict[str, Callable] = {
    "occlusion": transforms.occlusion_frames,
    "viewpoint": transforms.viewpoint_frames,
    "illumination": transforms.illumination_frames,
}
SPLITS = (*TRANSFORMS, "instance")


@dataclasses.dataclass(frozen=True)
class ShorterSide:
    """A decode policy (data/decode.py's interface) for the source images: encoded image
    -> ((h, w, C) uint8, None), its shorter side resized to `shorter` unless the longer
    would then pass `longest` (then the longer is `longest`), aspect ratio kept."""
    shorter: int = SHORTER_SIDE
    longest: int = LONGEST_SIDE

    def decoded_bytes(self, channels: int) -> int:
        return self.longest * self.longest * channels + 8

    def __call__(self, data: bytes, channels: int) -> tuple[np.ndarray, None]:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        k = min(self.shorter / min(w, h), self.longest / max(w, h))
        size = (max(1, round(w * k)), max(1, round(h * k)))
        if im.format == "JPEG" and k < 0.5:
            im.draft("RGB" if channels == 3 else "L", size)  # DCT scaling: decodes less
        im = im.convert("RGB" if channels == 3 else "L")
        out = np.asarray(im.resize(size, Image.BILINEAR) if im.size != size else im, np.uint8)
        return out.reshape(size[1], size[0], channels), None


def check_options(sets_per_class: int, set_size: int, seed: int) -> None:
    if set_size < MIN_SET_SIZE:
        raise UserError(f"--set_size {set_size} is too small: the invariance metric needs "
                        f"at least {MIN_SET_SIZE} images a set. Use --set_size >= {MIN_SET_SIZE}.")
    if sets_per_class < 1:
        raise UserError(f"--sets_per_class {sets_per_class} must be at least 1.")
    if seed < 0:
        raise UserError(f"--seed {seed} must be at least 0.")


def default_split(splits: list[str]) -> str:
    """The held-out split: validation if there is one (ImageNet's test has no labels),
    else test."""
    for split in ("validation", "test"):
        if split in splits:
            return split
    raise UserError(f"The source has no validation or test split (it has {splits}): "
                    "name one with --source_split.")


def choose_images(labels: np.ndarray, class_names: list[str], sets_per_class: int,
                  set_size: int, seed: int, what: str, candidates=None) -> np.ndarray:
    """labels (N,) of a split -> (classes, sets_per_class, set_size) int64 record indices:
    for each class, different images drawn with a Generator seeded by `seed`.
    candidates: (N,) bool, the records that may be drawn (None: all)."""
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise UserError(f"{what} has records without a label ({labels.min()}) or beyond "
                        f"its {len(class_names)} classes: choose a labelled split with "
                        "--source_split.")
    need = sets_per_class * set_size
    rng = np.random.default_rng([seed, 0])
    out = np.empty((len(class_names), sets_per_class, set_size), np.int64)
    for c, name in enumerate(class_names):
        ix = np.flatnonzero((labels == c) & (True if candidates is None else candidates))
        if len(ix) < need:
            raise UserError(
                f"Class {name!r} has {len(ix)} images in {what}; the instance sets need "
                f"{need} different images a class (--sets_per_class {sets_per_class} x "
                f"--set_size {set_size}). Lower --sets_per_class (or --set_size, at least "
                f"{MIN_SET_SIZE}), or choose a bigger split with --source_split.")
        out[c] = rng.choice(ix, need, replace=False).reshape(sets_per_class, set_size)
    return out


class _InvarianceSets(base.StreamingBuilder, skip_registration=True):
    """Base of the builders that InvarianceSets() makes, one class per dataset name."""

    byte_identical = True  # the same arguments give the same files

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Transformation sets (ssl_jax invariance_sets)."}
    code_path = epath.Path(__file__)  # see fashion_mnist.FashionMnist.code_path

    def __init__(self, *, source: str, source_split: str | None, sets_per_class: int,
                 set_size: int, seed: int, data_dir: str, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        try:
            info = sources.dataset_info(source, data_dir)
        except sources.DatasetNotFoundError as e:
            raise sources.DatasetNotFoundError(f"--source {source}: {e}") from e
        if not info["num_classes"]:
            raise UserError(f"--source {source} has no labels (a `label` ClassLabel feature): "
                            "instance sets and the metric need classes. Choose a labelled "
                            "dataset.")
        split = source_split or default_split(list(info["num_examples"]))
        if split not in info["num_examples"]:
            raise UserError(f"--source_split {split!r}: {source} has splits "
                            f"{sorted(info['num_examples'])}.")
        shape = info["image_shape"]
        self.fixed = None not in shape  # else: varying size, stored as JPEG
        if self.fixed and shape[-1] not in (1, 3):
            raise UserError(f"{source}'s images have {shape[-1]} channels; the sets are "
                            "made of greyscale or RGB images (1 or 3).")
        self.source, self.source_split, self.shape = source, split, shape
        self.source_dir = data_dir  # the source is read from the same data_dir
        self.channels = shape[-1] if self.fixed else (shape[-1] or 3)
        self.class_names = info["class_names"]
        self.sets_per_class, self.set_size, self.seed = sets_per_class, set_size, seed
        self.settings = (f"{source} {split}, sets_per_class={sets_per_class}, "
                         f"set_size={set_size}, seed={seed}")
        super().__init__(data_dir=data_dir, **kwargs)
        self.refuse_other_settings(self.settings)

    def _info(self) -> tfds.core.DatasetInfo:
        image = (tfds.features.Image(shape=tuple(self.shape)) if self.fixed else
                 tfds.features.Image(shape=(None, None, self.channels), encoding_format="jpeg"))
        return tfds.core.DatasetInfo(
            builder=self,
            description=("Transformation sets (occlusion, viewpoint, illumination, instance) "
                         "of Purushwalkam & Gupta 2020, made by ssl_jax from "
                         f"{self.settings}"),
            features=tfds.features.FeaturesDict({
                "image": image,
                "label": tfds.features.ClassLabel(names=list(self.class_names)),
                "set_id": tfds.features.Scalar(np.int64, doc="The set; sets are contiguous."),
                "frame": tfds.features.Scalar(
                    np.int64, doc="Position in the set; 0 = the least transformed."),
                "strength": tfds.features.Scalar(
                    np.float32, doc="Occluded fraction, or share of the full transformation."),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True)  # sets stay contiguous, frames in order

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        what = f"{self.source} {self.source_split}"
        labels = sources.column(self.source, self.source_split, self.source_dir, "label")
        # A video dataset's frames of one video are one instance, seen again: one frame a
        # video (its first) may be drawn, so instance sets hold different garments and
        # the other sets' transformations act on different objects.
        candidates = None
        if "frame_index" in sources.dataset_info(self.source, self.source_dir)["features"]:
            candidates = sources.column(self.source, self.source_split, self.source_dir,
                                        "frame_index") == 0
            what += " (first frames of its videos)"
        # Every check before anything is written.
        chosen = choose_images(np.asarray(labels, np.int64), self.class_names,
                               self.sets_per_class, self.set_size, self.seed, what,
                               candidates)
        # Read lazily: only the chosen records, a set at a time (ImageNet's do not fit).
        src = sources.open_source(self.source, self.source_split, self.source_dir,
                                  memory_limit=0, decode=ShorterSide())
        return {split: self._examples(split, src, chosen) for split in SPLITS}

    def _read(self, src, ix: np.ndarray) -> list[np.ndarray]:
        """Records ix (k,) of the source -> k images (h, w, C) uint8."""
        return [np.asarray(r["image"], np.uint8).reshape(*np.shape(r["image"])[:2], -1)
                for r in src.__getitems__([int(i) for i in ix])]

    def _encode(self, image: np.ndarray) -> bytes:
        if self.fixed:  # PNG: lossless, so frame 0 is the source image exactly
            return arrays.encode_png(image)
        out = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue()

    def _set(self, split: str, set_id: int, label: int, images: list[np.ndarray]) -> list[dict]:
        """The records of one set, from its source images (instance: set_size, else 1)."""
        if split == "instance":
            frames, strengths = images, np.zeros(len(images), np.float32)
        else:
            rng = np.random.default_rng([self.seed, SPLITS.index(split) + 1, set_id])
            frames, strengths = TRANSFORMS[split](images[0], rng, self.set_size)
        return [{"image": self._encode(frame), "label": label, "set_id": set_id, "frame": t,
                 "strength": np.float32(strength)}
                for t, (frame, strength) in enumerate(zip(frames, strengths))]

    def _examples(self, split: str, src, chosen: np.ndarray) -> Iterator[dict]:
        """The records of one split, set by set: set_id = class * sets_per_class + k.

        Sets are transformed and encoded on threads (PIL and NumPy release the GIL: an
        ImageNet-size source is ~30 ms a set), a bounded window ahead, and yielded in
        order; the source is read here, on one thread, in order.
        """
        workers = min(8, os.cpu_count() or 1)
        with futures.ThreadPoolExecutor(workers) as pool:
            window: collections.deque = collections.deque()
            for c in range(chosen.shape[0]):
                for k in range(chosen.shape[1]):
                    images = self._read(src, chosen[c, k] if split == "instance"
                                        else chosen[c, k, :1])
                    window.append(pool.submit(self._set, split, c * chosen.shape[1] + k, c,
                                              images))
                    if len(window) >= 4 * workers:
                        yield from window.popleft().result()
            while window:
                yield from window.popleft().result()


def InvarianceSets(*, source: str | None, data_dir: str,  # noqa: N802
                   source_split: str | None = None, sets_per_class: int | None = None,
                   set_size: int | None = None, seed: int | None = None,
                   **kwargs) -> _InvarianceSets:
    """The builder of `<source>_invariance` under data_dir; None options take DEFAULTS.
    kwargs go to the TFDS builder."""
    if not source:
        raise UserError("--dataset invariance_sets needs --source DATASET, a prepared dataset "
                        "with labels (e.g. --source fashion_mnist).")
    sets_per_class = DEFAULTS["sets_per_class"] if sets_per_class is None else sets_per_class
    set_size = DEFAULTS["set_size"] if set_size is None else set_size
    seed = DEFAULTS["seed"] if seed is None else seed
    check_options(sets_per_class, set_size, seed)
    dataset_name = f"{source.split(':')[0]}_invariance"

    # A builder's name is a class attribute; skip_registration keeps it out of
    # TFDS's registry (readers find the dataset from its files).
    class Builder(_InvarianceSets, skip_registration=True):
        name = dataset_name

    return Builder(source=source, source_split=source_split, sets_per_class=sets_per_class,
                   set_size=set_size, seed=seed, data_dir=data_dir, **kwargs)
