"""Reading prepared TFDS datasets for training and evaluation, with grain.

    src = open_source("fashion_mnist", "train", data_dir)  # decoded in memory if small
    it = train_iterator(src, global_batch_size=256, seed=0,
                        process_index=jax.process_index(),
                        process_count=jax.process_count())
    batch = next(it)  # {"image": (b, H, W, C) uint8, "label": (b,) int32, "index": (b,) int32}

Nothing here knows a particular dataset: any TFDS dataset with `image` and
`label` features prepared with file_format="array_record" (fashion_mnist,
cifar10, imagenet2012, ...) reads the same way.

Records are read a batch of indices at a time: array_record's `__getitems__`
on a list costs several times less per record than `__getitem__`, and
grain's `batch` does not push reads down to `__getitems__`, so the pipeline
batches indices first and then reads them.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Iterator, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging
from PIL import Image

MEMORY_LIMIT = 2 * 2**30  # decoded bytes; splits at most this big are held in memory
_CHUNK = 1024  # records per read when decoding a split into memory


class DatasetNotFoundError(ValueError):
    """The dataset is not prepared in the data directory."""


class CorruptRecordError(ValueError):
    """A record of a prepared dataset cannot be read or decoded."""


def default_data_dir() -> str:
    """TFDS's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _prepared_builder(dataset: str, data_dir: str | None):
    data_dir = data_dir or default_data_dir()
    hint = (f"Dataset {dataset!r} is not prepared in {data_dir}. Prepare it with "
            f"`python -m ssl_jax.data.prepare --dataset {dataset} --data_dir {data_dir}`.")
    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetNotFoundError(hint) from e
    # A name TFDS knows gives a builder even with no files behind it; reading
    # would then fail with a misleading file-format error.
    if not builder.is_prepared():
        folder = os.path.join(data_dir, dataset.split(":")[0])
        others = sorted(v for v in (os.listdir(folder) if os.path.isdir(folder) else [])
                        if v[:1].isdigit())
        if others:
            hint = (f"Dataset {dataset!r} version {builder.version} is not prepared in "
                    f"{data_dir} (found version(s) {others} there, which this code does not "
                    f"read). Prepare it with `python -m ssl_jax.data.prepare --dataset "
                    f"{dataset} --data_dir {data_dir}`.")
        raise DatasetNotFoundError(hint)
    return builder, data_dir


def dataset_info(dataset: str, data_dir: str | None = None) -> dict:
    """What the prepared dataset's dataset_info.json says.

    Returns {"num_examples": {split: int}, "image_shape": (H, W, C), None
    where sizes vary, "num_classes": int, "class_names": [str]}; num_classes is
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
    }


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
    """A split decoded into memory; a grain random-access source.

    image: (N, H, W, C) uint8; label: (N,) int32; row i is record i of the split,
    or record index[i] when `index` is given (corrupt records were skipped).
    """
    image: np.ndarray
    label: np.ndarray
    index: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image[i], "label": self.label[i]}

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
                    "(python -m ssl_jax.data.prepare), or set --config.data.skip_corrupt=True "
                    "to skip unreadable records.") from e
            logging.warning("Skipping corrupt record %d of %s (%s: %s).", i, name,
                            type(e).__name__, e)
    return records, kept


def open_source(dataset: str, split: str, data_dir: str | None = None, *,
                memory_limit: int = MEMORY_LIMIT, skip_corrupt: bool = False):
    """A grain random-access source over one split of a prepared TFDS dataset.

    A split whose decoded images take at most `memory_limit` bytes is decoded
    once into an ArraySource; a bigger one, or one whose image sizes vary, is
    read lazily from array_record (memory_limit=0: always lazily). `split`
    takes TFDS's slicing syntax too ("train[:10%]").
    Raises DatasetNotFoundError (a ValueError) naming the command that prepares it,
    and CorruptRecordError naming an unreadable record (skip_corrupt: skip it).
    """
    _, data_dir = _prepared_builder(dataset, data_dir)
    src = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
    name = f"{dataset} {split} in {data_dir}"
    shape = src.dataset_info.features["image"].shape
    if None in shape or len(src) * int(np.prod(shape)) > memory_limit:
        return CheckedSource(src, name, skip_corrupt)
    t = time.perf_counter()
    mem = load_into_memory(src, name, skip_corrupt)
    logging.info("Decoded %s %s into memory: %s in %.1f s.", dataset, split,
                 mem.image.shape, time.perf_counter() - t)
    return mem


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
                       index=None if len(kept) == len(src) else np.asarray(kept, np.int32))


@dataclasses.dataclass(frozen=True)
class _Records:
    """Records already read, as a random-access source (so read_batch stacks them)."""
    records: list

    def __len__(self) -> int:
        return len(self.records)

    def __getitems__(self, ix) -> list[dict]:
        return [self.records[i] for i in ix]


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    """(h, w, C) -> (size, size, C): shorter side resized to `size`, centre crop."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    nh, nw = max(size, round(h * size / min(h, w))), max(size, round(w * size / min(h, w)))
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize((nw, nh), Image.BILINEAR)).reshape(nh, nw, -1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[top:top + size, left:left + size]


def read_batch(src, ix, image_size: int | None = None) -> dict:
    """Reads records ix (b,) of a random-access source.

    Returns {"image": (b, H, W, C) uint8, "label": (b,) int32, "index": (b,)
    int32}. With image_size, every image is resized (shorter side) and
    centre-cropped to (image_size, image_size): for datasets whose sizes vary.
    """
    ix = np.asarray(ix, np.int64)
    if isinstance(src, ArraySource):
        images, labels = src.image[ix], src.label[ix]
        if src.index is not None:
            ix = src.index[ix]
        if image_size is not None and images.shape[1:3] != (image_size, image_size):
            images = np.stack([_fit(im, image_size) for im in images])
    else:
        records = src.__getitems__(ix.tolist())
        # The channel axis stays even for features stored without one.
        images = [r["image"].reshape(r["image"].shape[:2] + (-1,)) for r in records]
        if image_size is not None:
            images = [_fit(im, image_size) for im in images]
        if len({im.shape for im in images}) > 1:
            raise ValueError("Images of different sizes in one batch: pass image_size "
                             "to bring them to one size.")
        images = np.stack(images)
        labels = np.array([r["label"] for r in records])
    return {"image": images.astype(np.uint8, copy=False),
            "label": labels.astype(np.int32, copy=False),
            "index": ix.astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class _Reader:
    """indices -> batch; a picklable class so pipelines can go to worker processes."""
    src: object
    image_size: int | None = None

    def __call__(self, ix: np.ndarray) -> dict:
        return read_batch(self.src, ix, self.image_size)


def _local_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"Global batch size {global_batch_size} must be a positive "
                         f"multiple of the process count {process_count}.")
    return global_batch_size // process_count


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, process_index: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng((seed, process_index, epoch)).permutation(n)


@dataclasses.dataclass(frozen=True)
class _ShuffledBatches:
    """Step -> the split indices of that step's batch on one process.

    The process's shard is p, p + P, p + 2P, ... (n of them); each epoch is a
    fresh permutation of it, cut into whole batches. A pure function of the
    step, so grain's iterator state (the next step) is all a checkpoint needs.
    """
    seed: int
    process_index: int
    process_count: int
    n: int
    b: int

    def __call__(self, step: int, _) -> np.ndarray:
        epoch, k = divmod(step, self.n // self.b)
        perm = _permutation(self.seed, self.process_index, epoch, self.n)
        return self.process_index + self.process_count * perm[k * self.b:(k + 1) * self.b]


def train_iterator(source, *, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   worker_count: int = 0, image_size: int | None = None
                   ) -> grain.DatasetIterator:
    """An endless, shuffled, checkpointable iterator over this process's batches.

    Process p reads its own shard, examples p, p + P, p + 2P, ... (P =
    process_count; n = len(source) // P of them, so that all processes have
    the same number of batches per epoch). Every epoch is a new permutation
    of the shard, seeded by (seed, p, epoch), cut into whole batches; each
    epoch's remainder is dropped, so no batch mixes two epochs.

    Yields {"image": (b, H, W, C) uint8, "label": (b,) int32, "index": (b,)
    int32} with b = global_batch_size // process_count; `index` is the
    example's index in the split. The iterator has get_state()/set_state()
    and works with grain.checkpoint.CheckpointSave/CheckpointRestore.
    worker_count > 0 reads in that many worker processes (spawned: a script
    needs an `if __name__ == "__main__":` guard).
    """
    b = _local_batch(global_batch_size, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    n = len(source) // process_count
    if n < b:
        raise ValueError(f"A shard of {n} examples cannot fill a batch of {b}.")
    # Not grain's shuffle + batch: that computes each index's place in Python
    # (~20 us apiece), 5x the cost of reading an in-memory batch. One numpy
    # permutation per epoch, looked up by step, does the same job.
    ds = (grain.MapDataset.range(n // b)
          .repeat()
          .map_with_index(_ShuffledBatches(seed, process_index, process_count, n, b))
          .map(_Reader(source, image_size)))
    # One reader thread overlaps reading with the training step; more threads
    # fight over the GIL (decoding is mostly Python) and slow reading down.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
    if worker_count > 0:
        # grain's worker start-up reads absl flags; outside app.run (notebooks,
        # plain scripts, tests) they are unparsed and it would raise.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it)


def eval_batches(source, batch_size: int, process_index: int = 0,
                 process_count: int = 1, *, num_examples: int | None = None,
                 image_size: int | None = None) -> Iterator[dict]:
    """The first num_examples (default: all) of the split once, in order, in fixed-shape batches.

    batch_size is global, like train_iterator's. Global batch s holds
    examples [s * batch_size, (s + 1) * batch_size), process p its slice p of
    b = batch_size // process_count rows, so the global batches, rows in
    process order, run through the split in order; every process gets the
    same number of batches (hosts stay in step). Yields {"image": (b, H, W,
    C) uint8, "label": (b,) int32, "index": (b,) int32, "mask": (b,) bool};
    padding rows have mask False, zero image and label, and index -1.
    """
    b = _local_batch(batch_size, process_count)
    n = len(source) if num_examples is None else min(num_examples, len(source))
    # Shapes for batches with no real rows, read once from a real record.
    like = {k: v[:0] for k, v in read_batch(source, [0], image_size).items()} if n else {}

    def batch(step: int) -> dict:
        first = step * batch_size + process_index * b
        ix = np.arange(first, min(n, first + b))
        out = read_batch(source, ix, image_size) if len(ix) else dict(like)
        pad = b - len(ix)
        out = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in out.items()}
        out["index"][len(ix):] = -1
        out["mask"] = np.arange(b) < len(ix)
        return out

    ds = grain.MapDataset.range(-(-n // batch_size)).map(batch)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
