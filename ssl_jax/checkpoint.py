"""Checkpoints: the train state and the data iterator's position, saved together.

Orbax writes each step into a temporary folder and renames it when complete,
so a crash mid-save leaves the previous step as the latest. The grain iterator
state is saved per process beside the arrays: restoring both gives exactly the
batches an uninterrupted run would have seen next.
"""
from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager for {state, data} items."""

    def __init__(self, workdir: str, max_to_keep: int = 2, async_save: bool = True):
        self.dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.dir,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter=None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state, data_iter=None, step: int | None = None):
        """Returns (state, step) of `step` (default: the latest) or (None, None).

        abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) that
        says where each restored array goes. data_iter is restored in place.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None, None
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], step

    def restore_state_only(self, abstract_state, step: int | None = None):
        """Restores just the arrays (evaluation, export): no data iterator needed."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"No checkpoint in {self.dir}: train first, or point --workdir at a "
                "finished or interrupted training run.")
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"], step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract(tree, sharding) -> object:
    """ShapeDtypeStructs of `tree` (arrays or shapes) placed with `sharding`:
    one Sharding for every leaf, or a pytree of them with tree's structure."""
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, sharding)
