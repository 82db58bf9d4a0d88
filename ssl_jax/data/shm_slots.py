"""Batches from grain worker processes through reused shared memory.

grain's mp_prefetch copies every array a worker yields into a *fresh* shared
memory segment, which the main process unlinks once the array is freed. Fresh
pages are the expensive part, not the copy: each one is faulted in and zeroed,
~1 ms a MB on this project's VMs, 0.8 ms an image for a 512 canvas (25 MB a
batch of 32), against 1.7 ms to decode the JPEG (benchmarks/RESULTS.md).
So a worker here keeps a few segments ("slots") and writes batch after batch
into them; only a small `SlotRef` crosses grain's queue, and the main process
maps the slot once and hands out arrays that view it. When the last view of
such an array is gone, the main process flags the slot free and the worker
writes into it again.

    worker:  writer = process_writer()                    # one per worker process
             image = writer.empty((b, H, W, C), np.uint8)  # decode into it
             sent = writer.send({"image": image, ...})    # image: a small SlotRef
    main:    batch = SlotReader()(sent)  # batch["image"]: a (b, H, W, C) view, no copy

A slot's first byte is its flag (BUSY while the main process may read it). The
main process writes it after its last read of the slot (the arrays' finalizer),
the worker reads it before writing: on x86 that order holds (stores are not
reordered with earlier loads); on weakly ordered CPUs it rests on the finalizer
running long after the last read (Python has no memory fence to put there).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import weakref
from multiprocessing import shared_memory
from multiprocessing import util as mp_util

import numpy as np

from ssl_jax.errors import UserError

_HEADER = 64  # the flag byte, then padding: the array starts 64-byte aligned
_FREE, _BUSY = 0, 1


@dataclasses.dataclass(frozen=True)
class SlotRef:
    """An array in a worker's slot: what crosses the process boundary."""
    name: str
    shape: tuple[int, ...]
    dtype: str


class SlotWriter:
    """The worker's side: arrays in reused shared-memory slots.

    A slot is reused once the main process has freed every array viewing it;
    batches it never received (dropped when an iterator is restored) keep theirs
    busy, so past `max_slots` arrays are ordinary ones (grain then sends them its
    own way) rather than the slots growing without bound. The slots are unlinked
    when the worker process exits (the main process's mappings stay valid).
    """

    def __init__(self, max_slots: int = 16):
        self.max_slots = max_slots
        self._slots: list[shared_memory.SharedMemory] = []
        self._lent: dict[int, shared_memory.SharedMemory] = {}  # array address -> slot
        # The reading thread may still be running when the process exits: the lock
        # keeps it from creating a slot after they are unlinked.
        self._lock, self._closed = threading.Lock(), False
        # multiprocessing's exit hook: worker processes end in os._exit (no atexit).
        mp_util.Finalize(self, self.close, exitpriority=10)

    def empty(self, shape, dtype) -> np.ndarray:
        """An uninitialised array in a free slot (an ordinary one when none can be had)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        lent = list(self._lent.values())
        slot = next((s for s in self._slots if s.buf[0] == _FREE
                     and s.size >= _HEADER + nbytes and s not in lent), None)
        if slot is None:
            with self._lock:
                if self._closed or len(self._slots) >= self.max_slots:
                    return np.empty(shape, dtype)
                slot = shared_memory.SharedMemory(create=True, size=_HEADER + nbytes)
                _reserve(slot)
                self._slots.append(slot)
        array = np.ndarray(shape, dtype, buffer=slot.buf, offset=_HEADER)
        self._lent[array.ctypes.data] = slot
        return array

    def send(self, batch: dict, keys=("image", "key_image")) -> dict:
        """The batch to send: its `keys` arrays as SlotRefs (see `ref`); slots lent
        for arrays it does not hold are taken back (their batch went another way,
        e.g. a corrupt record's)."""
        out = {k: self.ref(v) if k in keys else v for k, v in batch.items()}
        self._lent.clear()
        return out

    def ref(self, array: np.ndarray) -> SlotRef | np.ndarray:
        """What to send for `array`: a SlotRef when `empty` lent it (or, for any other
        array, its copy in a slot); the array itself when no slot can be had."""
        slot = self._lent.pop(array.ctypes.data, None) if array.flags.c_contiguous else None
        if slot is None:
            copy = self.empty(array.shape, array.dtype)
            slot = self._lent.pop(copy.ctypes.data, None)
            if slot is None:
                return array
            copy[...] = array
        slot.buf[0] = _BUSY
        return SlotRef(slot.name, tuple(array.shape), array.dtype.str)

    def close(self) -> None:
        """Unlinks the slots (at the process's exit; the main process's mappings of
        them stay valid) and makes no more."""
        with self._lock:
            self._closed = True
            for slot in self._slots:
                try:
                    slot.unlink()
                except FileNotFoundError:
                    pass
            self._slots = []


def _reserve(slot: shared_memory.SharedMemory) -> None:
    """Allocates the slot's pages now, so that a full /dev/shm (a container's 64 MB
    default) is an error naming the fix, not a SIGBUS at the first write."""
    path = os.path.join("/dev/shm", slot.name)
    if not os.path.exists(path):  # not Linux: the pages come at the first write
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, slot.size)
    except OSError as e:
        slot.unlink()
        free = shutil.disk_usage("/dev/shm").free
        raise UserError(
            f"Shared memory is full: a batch of {slot.size / 2**20:.0f} MB from a grain "
            f"worker process does not fit in /dev/shm ({free / 2**20:.0f} MB free; {e}). "
            "Give the container more (docker run --shm-size=16g), or read with fewer "
            "processes or smaller batches per host (config.data.worker_count, "
            "config.batch_size).") from e
    finally:
        os.close(fd)


_WRITER: SlotWriter | None = None


def process_writer() -> SlotWriter:
    """This process's SlotWriter (a worker process reads with one thread)."""
    global _WRITER
    if _WRITER is None:
        _WRITER = SlotWriter()
    return _WRITER


def _release(slot: shared_memory.SharedMemory) -> None:
    slot.buf[0] = _FREE


class SlotReader:
    """The main process's side: SlotRef -> an array viewing the slot, mapped once per
    slot; the slot is freed for the worker when the array and all its views are gone."""

    def __init__(self):
        self._open: dict[str, shared_memory.SharedMemory] = {}

    def __call__(self, batch: dict) -> dict:
        """A batch as sent -> its SlotRefs opened (arrays viewing the slots)."""
        return {k: self.open(v) if isinstance(v, SlotRef) else v for k, v in batch.items()}

    def open(self, ref: SlotRef) -> np.ndarray:
        slot = self._open.get(ref.name)
        if slot is None:
            slot = self._open[ref.name] = shared_memory.SharedMemory(ref.name)
        array = np.ndarray(ref.shape, np.dtype(ref.dtype), buffer=slot.buf, offset=_HEADER)
        weakref.finalize(array, _release, slot)
        return array
