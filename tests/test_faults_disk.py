"""A checkpoint write that fails (a full disk, for real on a tmpfs or injected as
ENOSPC) names the failed step and the newest complete checkpoint, loses nothing, and
is not hidden by a later error while closing. (test_faults.py: the other faults.)"""
import os
import re
import subprocess

import orbax.checkpoint as ocp
import pytest

from ssl_jax import train
from tests.test_faults import _assert_same_params, _params
from tests.test_train import tiny_config


@pytest.fixture(autouse=True, scope="module")
def _cache(module_compilation_cache, fast_prng):
    """The runs here compile the same tiny program: one cache, the fast PRNG."""
    yield module_compilation_cache


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (room for ~5 tiny checkpoints); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    yield str(mount)
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture(params=["tmpfs", "injected"])
def full_disk(request, tmp_path, monkeypatch):
    """-> (folder, fill): a folder on which checkpoint saves run out of space part-way
    through a run while fill(True) is in force. A 1 MiB tmpfs (really full: needs
    root), or, unprivileged, an ordinary folder where every write of the data
    iterator's state from step 6 on fails with ENOSPC, as on a full disk (so CI
    without root covers the path too), and so does every TensorBoard write after it."""
    if request.param == "tmpfs":
        return request.getfixturevalue("small_disk"), lambda on: None
    import errno

    import grain
    from tensorboardX import record_writer
    real, full, failed = grain.checkpoint.CheckpointHandler.save, [False], [False]

    def no_space():
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save(self, directory, *args, **kwargs):
        step = int(re.match(r"\d+", os.path.basename(os.fspath(directory.parent)))[0])
        if full[0] and step >= 6:
            failed[0] = True
            raise no_space()
        return real(self, directory, *args, **kwargs)
    monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", save)
    for name in ("write", "flush"):
        real_tb = getattr(record_writer.RecordWriter, name)

        def tb(self, *args, _real=real_tb, **kwargs):
            if failed[0]:
                raise no_space()
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(record_writer.RecordWriter, name, tb)

    def fill(on):
        full[0], failed[0] = on, failed[0] and on
    return str(tmp_path / "injected"), fill


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tiny_data, tmp_path, full_disk,
                                                              monkeypatch):
    import shutil
    import threading

    from ssl_jax import checkpoint
    c = tiny_config("simclr", tiny_data)
    c.total_steps, c.ckpt_every_steps, c.keep_ckpts = 12, 1, 100
    full = str(tmp_path / "full")
    train.train(c, full)
    disk, fill = full_disk
    workdir = os.path.join(disk, "w")
    fill(True)
    # TensorBoard's writes fail on the same disk: logged, never raised in a thread of
    # its own. tensorboardX's writer thread did (an unhandled OSError in pytest's
    # warnings), then or later: its close failed on the full disk and left it running.
    in_threads = []
    monkeypatch.setattr(threading, "excepthook", in_threads.append)
    before = set(threading.enumerate())
    with pytest.raises(checkpoint.CheckpointSaveError,
                       match=r"Saving the checkpoint of step (\d+) failed .*No space left on "
                             r"device.*newest complete checkpoint is step (\d+) in .*re-run") as e:
        train.train(c, workdir)
    failed, kept = (int(x) for x in re.search(r"step (\d+) failed.*step (\d+) in",
                                              str(e.value)).groups())
    assert 1 <= kept == failed - 1 < 11
    assert not in_threads, [a.exc_value for a in in_threads]
    left = [t for t in set(threading.enumerate()) - before
            if type(t).__module__.startswith("tensorboardX")]
    assert not left, left
    # The kept checkpoint is whole: moved to a disk with room, the run resumes from it
    # and ends where the uninterrupted run did.
    fill(False)
    moved = str(tmp_path / "moved")
    shutil.copytree(workdir, moved)
    _assert_same_params(_params(moved, kept), _params(full, kept))
    train.train(c, moved)
    _assert_same_params(_params(moved), _params(full))


def test_an_error_while_closing_does_not_hide_the_failed_save(tiny_data, tmp_path, monkeypatch):
    """What made the disk-full test flaky: after a save failed, closing orbax's manager
    (its metadata flush, on the same full disk) raised an OSError of its own, and that
    replaced the error naming the failed step. The cause must reach the user."""
    from ssl_jax import checkpoint
    c = tiny_config("simclr", tiny_data)
    c.total_steps, c.ckpt_every_steps = 4, 1
    save = checkpoint.Checkpointer.save

    def failing_save(self, step, *args, **kwargs):
        if step == 3:
            with self._failures(step):
                raise OSError(28, "No space left on device")
        return save(self, step, *args, **kwargs)

    def failing_close(self):
        raise OSError(28, "No space left on device (metadata)")

    monkeypatch.setattr(checkpoint.Checkpointer, "save", failing_save)
    monkeypatch.setattr(ocp.CheckpointManager, "close", failing_close)
    with pytest.raises(checkpoint.CheckpointSaveError,
                       match=r"step 3 failed .*newest complete checkpoint is step [12] "):
        train.train(c, str(tmp_path / "w"))
    # Without a failure in the loop, a failing close is the run's error, named as one.
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    with pytest.raises(checkpoint.CheckpointSaveError, match=r"metadata"):
        train.train(c, str(tmp_path / "w2"))
