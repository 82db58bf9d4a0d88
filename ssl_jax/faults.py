"""What the train loop does when a run goes wrong: preemption and non-finite numbers.

Preemption. TPU VMs and SLURM send SIGTERM some seconds before killing a job.
`Preemption` turns it into a flag the loop polls once per step: the loop then
finishes the step it is in, writes a checkpoint of it (state + data iterator),
waits for the write to complete, and train exits 75 (EX_TEMPFAIL: schedulers
requeue on it). Further SIGTERMs only set the flag
again, so they cannot interrupt the save. Ctrl-C in a one-process run does the
same and exits 130 (see Preemption). With several processes each host may
see the signal at a different step; they agree on one through JAX's coordination
service (`multihost_utils.reached_preemption_sync_point`, whose notifier
jax.distributed installs for SIGTERM), so every host saves the same step.

Non-finite numbers. The jitted step keeps its previous state when the loss or
any gradient is not finite (`guarded_update`) and reports per-leaf finiteness.
`NonFiniteCheck` collects those flags lazily (no host sync per step) and checks
them before every log line and every checkpoint: with policy "raise" the run
stops with an error naming the first bad step and what was non-finite, and no
checkpoint of a later state is written; with "skip" the bad steps are counted
and training goes on from the last good state.
"""
from __future__ import annotations

import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.errors import UserError

POLICIES = ("raise", "skip")


class Preemption:
    """SIGTERM (or, in a one-process run, Ctrl-C) -> a flag; `requested(step)` is True
    at the step every process stops at, and `signal` names what stopped it.

    Ctrl-C is a stop with a checkpoint too (train exits 130 after saving); a second
    Ctrl-C while the run stops ends the process at once, for a user who will not wait
    (one line; exit 130; orbax's write-then-rename keeps the previous checkpoint).
    In a multi-process run SIGINT keeps its default: a launcher or scheduler stops
    such runs with SIGTERM, which every process must agree on.
    """

    def __init__(self):
        self.signal: str | None = None
        self._multi = jax.process_count() > 1
        self._previous = {}
        # jax.distributed's own notifier handles SIGTERM with several processes.
        for sig in () if self._multi else (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT:
            if self.signal == "SIGINT":  # the second Ctrl-C: stop now
                # As a SIGKILL would: unwinding through an orbax save in flight can wait
                # minutes on its threads, and orbax's write-then-rename already keeps the
                # newest complete checkpoint whole.
                print("\nCtrl-C again: stopped at once, without saving this step; the newest "
                      "complete checkpoint is kept. Re-run the same command to resume.",
                      file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(130)
            # The host runs ahead of the device: the steps it already sent finish first.
            print("\nCtrl-C: stopping once the steps already sent to the device are done, "
                  "then saving a checkpoint (Ctrl-C again to stop at once, without it).",
                  flush=True)
        self.signal = self.signal or signal.Signals(signum).name

    def requested(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal = "SIGTERM"
        return self.signal is not None

    def close(self) -> None:
        """Restores the previous handlers (tests train several runs in one process)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def guarded_update(loss, grads, new_state, old_state):
    """-> (state, {"finite": () bool, "grad_finite": (L,) bool}) with `state` the
    new one if the loss and every gradient leaf are finite, else the old one
    (a step with a NaN must not poison the parameters or the optimizer moments)."""
    leaf_ok = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    ok = jnp.isfinite(loss) & jnp.all(leaf_ok)
    state = jax.lax.cond(ok, lambda: new_state, lambda: old_state)
    return state, {"finite": ok, "grad_finite": leaf_ok}


def leaf_names(tree) -> list[str]:
    """'encoder/conv1/kernel'-style names of tree's leaves, in jax.tree.leaves order."""
    return [jax.tree_util.keystr(path, simple=True, separator="/")
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


class NonFiniteCheck:
    """Collects the step's finiteness flags (device arrays) and checks them in batches."""

    def __init__(self, policy: str, grad_names: list[str]):
        if policy not in POLICIES:
            raise UserError(f"config.nonfinite={policy!r} unknown; valid: {list(POLICIES)}.")
        self.policy, self.grad_names = policy, grad_names
        self.pending: list[tuple[int, jax.Array, jax.Array, jax.Array]] = []
        self.skipped = 0

    def add(self, step: int, metrics: dict) -> dict:
        """Takes the flags out of a step's metrics (they are not scalars to log)."""
        metrics = dict(metrics)
        self.pending.append((step, metrics.pop("finite"), metrics.pop("grad_finite"),
                             metrics["loss"]))
        return metrics

    def check(self) -> None:
        """Raises FloatingPointError at the first non-finite step under "raise";
        counts them under "skip"."""
        pending, self.pending = jax.device_get(self.pending), []
        for step, ok, grad_ok, loss in pending:
            if ok:
                continue
            if self.policy == "skip":
                self.skipped += 1
                continue
            what = [f"loss ({float(loss)})"] if not np.isfinite(loss) else []
            bad = [n for n, g in zip(self.grad_names, grad_ok) if not g]
            if bad:
                what.append(f"the gradient of {bad[0]}" +
                            (f" (and {len(bad) - 1} more parameters)" if len(bad) > 1 else ""))
            raise FloatingPointError(
                f"Non-finite {' and '.join(what)} at step {step}. The step was not applied and "
                "no checkpoint of a later state was written: the latest checkpoint is the last "
                "good one. Lower config.optimizer.lr, check the input data, or set "
                "config.nonfinite='skip' to skip such steps and count them.")
