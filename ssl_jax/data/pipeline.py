"""Batches of a prepared dataset for training and evaluation, with grain.

    src = sources.open_source("fashion_mnist", "train", data_dir)
    it = train_iterator(src, global_batch_size=256, seed=0,
                        process_index=jax.process_index(),
                        process_count=jax.process_count())
    batch = next(it)  # {"image": (b, H, W, C) uint8, "label": (b,) int32, "index": (b,) int32}

grain's `batch` does not push reads down to array_record's `__getitems__`, so
the iterators batch indices first and then read them (sources.read_batch).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator

import grain
import numpy as np
from absl import flags

from ssl_jax.data import shm_slots
from ssl_jax.data.sources import ArraySource, read_batch
from ssl_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class _Reader:
    """indices -> batch; a picklable class so pipelines can go to worker processes.
    to_slots: in a grain worker, the images are decoded into (and sent as) reused
    shared memory (shm_slots)."""
    src: object
    to_slots: bool = False

    def __call__(self, ix: np.ndarray) -> dict:
        alloc, send = _transport(self.to_slots)
        return send(read_batch(self.src, ix, alloc))


def _transport(to_slots: bool):
    """-> (alloc(shape, dtype) for the decoded images, send(batch) -> what to yield):
    this worker's shared-memory slots, or ordinary arrays as they are."""
    if not to_slots:
        return np.empty, lambda batch: batch
    writer = shm_slots.process_writer()
    return writer.empty, writer.send


def _local_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise UserError(f"Global batch size {global_batch_size} must be a positive "
                        f"multiple of the process count {process_count}.")
    return global_batch_size // process_count


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    # (seed, 0, epoch): the stream a single process has always used, so one-process
    # runs (and their recorded numbers) keep their exact data order.
    return np.random.default_rng((seed, 0, epoch)).permutation(n)


@dataclasses.dataclass(frozen=True)
class _ShuffledBatches:
    """Step -> the split indices of that step's batch on one process.

    Every epoch is one permutation of the whole split, the same on every
    process, cut into global batches of B = b * process_count; process p reads
    rows [p * b, (p + 1) * b) of each. So the global batch of a step does not
    depend on how many processes read it (a 2-host run sees the batches of a
    1-host run), and each process reads only its own rows. A pure function of
    the step: grain's iterator state (the next step) is all a checkpoint needs.
    """
    seed: int
    process_index: int
    process_count: int
    n: int
    b: int

    def __call__(self, step: int) -> np.ndarray:
        return self.global_rows(step)[self.local]

    @property
    def local(self) -> slice:
        """This process's rows of a global batch."""
        return slice(self.process_index * self.b, (self.process_index + 1) * self.b)

    def global_rows(self, step: int) -> np.ndarray:
        """(B,) the split indices of the whole global batch of `step`."""
        global_b = self.b * self.process_count
        epoch, k = divmod(step, self.n // global_b)
        return _permutation(self.seed, epoch, self.n)[k * global_b:(k + 1) * global_b]


@dataclasses.dataclass(frozen=True)
class _PairedBatches:
    """Step -> this process's query records and their keys (video positives).

    The epochs permute the records that can be queries (sampler.queries); each
    global batch's keys are drawn whole (sampler.draw) and then sliced, so the pairs
    do not depend on the process count either. A pure function of the step.
    """
    batches: _ShuffledBatches
    sampler: object  # video_pairs.PairSampler

    def __call__(self, step: int) -> dict:
        drawn = self.sampler.draw(self.sampler.queries[self.batches.global_rows(step)], step)
        return {k: v[self.batches.local] for k, v in drawn.items()}


@dataclasses.dataclass(frozen=True)
class _PairReader:
    """{"query", "key" (, "context")} -> the query records' batch, with "key_image",
    "key_index" (and "key_image_hw" for canvases) beside "image" and "index"; region
    positives crop both (sampler.crops)."""
    src: object
    sampler: object
    to_slots: bool = False  # as _Reader's

    def __call__(self, drawn: dict) -> dict:
        alloc, send = _transport(self.to_slots)
        out = read_batch(self.src, drawn["query"], alloc)
        key = read_batch(self.src, drawn["key"], alloc)
        if "context" in drawn:  # the same object in both: crops of fixed size, no canvas
            for batch, rows in ((out, drawn["query"]), (key, drawn["key"])):
                batch["image"] = self.sampler.crops(batch["image"], rows, drawn["context"],
                                                    batch.pop("image_hw", None))
        out["key_image"], out["key_index"] = key["image"], key["index"]
        if "image_hw" in key:
            out["key_image_hw"] = key["image_hw"]
        return send(out)


def worker_count(setting, source) -> int:
    """config.data.worker_count -> how many grain worker processes read `source`.

    "auto": none for a split held in memory (a batch is one gather) or on 2 cores
    or fewer (there a worker shares the cores with the training step and reads
    slower than the main process does, benchmarks/RESULTS.md); else one per core
    this process may use (its CPU affinity: SLURM's --cpus-per-task), less one for
    the main process, at most 32 (~500 ImageNet images/s each, RESULTS.md).
    """
    if setting == "auto":
        if isinstance(source, ArraySource):
            return 0
        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count() or 1)
        return 0 if cores <= 2 else min(cores - 1, 32)
    try:
        n = int(setting)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise UserError(f"config.data.worker_count={setting!r}: use 'auto' or a number "
                        "of reading processes (0: read in the main process).")
    return n


def train_iterator(source, *, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   worker_count: int = 0, pairs=None) -> grain.DatasetIterator:
    """An endless, shuffled, checkpointable iterator over this process's batches.

    Every epoch is a new permutation of the split, seeded by (seed, epoch) and
    the same on every process, cut into whole global batches (each epoch's
    remainder is dropped, so no batch mixes two epochs); process p of P reads
    rows [p * b, (p + 1) * b) of each global batch. The global batches are
    therefore the same for any process count.

    Yields {"image": (b, H, W, C) uint8, "label": (b,) int32, "index": (b,)
    int32} (and "image_hw" (b, 2) for canvas images, sources.read_batch) with
    b = global_batch_size // process_count; `index` is the example's index in
    the split. pairs: a video_pairs.PairSampler (video positives): the epochs run
    over its query frames, and each batch also holds "key_image" (b, H, W, C), each
    query's key frame, and "key_index" (b,) its record (region positives: both
    images cropped to the object, (b, R, R, C)).
    The iterator has get_state()/set_state()
    and works with grain.checkpoint.CheckpointSave/CheckpointRestore.
    worker_count > 0 reads in that many worker processes (spawned: a script
    needs an `if __name__ == "__main__":` guard).
    """
    b = _local_batch(global_batch_size, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    n = len(source) if pairs is None else len(pairs.queries)
    if n < global_batch_size:
        raise UserError(f"A split of {n} examples cannot fill a batch of {global_batch_size}.")
    # Not grain's shuffle + batch: that computes each index's place in Python
    # (~20 us apiece), 5x the cost of reading an in-memory batch. One numpy
    # permutation per epoch, looked up by step, does the same job.
    batches = _ShuffledBatches(seed, process_index, process_count, n, b)
    if pairs is not None:
        batches = _PairedBatches(batches, pairs)
    reader = (_Reader(source, worker_count > 0) if pairs is None
              else _PairReader(source, pairs, worker_count > 0))
    return _StepIterator(functools.partial(_batches_from, batches, reader, worker_count))


def _batches_from(batches, reader, worker_count: int, step: int) -> grain.DatasetIterator:
    """grain's iterator over the batches of steps step, step + 1, ..."""
    ds = grain.MapDataset.range(step, _ENDLESS).map(batches).map(reader)
    # One reader thread overlaps reading with the training step; more threads
    # fight over the GIL (decoding is mostly Python) and slow reading down.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
    if worker_count > 0:
        # The images come through shm_slots; the small arrays (labels, indices) are
        # cheaper pickled than in a shared-memory segment of their own each, which
        # the main process would also leave behind at exit while it holds the batch.
        it = grain.experimental.WithOptionsIterDataset(
            it, grain.experimental.DatasetOptions(min_shm_size=1 << 20))
        # grain's worker start-up reads absl flags; outside app.run (notebooks,
        # plain scripts, tests) they are unparsed and it would raise.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
        it = it.map(shm_slots.SlotReader())
    return iter(it)


_ENDLESS = 2**62  # steps: "repeat forever" for a range


class _StepIterator(grain.DatasetIterator):
    """The batches step by step; its state is the next step.

    grain's own iterator states differ with the worker count (one per worker), so
    a checkpoint would only restore into the worker count that wrote it; the
    batches here are a pure function of the step, so the step is the whole state
    and a run may resume with any worker count (config.data.worker_count "auto"
    differs between machines). grain's iterator is made at the first batch, from
    the step restored, so a restore starts no worker processes in vain.
    """

    def __init__(self, make):
        super().__init__()
        self._make, self._step, self._it = make, 0, None

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._make(self._step)
        batch = next(self._it)
        self._step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self._step}

    def set_state(self, state: dict) -> None:
        step = _step_of(state)
        if step != self._step and self._it is not None:
            self._it.close()
            self._it = None
        self._step = step

    def start_prefetch(self) -> None:
        if self._it is None:
            self._it = self._make(self._step)
        self._it.start_prefetch()

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
        super().close()


def _step_of(state: dict) -> int:
    """A data iterator's checkpointed state -> its next step; also the states of
    grain's own iterators that earlier versions saved: one process {"next_index": k},
    worker processes one such state per worker (their elements interleaved)."""
    if "step" in state:
        return int(state["step"])
    if "next_index" in state:
        return int(state["next_index"])
    if "iterators_in_use_states" in state:
        return sum(int(s["next_index"]) for s in state["iterators_in_use_states"])
    raise UserError(f"The checkpoint's data iterator state {state} is not one this version "
                    "reads; resume with the version that wrote it.")


def eval_batches(source, batch_size: int, process_index: int = 0,
                 process_count: int = 1, *, num_examples: int | None = None
                 ) -> Iterator[dict]:
    """The first num_examples (default: all) of the split once, in order, in fixed-shape batches.

    batch_size is global, like train_iterator's. Global batch s holds
    examples [s * batch_size, (s + 1) * batch_size), process p its slice p of
    b = batch_size // process_count rows, so the global batches, rows in
    process order, run through the split in order; every process gets the
    same number of batches (hosts stay in step). Yields {"image": (b, H, W,
    C) uint8, "label": (b,) int32, "index": (b,) int32, "mask": (b,) bool}
    (and "image_hw" for canvas images); padding rows have mask False, zero
    image and label, and index -1.
    """
    b = _local_batch(batch_size, process_count)
    n = len(source) if num_examples is None else min(num_examples, len(source))
    # Shapes for batches with no real rows, read once from a real record.
    like = {k: v[:0] for k, v in read_batch(source, [0]).items()} if n else {}

    def batch(step: int) -> dict:
        first = step * batch_size + process_index * b
        ix = np.arange(first, min(n, first + b))
        out = read_batch(source, ix) if len(ix) else dict(like)
        pad = b - len(ix)
        out = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in out.items()}
        out["index"][len(ix):] = -1
        if "image_hw" in out:  # a padding row's canvas is all valid: no empty crops
            out["image_hw"][len(ix):] = out["image"].shape[1:3]
        out["mask"] = np.arange(b) < len(ix)
        return out

    ds = grain.MapDataset.range(-(-n // batch_size)).map(batch)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
