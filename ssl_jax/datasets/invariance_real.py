r"""The real benchmarks on which Purushwalkam & Gupta (2020), "Demystifying Contrastive
Self-Supervised Learning", measure invariance, read from folders the user downloaded
(nothing is downloaded here) into transformation-set datasets like invariance_sets':

    python -m ssl_jax.prepare --dataset aloi_invariance --manual_dir DIR \
        [--aloi_objects N] [--frames_per_set K] [--skip_bad_images] [--data_dir D]
    python -m ssl_jax.prepare --dataset got10k_occlusion --manual_dir DIR \
        [--frames_per_set 8] [--max_tracks N]
    python -m ssl_jax.prepare --dataset pascal3d_instance --manual_dir DIR \
        [--frames_per_set K]

Each dataset, version 1.0.0, has one split per transformation and the features
`image` (JPEG, quality 95, (None, None, 3): the image or the object's crop, its
shorter side resized to 256 unless the longer would pass 512, as invariance_sets
stores sources of varying size), `label` (ClassLabel), `set_id` (int64, 0.. within a
split, contiguous), `frame` (int64, the order within the set, from 0), `strength`
(float32, below) and `file_name` (the source image, relative to DIR). The
evaluator scores each split as one transformation:
`python -m ssl_jax.evaluate --workdir W --eval invariance
--config.eval.invariance.dataset=aloi_invariance`.

aloi_invariance: ALOI, https://aloi.science.uva.nl/. Its tars unpack to one folder
per resolution, png/ (aloi_view.tar, ...), png2/ (aloi_red2_*) or png4/ (aloi_red4_*),
of <object>/<object>_<setting>.png; the file names alone are read, anywhere under
DIR, so DIR/aloi_red4_view/png4/1/1_r0.png, DIR/png4/1/1_r0.png (all tars unpacked
in one place) and the authors' renamed folders (data/ALOI_viewpoint/1/1_r0.png) all
work. The same image twice (two resolutions) is an error. Splits:
- viewpoint: <obj>_r<angle>.png, 72 turns 0..355 in steps of 5; a set = an object,
  frames by angle; strength = angle / 360 (the fraction of a full turn).
- illumination_direction: <obj>_l<light>c<camera>.png, lights l1..l8, cameras
  c1..c3; a set = an object seen by one camera, frames by light; strength 0 (a
  light's number is no magnitude).
- illumination_colour: <obj>_i<T>.png, T = 110..250 (12 settings); a set = an
  object, frames by T; strength = (T - 110) / 140, 0 -> 1 over ALOI's range.
ALOI has no classes: label = the object (names "1", "2", ...), as the authors' code
falls back to the instance as class, so C = the number of objects and the metric's
firing percentile p is 95 from 20 objects on. --aloi_objects N keeps the N lowest
object numbers; --frames_per_set K keeps K frames of a set evenly spaced
(viewpoint: about every 360/K degrees from 0; the others: first to last).
Default: all.

got10k_occlusion: GOT-10k, http://got-10k.aitestbed.com/, DIR/train/GOT-10k_Train_*/
and/or DIR/val/GOT-10k_Val_*/ (or the track folders directly in DIR, as the authors
keep them), each with 00000001.jpg.., groundtruth.txt (x,y,w,h a line),
cover.label (the visible fraction in eighths, 8 = fully visible), absence.label,
meta_info.ini (`object_class: ...`). One split, occlusion: a track's set holds one
frame for each cover level among its usable frames (present, a box of positive
size), the middle one in time of that level, ordered from most visible to most
occluded, at most --frames_per_set (default 8) of the levels evenly spaced, keeping
both ends; strength = 1 - cover / 8, the occluded fraction. The authors likewise
take one frame per cover level (a random one; they keep tracks whose levels span 4
or more and do not drop absent frames). Tracks with fewer than 3 levels (e.g. never
occluded) and tracks without cover.label (the test set) are skipped and counted.
label = meta_info's object_class (names sorted). --max_tracks N takes N of the
usable tracks evenly spaced in folder order (as the authors' max_videos).

pascal3d_instance: PASCAL3D+ release 1.1, https://cvgl.stanford.edu/projects/
pascal3d.html, DIR/Images/<class>_pascal/*.jpg and DIR/Annotations/<class>_pascal/
*.mat (the PASCAL VOC part; the authors add the ImageNet part, not read here).
One split, instance: a set = the objects of one class seen from one azimuth bin
(8 bins of 45 degrees centred on 0, 45, ..., 315; the continuous azimuth, or
azimuth_coarse where the annotation has none, distance 0), different instances
in one pose, in file order; objects truncated, occluded, difficult or without a
viewpoint are left out, as are other classes' objects in an image (they are in
their own class's folder); bins with fewer than 3 objects are skipped and
counted; --frames_per_set K keeps K of a set evenly spaced (default all, as the
authors). label = the class (the folders' names, sorted: the 12 classes);
strength 0. The authors bin azimuth mod 180 in 30 degree steps and elevation
too; the 8 full-circle azimuth bins keep front and back apart.

Crops (GOT-10k, PASCAL3D+): the annotated box grown by 10% of its width and height
on each side, clipped to the image. The authors crop at the box exactly; the boxes
are tight, and a crop on the box edge cuts off the parts of the outline the
annotation missed by a pixel or two, and shows the encoder an object without the
surroundings its training crops always had. 10% keeps the object about 70% of the
crop. An unreadable image, or a box with no pixels in its image, stops preparation
with its name, or with --skip_bad_images is left out (counted); a set left with
fewer than 3 images is then skipped. The same arguments give byte-identical records.
"""
from __future__ import annotations

import abc
import collections
import io
import os
from collections.abc import Iterator
from concurrent import futures

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from ssl_jax.datasets import base, invariance_sets
from ssl_jax.datasets import invariance_real_layouts as layouts
from ssl_jax.datasets.base import BadImageError
from ssl_jax.errors import UserError

DATASET_VERSION = "1.0.0"
MIN_SET_SIZE = invariance_sets.MIN_SET_SIZE
JPEG_QUALITY = invariance_sets.JPEG_QUALITY
GOT_FRAMES = 8  # got10k_occlusion's default --frames_per_set
_SHOWN = 5  # skipped items named in a report (all are logged)


def open_image(path: str) -> Image.Image:
    """An image file, opened (decoded when its pixels are first used). Raises
    BadImageError for a missing, empty or unrecognisable file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImageError(f"cannot be read ({type(e).__name__}: {e.strerror or e})") from e
    if not data:
        raise BadImageError("is empty (0 bytes)")
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for corrupt data
        raise BadImageError(f"cannot be decoded ({type(e).__name__}: {e})") from e


def encode_jpeg(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def load_image(path: str, box: tuple[float, ...] | None = None) -> bytes:
    """An image file -> JPEG bytes of it, or of the box (left, top, right, bottom, clipped
    to the image), resized as invariance_sets.ShorterSide resizes varying-size sources.
    Raises BadImageError for a missing, empty or undecodable file or an empty box."""
    im = open_image(path)
    w, h = im.size
    left, top, right, bottom = (0, 0, w, h) if box is None else (
        max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3]))
    if right - left < 1 or bottom - top < 1:
        raise BadImageError(f"has no pixels in its box {tuple(round(v, 1) for v in box)} "
                            f"(the image is {w}x{h})")
    cw, ch = right - left, bottom - top
    k = min(invariance_sets.SHORTER_SIDE / min(cw, ch), invariance_sets.LONGEST_SIDE / max(cw, ch))
    size = (max(1, round(cw * k)), max(1, round(ch * k)))
    try:
        if im.format == "JPEG" and k < 0.5:  # DCT scaling: decodes less
            im.draft("RGB", (max(1, round(w * k)), max(1, round(h * k))))
        sx, sy = im.size[0] / w, im.size[1] / h
        im = im.convert("RGB")  # decodes; ImageFile.LOAD_TRUNCATED_IMAGES is False
        im = im.resize(size, Image.BILINEAR, box=(left * sx, top * sy, right * sx, bottom * sy))
    except Exception as e:  # noqa: BLE001
        raise BadImageError(f"cannot be decoded ({type(e).__name__}: {e})") from e
    return encode_jpeg(im)


def leave_out(path: str, error: BadImageError, skip: bool, bad: list[str], shown: str,
              fix: str) -> None:
    """An unreadable image file: a UserError naming it, the error and `fix`; or with
    skip (--skip_bad_images) logged, and `shown` (its name and why) added to bad."""
    if not skip:
        raise UserError(f"{path} {error}. {fix}, or pass --skip_bad_images to leave such "
                        "images out (each is logged and counted).")
    logging.warning("Leaving out %s: it %s.", path, error)
    bad.append(f"{shown} ({error})")


def skip_report(skipped: list[str], what: str) -> list[str]:
    """Logs each skipped item ("split: ... (why)"); -> one line counting them, the first
    few named ([] when none were)."""
    for line in skipped:
        logging.info("Skipped %s.", line)
    if not skipped:
        return []
    more = f"; ... ({len(skipped) - _SHOWN} more in the log)" if len(skipped) > _SHOWN else ""
    return [f"Skipped {len(skipped)} {what}: {'; '.join(skipped[:_SHOWN])}{more}."]


def check_count(option: str, value: int | None, least: int) -> None:
    if value is not None and value < least:
        why = (": the invariance metric needs at least 3 images a set"
               if option == "frames_per_set" else "")
        raise UserError(f"--{option} {value} must be at least {least}{why}.")


class _RealSets(base.StreamingBuilder, skip_registration=True):
    """Base of the three builders: reads DIR's layout (a layouts.Plan) when made, checks
    that a prepared copy was made from the same settings, writes the sets."""

    byte_identical = True  # the same arguments give the same files

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Transformation sets of a real benchmark (ssl_jax)."}
    code_path = epath.Path(__file__)  # see fashion_mnist.FashionMnist.code_path
    LAYOUT = TITLE = HOMEPAGE = ""

    def __init__(self, *, manual_dir: str | None, skip_bad_images: bool, options: dict,
                 **kwargs):
        kwargs.setdefault("file_format", "array_record")
        least = {"frames_per_set": MIN_SET_SIZE}
        for option, value in options.items():
            check_count(option, value, least.get(option, 1))
        self.manual_dir = layouts.check_folder(manual_dir, self.name, self.LAYOUT)
        self.settings = ", ".join([self.manual_dir] + [
            f"{k}={'all' if v is None else v}" for k, v in options.items()])
        self.plan: layouts.Plan = self._read_plan(**options)  # every check before writing
        self.skip_bad_images = skip_bad_images
        self.bad_images: list[str] = []  # images left out, with the reason
        self.skipped: list[str] = list(self.plan.skipped)  # sets left out, with the reason
        super().__init__(**kwargs)
        self.refuse_other_settings(self.settings)

    _MADE_FROM = " Made by ssl_jax from "

    @abc.abstractmethod
    def _read_plan(self, **options) -> layouts.Plan:
        """The layout's sets (each builder reads its own layout with `layouts`)."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, homepage=self.HOMEPAGE,
            description=(f"{self.TITLE}: transformation sets for the invariance metric of "
                         f"Purushwalkam & Gupta 2020, a split per transformation."
                         f"{self._MADE_FROM}{self.settings}"),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=list(self.plan.class_names)),
                "set_id": tfds.features.Scalar(np.int64, doc="The set; sets are contiguous."),
                "frame": tfds.features.Scalar(np.int64, doc="Position in the set, from 0."),
                "strength": tfds.features.Scalar(
                    np.float32, doc="The transformation's magnitude (0 where none is given)."),
                "file_name": tfds.features.Text(doc="The source image, relative to DIR."),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True)  # sets stay contiguous, frames in order

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._examples(split, sets) for split, sets in self.plan.splits.items()}

    def _load_set(self, s: layouts.ImageSet) -> list:
        """-> [(frame, JPEG bytes or the BadImageError)] of a set."""
        out = []
        for f in s.frames:
            try:
                out.append((f, load_image(os.path.join(self.manual_dir, f.file_name), f.box)))
            except BadImageError as e:
                out.append((f, e))
        return out

    def _records(self, split: str, s: layouts.ImageSet, loaded: list, set_id: int) -> list:
        kept = []
        for f, image in loaded:
            if isinstance(image, BadImageError):
                leave_out(os.path.join(self.manual_dir, f.file_name), image,
                          self.skip_bad_images, self.bad_images, f.file_name,
                          "Replace the file (download it again)")
            else:
                kept.append((f, image))
        if len(kept) < MIN_SET_SIZE:
            self.skipped.append(f"{split}: {s.what} ({len(kept)} readable image(s) of "
                                f"{len(loaded)})")
            return []
        return [{"image": image, "label": s.label, "set_id": set_id, "frame": t,
                 "strength": np.float32(f.strength), "file_name": f.file_name}
                for t, (f, image) in enumerate(kept)]

    def _examples(self, split: str, sets: list[layouts.ImageSet]) -> Iterator[dict]:
        """The records of a split, set by set, set ids counted over the sets written.
        Sets are decoded on threads (PIL releases the GIL), a bounded window ahead."""
        workers = min(8, os.cpu_count() or 1)
        set_id = 0
        with futures.ThreadPoolExecutor(workers) as pool:
            window: collections.deque = collections.deque()
            for i, s in enumerate(sets):
                window.append((s, pool.submit(self._load_set, s)))
                while window and (len(window) >= 4 * workers or i == len(sets) - 1):
                    done, loaded = window.popleft()
                    records = self._records(split, done, loaded.result(), set_id)
                    set_id += bool(records)
                    yield from records

    def report(self) -> list[str]:
        """Lines that prepare prints after the counts: notes, skipped sets."""
        return list(self.plan.notes) + skip_report(
            self.skipped, f"set(s) without {MIN_SET_SIZE} usable images")


class AloiInvariance(_RealSets, skip_registration=True):
    """ALOI's viewpoint, illumination direction and colour sets (module doc)."""
    name = "aloi_invariance"
    LAYOUT, TITLE = layouts.ALOI_LAYOUT, "ALOI (Amsterdam Library of Object Images)"
    HOMEPAGE = "https://aloi.science.uva.nl/"

    def __init__(self, *, manual_dir: str | None = None, skip_bad_images: bool = False,
                 aloi_objects: int | None = None, frames_per_set: int | None = None, **kwargs):
        super().__init__(manual_dir=manual_dir, skip_bad_images=skip_bad_images, options={
            "aloi_objects": aloi_objects, "frames_per_set": frames_per_set}, **kwargs)

    def _read_plan(self, aloi_objects, frames_per_set):
        return layouts.aloi(self.manual_dir, aloi_objects, frames_per_set)


class Got10kOcclusion(_RealSets, skip_registration=True):
    """GOT-10k's occlusion sets (module doc)."""
    name = "got10k_occlusion"
    LAYOUT, TITLE = layouts.GOT_LAYOUT, "GOT-10k occlusion"
    HOMEPAGE = "http://got-10k.aitestbed.com/"

    def __init__(self, *, manual_dir: str | None = None, skip_bad_images: bool = False,
                 frames_per_set: int | None = None, max_tracks: int | None = None, **kwargs):
        super().__init__(manual_dir=manual_dir, skip_bad_images=skip_bad_images, options={
            "frames_per_set": GOT_FRAMES if frames_per_set is None else frames_per_set,
            "max_tracks": max_tracks}, **kwargs)

    def _read_plan(self, frames_per_set, max_tracks):
        return layouts.got10k(self.manual_dir, frames_per_set, max_tracks)


class Pascal3dInstance(_RealSets, skip_registration=True):
    """PASCAL3D+'s instance sets (module doc)."""
    name = "pascal3d_instance"
    LAYOUT, TITLE = layouts.PASCAL_LAYOUT, "PASCAL3D+ instance"
    HOMEPAGE = "https://cvgl.stanford.edu/projects/pascal3d.html"

    def __init__(self, *, manual_dir: str | None = None, skip_bad_images: bool = False,
                 frames_per_set: int | None = None, **kwargs):
        super().__init__(manual_dir=manual_dir, skip_bad_images=skip_bad_images,
                         options={"frames_per_set": frames_per_set}, **kwargs)

    def _read_plan(self, frames_per_set):
        return layouts.pascal3d(self.manual_dir, frames_per_set)
