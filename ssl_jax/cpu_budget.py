"""A training run stopped at a budget of CPU time (config.cpu_budget_minutes).

What is counted: user + system CPU seconds of every process of the run, so that other
jobs on shared cores do not change the budget (wall time would): each trainer process
itself (all its threads: XLA's, orbax's, the input pipeline's), its live child
processes (grain's decoding workers) and the children it has already waited for; in a
multi-process run the sum over processes (an all-gather at log steps). Counted from the
process's start (imports, compilation, a warm start, checkpoint saves: they are the
run's cost), carried across resumes in WORKDIR/cpu_seconds.json (the total at each
saved step), never the evaluation that follows.

What happens at the budget: the step that crosses it is the last; its state is saved
as a checkpoint and the run ends as done (exit 0), saying how many of its steps fit.
A budget is a guard, not a schedule: the learning rate's schedule is in steps, so a
run stopped early never decayed it. A budget preset (configs/*.py: budget=10m|30m|2h)
therefore sets total_steps to what fits on the machine it was measured on, and the
guard stops it elsewhere, where it is slower; the forecast line after the first log
steps says early which of the two a run is.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from ssl_jax import storage
from ssl_jax.errors import UserError

FILE = "cpu_seconds.json"


def process_seconds() -> float:
    """User + system CPU seconds of this process, its live descendants and its
    waited-for children."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    try:
        import psutil  # live children: their time reaches os.times() only when they exit
        for child in psutil.Process().children(recursive=True):
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.Error:  # exited between the listing and the read
                pass
    except ImportError:
        pass
    return total


def run_seconds(local: float) -> float:
    """Sum of `local` over the run's processes (every process calls it at the same
    step: an all-gather); `local` itself in a one-process run."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    every = multihost_utils.process_allgather(np.asarray([local], np.float32))
    return float(np.sum(np.asarray(every, np.float64)))


def spent_before(workdir, step: int) -> float:
    """CPU seconds the run had used up to its checkpoint `step` (0 at step 0, or when
    the file is missing: a run started before budgets were counted)."""
    if step == 0:
        return 0.0
    path = storage.path(workdir) / FILE
    try:
        return float(json.loads(path.read_text()).get(str(step), 0.0))
    except (OSError, ValueError):
        return 0.0


def check(limit_min: float | None) -> None:
    """A UserError unless limit_min (config.cpu_budget_minutes) is None or > 0."""
    if limit_min is not None and not limit_min > 0:
        raise UserError(f"config.cpu_budget_minutes={limit_min:g} must be > 0 (or None: "
                        "no budget).")


class Budget:
    """Call used(step) where every process is (each step in a one-process run, at log
    steps otherwise: it is a collective there) -> the run's CPU seconds; exhausted()
    after it; record(workdir, step) at each save (process 0 writes).

    limit_min: config.cpu_budget_minutes, None for no budget (then used() still counts,
    for the logs, and nothing stops). before_s: what resumed checkpoints had spent.
    start_s: process_seconds() where this run's count starts (0: the process's start,
    as the train command counts; a run started from Python counts from its call).
    """

    def __init__(self, limit_min: float | None, before_s: float = 0.0, start_s: float = 0.0):
        check(limit_min)
        self.limit_s = None if limit_min is None else 60.0 * limit_min
        self.before_s, self.start_s = before_s, start_s
        self.seconds = before_s  # the newest count
        self._origin = None  # (step, seconds) at the first log step; "done" after forecasting

    def every_step(self) -> bool:
        """Whether used() may be called at every step (no collective needed)."""
        return self.limit_s is not None and jax.process_count() == 1

    def used(self) -> float:
        """The run's CPU seconds so far (resumed checkpoints' included)."""
        self.seconds = self.before_s + run_seconds(process_seconds() - self.start_s)
        return self.seconds

    def exhausted(self) -> bool:
        return self.limit_s is not None and self.seconds >= self.limit_s

    def at_log_step(self, step: int, total: int) -> str | None:
        """Call at log steps, after used(): at the second one, forecast() from the CPU
        rate since the first (which paid compilation); None at the others."""
        if self._origin is None:
            self._origin = (step, self.seconds)
            return None
        if self._origin == "done" or step <= self._origin[0]:
            return None
        (s0, c0), self._origin = self._origin, "done"
        return self.forecast(step, total, (self.seconds - c0) / (step - s0))

    def forecast(self, step: int, total: int, rate_s: float) -> str | None:
        """A warning when, at rate_s CPU seconds per step, the remaining steps do not
        fit: how many would."""
        if self.limit_s is None or rate_s <= 0:
            return None
        need = self.seconds + (total - step) * rate_s
        if need <= self.limit_s:
            return None
        fit = step + int((self.limit_s - self.seconds) / rate_s)
        return (f"warning: at {rate_s:.2f} CPU-s per step this run needs ~{need / 60:.1f} "
                f"CPU-min, over its budget of {self.limit_s / 60:g} (config.cpu_budget_minutes): "
                f"it will stop near step {fit} of {total}, before its learning-rate schedule "
                f"ends. For a schedule that ends, set --config.total_steps={fit} (this "
                "machine is slower than the preset's).")

    def record(self, workdir, step: int) -> None:
        """Adds {step: seconds} to WORKDIR/cpu_seconds.json (process 0)."""
        path = storage.path(workdir) / FILE
        try:
            table = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            table = {}
        table[str(step)] = round(self.seconds, 2)
        path.write_text(json.dumps(table, indent=0, sort_keys=True) + "\n")
