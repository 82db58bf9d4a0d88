"""Prepared TFDS datasets as random-access sources, and reading batches of records.

    src = open_source("fashion_mnist", "train", data_dir)  # decoded in memory if small
    batch = read_batch(src, [0, 5, 7])  # {"image": (3, H, W, C) uint8, "label", "index"}

Nothing here knows a particular dataset: any TFDS dataset with `image` and
`label` features prepared with file_format="array_record" (fashion_mnist,
cifar10, imagenet2012, ...) reads the same way. A small split is decoded into
memory once (`ArraySource`); a large one is read lazily, record by record
(`CheckedSource`, which names an unreadable record or skips it). Images of
varying size (imagenet2012, image folders) are read as their encoded bytes and
decoded by a policy of data/decode.py (`DecodedSource`): whole onto a canvas for
training (batches then carry "image_hw"), or the eval centre crop.

Records are read a batch of indices at a time: array_record's `__getitems__`
on a list costs several times less per record than `__getitem__`.
"""
from __future__ import annotations

import dataclasses
import logging as py_logging
import os
import time
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from ssl_jax.errors import UserError

MEMORY_LIMIT = 2 * 2**30  # decoded bytes; splits at most this big are held in memory
_CHUNK = 1024  # records per read when decoding a split into memory


class _QuietTfds(py_logging.Filter):
    """Drops two TFDS warnings that ask nothing of the user, keeping every other one:
    OpenCV is missing (images decode with PIL here, on purpose), and a version folder
    without dataset_info.json (logged whenever TFDS looks for a dataset not prepared
    yet; DatasetNotFoundError then names the fix, in one line)."""
    NOISE = ("OpenCV is not installed", "Variant folder %s has no %s")

    def filter(self, record) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.NOISE))


# TFDS logs through absl's Python logger, for every reader (train, evaluate) and builder.
_ABSL_LOGGER = py_logging.getLogger("absl")
if not any(isinstance(f, _QuietTfds) for f in _ABSL_LOGGER.filters):
    _ABSL_LOGGER.addFilter(_QuietTfds())

# What follows `python -m ssl_jax.prepare --dataset NAME --data_dir D` for each dataset
# the prepare command makes, and a note on its download. This layer may not import the
# builders (DESIGN.md): tests/test_prepare_cli.py checks this against their registry.
_CIFAR = ("(offline: add --manual_dir DIR, DIR holding {0}-python.tar.gz or "
          "{0}-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)")
_UNPACKED = (" --manual_dir DIR", "(DIR: the benchmark's download, unpacked)")
PREPARE_ARGS = {
    "fashion_mnist": ("", "(from `apt-get install dataset-fashion-mnist`, or add "
                          "--manual_dir DIR holding its IDX files)"),
    "cifar10": ("", _CIFAR.format("cifar-10")),
    "cifar100": ("", _CIFAR.format("cifar-100")),
    "imagenet2012": (" --manual_dir DIR", "(DIR holding ILSVRC2012_img_train.tar and "
                     "ILSVRC2012_img_val.tar from https://image-net.org/download-images)"),
    "aloi_invariance": _UNPACKED, "got10k_occlusion": _UNPACKED,
    "pascal3d_instance": _UNPACKED, "got10k_videos": _UNPACKED,
    "fashion_mnist_videos": ("", "(from the prepared fashion_mnist)"),
}
INVARIANCE_SUFFIX = "_invariance"  # invariance_sets --source S makes S_invariance


def prepare_command(dataset: str, data_dir: str, known_to_tfds: bool = True) -> str:
    """How to prepare `dataset` in data_dir: a sentence naming a command that does."""
    name = dataset.split(":")[0]
    here = f"python -m ssl_jax.prepare --dataset {{}} --data_dir {data_dir}"
    if name in PREPARE_ARGS:
        args, note = PREPARE_ARGS[name]
        return f"Prepare it with `{here.format(name)}{args}` {note}."
    if name.endswith(INVARIANCE_SUFFIX):
        source = name[:-len(INVARIANCE_SUFFIX)]
        return (f"Prepare it with `{here.format('invariance_sets')} --source {source}` "
                f"(from the prepared {source}).")
    if known_to_tfds:
        return (f"No builder here makes it; TFDS's own does: `tfds build {name} --data_dir "
                f"{data_dir} --file_format=array_record`.")
    return (f"Neither this project nor TFDS knows a dataset {name!r}: check the name, or, "
            "for a folder of your own images, prepare it with "
            f"`{here.format('image_folder')} --name {name} --manual_dir DIR`.")


class DatasetNotFoundError(UserError):
    """The dataset is not prepared in the data directory."""


class CorruptRecordError(UserError):
    """A record of a prepared dataset cannot be read or decoded."""


def default_data_dir() -> str:
    """TFDS's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _prepared_builder(dataset: str, data_dir: str | None):
    data_dir = data_dir or default_data_dir()
    hint = f"Dataset {dataset!r} is not prepared in {data_dir}."
    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetNotFoundError(f"{hint} {prepare_command(dataset, data_dir, False)}") from e
    # A name TFDS knows gives a builder even with no files behind it; reading
    # would then fail with a misleading file-format error.
    if not builder.is_prepared():
        folder = os.path.join(data_dir, dataset.split(":")[0])
        others = sorted(v for v in (os.listdir(folder) if os.path.isdir(folder) else [])
                        if v[:1].isdigit())
        if others:
            hint = (f"Dataset {dataset!r} version {builder.version} is not prepared in "
                    f"{data_dir} (found version(s) {others} there, which this code does not "
                    "read).")
        raise DatasetNotFoundError(f"{hint} {prepare_command(dataset, data_dir)}")
    return builder, data_dir


def dataset_info(dataset: str, data_dir: str | None = None) -> dict:
    """What the prepared dataset's dataset_info.json says.

    Returns {"num_examples": {split: int}, "image_shape": (H, W, C), None
    where sizes vary, "num_classes": int, "class_names": [str], "features": [the
    feature names]}; num_classes is
    None (and class_names empty) for a dataset without labels or a label
    feature without a class count: pretraining needs none, evaluators refuse.
    """
    info = _prepared_builder(dataset, data_dir)[0].info
    label = info.features["label"] if "label" in info.features else None
    num_classes = getattr(label, "num_classes", None)
    return {
        "num_examples": {name: split.num_examples for name, split in info.splits.items()},
        "image_shape": tuple(info.features["image"].shape),
        "num_classes": num_classes,
        "class_names": list(label.names) if num_classes else [],
        "features": list(info.features),
    }


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
    """A split decoded into memory; a grain random-access source.

    image: (N, H, W, C) uint8; label: (N,) int32; row i is record i of the split,
    or record index[i] when `index` is given (corrupt records were skipped);
    hw: (N, 2) int32, the valid size of each canvas image (DecodedSource with
    ToCanvas), or None.
    """
    image: np.ndarray
    label: np.ndarray
    index: np.ndarray | None = None
    hw: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict:
        out = {"image": self.image[i], "label": self.label[i]}
        if self.hw is not None:
            out["image_hw"] = self.hw[i]
        return out

    def __getitems__(self, ix: Sequence[int]) -> list[dict]:
        return [self[i] for i in ix]


@dataclasses.dataclass(frozen=True, eq=False)
class CheckedSource:
    """A lazily read source whose unreadable records raise CorruptRecordError
    naming them, or, with skip, are replaced by a readable record of the same
    read (logged; the batch keeps its shape and the replaced record's index)."""
    src: object
    name: str
    skip: bool = False

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, ix: Sequence[int]) -> list[dict]:
        records, kept = read_records(self.src, list(ix), self.name, self.skip)
        if len(kept) == len(ix):
            return records
        if not records:
            raise CorruptRecordError(f"Every record of {list(ix)[:8]}... of {self.name} is "
                                     "corrupt: re-prepare the dataset.")
        by_index = dict(zip(kept, records))
        return [by_index.get(i, records[0]) for i in ix]

    @property
    def dataset_info(self):
        return self.src.dataset_info


@dataclasses.dataclass(frozen=True, eq=False)
class DecodedSource:
    """Records whose "image" is encoded bytes, decoded by `decode` (a data/decode.py
    policy) into `channels` channels; with a canvas policy each record gains
    "image_hw" (2,) int32. A decoding error raises (CheckedSource, around it,
    names the record)."""
    src: object
    decode: object
    channels: int

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def read_batch(self, ix: Sequence[int], alloc=np.empty
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Records ix -> (images (b, ...) uint8 decoded into one buffer from
        alloc(shape, dtype), labels (b,), and image_hw (b, 2) int32 or None):
        read_batch's path, no array an image."""
        records = self.src.__getitems__(list(ix))
        images, hw = self.decode.decode_batch([r["image"] for r in records], self.channels,
                                              alloc)
        return images, np.array([r["label"] for r in records]), hw

    def __getitems__(self, ix: Sequence[int]) -> list[dict]:
        out = []
        for r in self.src.__getitems__(list(ix)):
            image, hw = self.decode(r["image"], self.channels)
            r = dict(r, image=image)
            if hw is not None:
                r["image_hw"] = np.asarray(hw, np.int32)
            out.append(r)
        return out

    @property
    def dataset_info(self):
        return self.src.dataset_info


def read_records(src, ix: list[int], name: str, skip: bool) -> tuple[list[dict], list[int]]:
    """Reads records ix of a random-access source -> (records, the indices read).

    When the batched read fails, records are re-read one by one to find the bad
    ones: each raises CorruptRecordError naming it and the fix, or, with skip,
    is left out (logged).
    """
    try:
        return src.__getitems__(ix), ix
    except Exception:  # noqa: BLE001 -- find which record it was
        pass
    records, kept = [], []
    for i in ix:
        try:
            records.append(src[i])
            kept.append(i)
        except Exception as e:  # noqa: BLE001 -- any reader or decoder error
            if not skip:
                raise CorruptRecordError(
                    f"Record {i} of {name} cannot be read: {type(e).__name__}: {e}. The prepared "
                    "files are damaged: delete the dataset's folder and prepare it again "
                    "(python -m ssl_jax.prepare), or set --config.data.skip_corrupt=True "
                    "to skip unreadable records.") from e
            logging.warning("Skipping corrupt record %d of %s (%s: %s).", i, name,
                            type(e).__name__, e)
    return records, kept


def open_source(dataset: str, split: str, data_dir: str | None = None, *,
                memory_limit: int = MEMORY_LIMIT, skip_corrupt: bool = False, decode=None):
    """A grain random-access source over one split of a prepared TFDS dataset.

    A split whose decoded images take at most `memory_limit` bytes is decoded
    once into an ArraySource; a bigger one is read lazily from array_record
    (memory_limit=0: always lazily). `split` takes TFDS's slicing syntax too
    ("train[:10%]"). decode: how images of varying size are decoded (a
    data/decode.py policy: ToCanvas for training, CenterCrop for evaluation);
    required for such a dataset, ignored for one whose images are all one size.
    Raises DatasetNotFoundError (a ValueError) naming the command that prepares it,
    and CorruptRecordError naming an unreadable record (skip_corrupt: skip it).
    """
    builder, data_dir = _prepared_builder(dataset, data_dir)
    name = f"{dataset} {split} in {data_dir}"
    shape = builder.info.features["image"].shape
    if None in shape[:2]:  # read the encoded bytes; the policy decodes them
        if decode is None:
            raise ValueError(f"The images of {dataset} vary in size: open_source needs a "
                             "decode policy (data/decode.py).")
        channels = shape[-1] or 3
        raw = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False,
                               decoders={"image": tfds.decode.SkipDecoding()})
        src, per_image = DecodedSource(raw, decode, channels), decode.decoded_bytes(channels)
    else:
        src = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
        per_image = int(np.prod(shape))
    if len(src) * per_image > memory_limit:
        return CheckedSource(src, name, skip_corrupt)
    t = time.perf_counter()
    mem = load_into_memory(src, name, skip_corrupt)
    logging.info("Decoded %s %s into memory: %s in %.1f s.", dataset, split,
                 mem.image.shape, time.perf_counter() - t)
    return mem


def column(dataset: str, split: str, data_dir: str | None, feature: str) -> np.ndarray:
    """(N,) the scalar `feature` of every record of a split, in record order, read
    without decoding images (e.g. the set_id of transformation sets)."""
    builder, data_dir = _prepared_builder(dataset, data_dir)
    if feature not in builder.info.features:
        raise UserError(f"{dataset} has no {feature!r} feature (it has "
                        f"{', '.join(builder.info.features)}).")
    src = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False,
                           decoders={"image": tfds.decode.SkipDecoding()})
    return np.array([r[feature] for i in range(0, len(src), _CHUNK)
                     for r in src.__getitems__(list(range(i, min(i + _CHUNK, len(src)))))])


def load_into_memory(src, name: str = "the source", skip_corrupt: bool = False) -> ArraySource:
    """Decodes every record of a random-access source, in order; unreadable
    records raise CorruptRecordError, or are left out with skip_corrupt (the
    ArraySource's `index` then maps rows to record indices)."""
    parts, kept = [], []
    for i in range(0, len(src), _CHUNK):
        records, ix = read_records(src, list(range(i, min(i + _CHUNK, len(src)))), name,
                                   skip_corrupt)
        if records:
            parts.append(read_batch(_Records(records), np.arange(len(records))))
        kept += ix
    if len(kept) < len(src):
        logging.warning("%d corrupt records of %s skipped.", len(src) - len(kept), name)
    if not parts:
        raise CorruptRecordError(f"No record of {name} can be read: re-prepare the dataset.")
    return ArraySource(image=np.concatenate([p["image"] for p in parts]),
                       label=np.concatenate([p["label"] for p in parts]),
                       index=None if len(kept) == len(src) else np.asarray(kept, np.int32),
                       hw=(np.concatenate([p["image_hw"] for p in parts])
                           if "image_hw" in parts[0] else None))


@dataclasses.dataclass(frozen=True)
class _Records:
    """Records already read, as a random-access source (so read_batch stacks them)."""
    records: list

    def __len__(self) -> int:
        return len(self.records)

    def __getitems__(self, ix) -> list[dict]:
        return [self.records[i] for i in ix]


def read_batch(src, ix, alloc=np.empty) -> dict:
    """Reads records ix (b,) of a random-access source.

    Returns {"image": (b, H, W, C) uint8, "label": (b,) int32, "index": (b,)
    int32}, and "image_hw": (b, 2) int32 for canvas images (DecodedSource with
    ToCanvas). Decoded images go into alloc(shape, dtype) (a worker's
    shared-memory slot, data/shm_slots.py); other paths make their own array.
    """
    ix = np.asarray(ix, np.int64)
    out = {}
    # Encoded images decoded straight into the batch; a record that fails goes the
    # one-by-one way below, where CheckedSource names it (or skips it).
    decoded = src.src if isinstance(src, CheckedSource) else src
    if isinstance(decoded, DecodedSource) and len(ix):
        try:
            images, labels, hw = decoded.read_batch(ix.tolist(), alloc)
        except Exception:  # noqa: BLE001 -- a bad record: found and named below
            if decoded is src:
                raise
        else:
            if hw is not None:
                out["image_hw"] = hw
            return {"image": images, "label": labels.astype(np.int32, copy=False),
                    "index": ix.astype(np.int32), **out}
    if isinstance(src, ArraySource):
        images, labels = src.image[ix], src.label[ix]
        if src.hw is not None:
            out["image_hw"] = src.hw[ix]
        if src.index is not None:
            ix = src.index[ix]
    else:
        records = src.__getitems__(ix.tolist())
        # The channel axis stays even for features stored without one.
        images = [r["image"].reshape(r["image"].shape[:2] + (-1,)) for r in records]
        if len({im.shape for im in images}) > 1:
            raise ValueError("Images of different sizes in one batch: open the source "
                             "with a decode policy (data/decode.py).")
        images = np.stack(images)
        labels = np.array([r["label"] for r in records])
        if records and "image_hw" in records[0]:
            out["image_hw"] = np.stack([r["image_hw"] for r in records]).astype(np.int32)
    return {"image": images.astype(np.uint8, copy=False),
            "label": labels.astype(np.int32, copy=False),
            "index": ix.astype(np.int32), **out}
