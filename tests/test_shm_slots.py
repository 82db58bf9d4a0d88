"""data/shm_slots.py: batches through reused shared memory, worker side and main side
in one process (the pipeline tests run them across real grain workers)."""
import gc
import os

import numpy as np
import pytest

from ssl_jax.data import shm_slots


def _fill(array, value):
    array[...] = value
    return array


def test_a_batch_crosses_as_a_small_ref_and_its_slot_is_reused_once_freed():
    writer, reader = shm_slots.SlotWriter(), shm_slots.SlotReader()
    label = np.arange(4)
    sent = writer.send({"image": _fill(writer.empty((4, 8, 8, 3), np.uint8), 7), "label": label})
    assert isinstance(sent["image"], shm_slots.SlotRef) and sent["label"] is label
    got = reader(sent)
    assert got["image"].shape == (4, 8, 8, 3) and (got["image"] == 7).all()
    # While the main process holds the batch (or any view of it), its slot stays busy.
    view = got["image"][1:]
    del got
    gc.collect()
    second = writer.send({"image": _fill(writer.empty((4, 8, 8, 3), np.uint8), 9)})
    assert second["image"].name != sent["image"].name
    assert (view == 7).all()  # not overwritten
    del view
    gc.collect()
    third = writer.send({"image": _fill(writer.empty((4, 8, 8, 3), np.uint8), 5)})
    assert third["image"].name == sent["image"].name  # freed: written again
    assert (reader(third)["image"] == 5).all()
    writer.close()


def test_arrays_the_writer_did_not_lend_are_copied_and_unused_slots_come_back():
    writer, reader = shm_slots.SlotWriter(), shm_slots.SlotReader()
    writer.empty((2, 3), np.float32)  # lent, then the batch went another way
    other = np.arange(6, dtype=np.float32).reshape(2, 3)
    sent = writer.send({"image": other, "key_image": other[:, ::-1]})  # one not contiguous
    np.testing.assert_array_equal(reader(sent)["image"], other)
    np.testing.assert_array_equal(reader(sent)["key_image"], other[:, ::-1])
    gc.collect()
    # Three slots were made (the lent one and two copies); all are free again.
    again = writer.send({"image": _fill(writer.empty((2, 3), np.float32), 1.0)})
    assert again["image"].name in {s.name for s in writer._slots}
    assert len(writer._slots) == 3
    writer.close()


def test_past_max_slots_batches_go_as_ordinary_arrays():
    """Batches the main process never frees (dropped by a restore) must not make the
    worker's shared memory grow without bound."""
    writer, reader = shm_slots.SlotWriter(max_slots=2), shm_slots.SlotReader()
    held = [reader(writer.send({"image": _fill(writer.empty((3,), np.int32), i)}))
            for i in range(4)]
    assert [h["image"].tolist() for h in held] == [[i] * 3 for i in range(4)]
    assert len(writer._slots) == 2
    plain = writer.send({"image": _fill(writer.empty((3,), np.int32), 8)})["image"]
    assert isinstance(plain, np.ndarray) and plain.tolist() == [8] * 3
    writer.close()


def test_close_unlinks_the_slots_and_makes_no_more():
    writer = shm_slots.SlotWriter()
    names = [writer.send({"image": writer.empty((5,), np.uint8)})["image"].name
             for _ in range(2)]
    shm_dir = "/dev/shm"
    if os.path.isdir(shm_dir):
        assert all(os.path.exists(os.path.join(shm_dir, n)) for n in names)
    writer.close()
    for n in names:
        with pytest.raises(FileNotFoundError):
            shm_slots.SlotReader().open(shm_slots.SlotRef(n, (5,), "|u1"))
    assert isinstance(writer.send({"image": writer.empty((5,), np.uint8)})["image"], np.ndarray)


def test_a_full_dev_shm_is_an_error_naming_the_fix_not_a_bus_error(monkeypatch):
    """tmpfs allocates a page at its first write: with /dev/shm full that write is a
    SIGBUS. The slot's pages are reserved when it is made, so it is this error."""
    import errno

    from ssl_jax import errors
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")

    made = []

    def full(fd, offset, length):
        made.append(os.readlink(f"/proc/self/fd/{fd}"))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    writer = shm_slots.SlotWriter()
    with pytest.raises(errors.UserError, match=r"(?s)Shared memory is full.*--shm-size"):
        writer.empty((4, 8, 8, 3), np.uint8)
    assert len(made) == 1 and made[0].startswith("/dev/shm/")
    assert not os.path.exists(made[0])  # the segment made is gone again
    writer.close()
