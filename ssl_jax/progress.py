"""What a run tells people: a progress line for long loops (step, loss, images/s,
ETA), the run's own log, and its TensorBoard scalars.

Progress rewrites one line on a terminal; prints one line per update in a log
file (SLURM, CI), where carriage returns would make an unreadable log.
RunLog prints a line and appends it, timestamped, to WORKDIR/train.log: the
run's story (command, start, resumes, progress, online evaluations, the end)
without the libraries' INFO lines. Scalars writes TensorBoard events in the
caller's thread.
"""
from __future__ import annotations

import os
import sys
import time

from absl import logging

from ssl_jax import storage


class RunLog:
    """say(line): printed (unless log_only) and appended to `path` with the date;
    path None (a process other than 0): printed only if enabled."""

    def __init__(self, path=None, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def say(self, line: str, log_only: bool = False) -> None:
        if self.enabled and not log_only:
            print(line, flush=True)
        if self.path is not None:
            try:
                storage.append_text(self.path, f"{time.strftime('%Y-%m-%d %H:%M:%S')} "
                                               f"{line.strip()}\n")
            except OSError as e:  # a full disk is the checkpoint's error to report
                logging.warning("%s: %s", self.path, e)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# The metrics on the progress line: the loss, a contrastive method's accuracy at
# picking the positive, and the online linear probe's accuracy on its train batches.
SHOWN = ("loss", "contrast_acc", "online_linear/train_top1")


class Progress:
    """Call update(step, metrics) at log steps. The rate skips the first update
    after start, which pays for compilation."""

    def __init__(self, total: int, start: int, batch_size: int, enabled: bool = True,
                 stream=None, log: RunLog | None = None):
        self.total, self.batch_size, self.enabled, self.log = total, batch_size, enabled, log
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0, self.step0 = time.time(), start
        self.t_last, self.step_last = self.t0, start
        self.rate = 0.0
        self.first = True

    def update(self, step: int, metrics: dict) -> None:
        now = time.time()
        if self.first:  # compile time: restart the clock, report nothing yet
            self.first = False
            self.t_rate, self.step_rate = now, step
        elif step > self.step_rate:
            self.rate = (step - self.step_rate) * self.batch_size / (now - self.t_rate)
        steps_per_s = self.rate / self.batch_size if self.rate else 0.0
        eta = (self.total - step) / steps_per_s if steps_per_s else float("nan")
        frac = step / self.total
        bar = "#" * int(frac * 20) + "-" * (20 - int(frac * 20))
        extra = "".join(f" {k} {float(metrics[k]):.3f}" for k in SHOWN if k in metrics)
        rate = f"{self.rate:.0f}" if self.rate else "?"
        line = (f"[{bar}] step {step}/{self.total}{extra} | {rate} img/s | "
                f"elapsed {_fmt_time(now - self.t0)} | ETA "
                + (_fmt_time(eta) if eta == eta else "?"))
        if self.enabled:
            self.stream.write(("\r" + line) if self.tty else (line + "\n"))
            self.stream.flush()
        if self.log is not None:
            self.log.say(line, log_only=True)
        self.t_last, self.step_last = now, step

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Scalars:
    """TensorBoard scalars in `logdir` (local or gs://): add(step, {tag: value}) at log
    steps, close() at the end.

    Written in the caller's thread with tensorboardX's EventsWriter, not its
    SummaryWriter, whose writes and flushes run in a thread of their own: there a full
    disk raised an OSError no one could catch (a thread's traceback, and a queue that
    stops draining). Here a failed write is logged once and the run goes on; the
    run's own error on the same disk (the checkpoint's) is the one the user sees.
    """

    def __init__(self, logdir, flush_s: float = 60.0):
        self.logdir, self.flush_s, self._failed = logdir, flush_s, False
        self._events, self._last_flush = None, time.time()
        self._safely(self._open)

    def _open(self):
        from tensorboardX.event_file_writer import EventsWriter
        storage.path(self.logdir).mkdir(parents=True, exist_ok=True)
        self._events = EventsWriter(os.path.join(os.fspath(self.logdir), "events"))

    def _safely(self, write) -> None:
        try:
            write()
        except OSError as e:
            if not self._failed:
                logging.warning("TensorBoard events in %s not written: %s", self.logdir, e)
            self._failed = True

    def add(self, step: int, scalars: dict) -> None:
        if self._events is None:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v))
                                 for k, v in scalars.items()])
        self._safely(lambda: self._events.write_event(
            Event(wall_time=time.time(), step=int(step), summary=summary)))
        if time.time() - self._last_flush > self.flush_s:
            self._last_flush = time.time()
            self._safely(self._events.flush)

    def close(self) -> None:
        if self._events is not None:
            self._safely(self._events.close)
            self._events = None
