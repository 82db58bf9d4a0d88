"""Checkpoints: the train state and the data iterator's position, saved together.

Orbax writes each step into a temporary folder and renames it when complete,
so a crash mid-save leaves the previous step as the latest. The grain iterator
state is saved per process beside the arrays: restoring both gives exactly the
batches an uninterrupted run would have seen next.
"""
from __future__ import annotations

import contextlib
import time

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from ssl_jax import parallel, storage
from ssl_jax.errors import UserError


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous complete one is intact."""


class NoCheckpointError(UserError, FileNotFoundError):
    """A workdir without a checkpoint to read (also a FileNotFoundError, as it always was)."""


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager for {state, data} items."""

    def __init__(self, workdir: str, max_to_keep: int = 2, async_save: bool = True):
        self._saving = None  # the step being written in the background, if any
        self.blocked_s, self.saves = 0.0, 0  # time the caller waited in save(), and count
        self.dir = storage.path(workdir) / "checkpoints"  # local, or a bucket's gs://
        self.manager = ocp.CheckpointManager(
            self.dir,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter=None, force: bool = False) -> bool:
        """Starts writing checkpoint `step` (in the background). A failed write, this
        one's or the previous background one's, raises CheckpointSaveError."""
        t0 = time.perf_counter()
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        # orbax waits for the previous background write before starting this one
        # anyway; waiting here first attributes its failure to its own step.
        with self._failures(self._saving):
            self.manager.wait_until_finished()
        self._saving = step
        with self._failures(step):
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        self.blocked_s += time.perf_counter() - t0
        self.saves += int(saved)
        return saved

    @contextlib.contextmanager
    def _failures(self, step: int | None):
        """Turns a failed save (disk full, permissions, a vanished mount) into one error
        naming the step that failed and the newest complete checkpoint, which orbax's
        write-then-rename leaves intact."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- orbax re-raises background errors as-is
            complete = complete_steps(self.dir.parent)
            kept = (f"the newest complete checkpoint is step {complete[-1]} in {self.dir}"
                    if complete else f"no complete checkpoint is in {self.dir}")
            raise CheckpointSaveError(
                f"Saving the checkpoint of step {step} failed ({type(e).__name__}: {e}); "
                f"{kept}. Fix the cause (e.g. free disk space) and re-run the same command "
                "to resume from it.") from e

    def restore(self, abstract_state, data_iter=None, step: int | None = None):
        """Returns (state, step) of `step` (default: the newest readable) or (None, None).

        abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) that
        says where each restored array goes. data_iter is restored in place.

        Without `step`, a checkpoint that fails to restore (files truncated or
        deleted after orbax finalised it: a bad disk, a user's rm) is reported and
        the next older one is tried; once one restores, the unreadable newer ones
        are moved to WORKDIR/corrupt_checkpoints/ (kept for inspection, and out of
        the way of later saves). If none restores, the newest one's error is
        raised and nothing is moved.
        """
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        failed = []
        for s in steps:
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iter is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            try:
                restored = self.manager.restore(s, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint: try an older one
                if step is not None:
                    raise
                logging.warning("Checkpoint %d in %s cannot be restored (%s: %s); trying an "
                                "older one.", s, self.dir, type(e).__name__, e)
                failed.append((s, e))
                continue
            if failed:
                self._quarantine([f for f, _ in failed])
                print(f"WARNING: checkpoint(s) {[f for f, _ in failed]} in {self.dir} could not "
                      f"be restored; resumed from step {s} instead. They were moved to "
                      f"{self._corrupt_dir()}.", flush=True)
            return restored["state"], s
        if failed:
            raise RuntimeError(
                f"No checkpoint in {self.dir} can be restored (steps {[f for f, _ in failed]}); "
                f"the newest failed with: {failed[0][1]}. Move the checkpoints directory aside "
                "to start afresh.") from failed[0][1]
        return None, None

    def _corrupt_dir(self):
        return self.dir.parent / "corrupt_checkpoints"

    def _quarantine(self, steps) -> None:
        """Process 0 moves the unreadable steps aside; every process then waits for it
        before rereading the folder, so that none still sees them as the newest."""
        if jax.process_index() == 0:
            self._corrupt_dir().mkdir(parents=True, exist_ok=True)
            for s in steps:
                storage.replace(self.dir / str(s),
                                self._corrupt_dir() / f"{s}-{int(time.time())}")
        parallel.sync("ssl_jax checkpoint quarantine")
        self.manager.reload()

    def restore_state_only(self, abstract_state, step: int | None = None,
                           partial: bool = False):
        """Restores just the arrays (evaluation, export): no data iterator needed.
        partial: abstract_state holds only part of the saved state (e.g. the encoder's
        leaves), and only that part is read."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise NoCheckpointError(
                f"No checkpoint in {self.dir}: train first, or point --workdir at a "
                "finished or interrupted training run.")
        if partial:
            item = ocp.args.PyTreeRestore(
                item=abstract_state, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
        else:
            item = ocp.args.StandardRestore(abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=item))
        return restored["state"], step

    def wait(self) -> None:
        with self._failures(self._saving):
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._failures(self._saving):
            self.manager.wait_until_finished()
            self.manager.close()  # flushes orbax's metadata: fails on a full disk too


def complete_steps(workdir) -> list[int]:
    """The steps of WORKDIR's complete checkpoints, ascending, without opening orbax:
    orbax renames a step's folder to its number only once every part is written
    (a partial one is `N.orbax-checkpoint-tmp-*`). [] when there is none."""
    ckpts = storage.path(workdir) / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit() and d.is_dir())


def saved_shapes(workdir) -> tuple[int, dict[str, tuple]] | None:
    """(step, leaf_shapes of its train state) of WORKDIR's newest complete checkpoint
    whose metadata reads, without restoring or writing anything; None when none does."""
    for step in reversed(complete_steps(workdir)):
        item = storage.path(workdir) / "checkpoints" / str(step) / "state"
        try:
            tree = ocp.PyTreeCheckpointHandler().metadata(item)
        except Exception:  # noqa: BLE001 -- unreadable: restore() sets it aside
            continue
        return step, leaf_shapes(tree)
    return None


def misfits(workdir, shapes) -> tuple[int, list[str]] | None:
    """(step, what differs) between the train state of WORKDIR's newest readable
    checkpoint and `shapes` (a pytree of the state to restore into), by leaf path and
    shape; None when they agree or no checkpoint's metadata reads."""
    saved = saved_shapes(workdir)
    if saved is None:
        return None
    step, have = saved
    want = leaf_shapes(shapes)
    differ = [f"{k} not in it" for k in want if k not in have]
    differ += [f"{k} {have[k]} there, {want[k]} here" for k in want
               if k in have and have[k] != want[k]]
    differ += [f"{k} only there" for k in have if k not in want]
    return (step, differ) if differ else None


def leaf_shapes(tree) -> dict[str, tuple]:
    """{"opt_state/0/mu/encoder/conv1/kernel": shape} of a pytree's leaves (arrays,
    ShapeDtypeStructs, or a checkpoint's metadata, which stores a named tuple as a
    dict: every key is written as a string, so both name a leaf alike)."""
    def name(k):
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)
    return {"/".join(name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def abstract(tree, sharding) -> object:
    """ShapeDtypeStructs of `tree` (arrays or shapes) placed with `sharding`:
    one Sharding for every leaf, or a pytree of them with tree's structure."""
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, sharding)
