"""A progress line for long loops: step, loss, images/s, ETA.

Rewrites one line on a terminal; prints one line per update in a log file
(SLURM, CI), where carriage returns would make an unreadable log.
"""
from __future__ import annotations

import sys
import time


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Call update(step, metrics) at log steps. The rate skips the first update
    after start, which pays for compilation."""

    def __init__(self, total: int, start: int, batch_size: int, enabled: bool = True,
                 stream=None):
        self.total, self.batch_size, self.enabled = total, batch_size, enabled
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
        extra = "".join(f" {k} {float(metrics[k]):.3f}" for k in ("loss", "contrast_acc")
                        if k in metrics)
        rate = f"{self.rate:.0f}" if self.rate else "?"
        line = (f"[{bar}] step {step}/{self.total}{extra} | {rate} img/s | "
                f"elapsed {_fmt_time(now - self.t0)} | ETA "
                + (_fmt_time(eta) if eta == eta else "?"))
        if self.enabled:
            self.stream.write(("\r" + line) if self.tty else (line + "\n"))
            self.stream.flush()
        self.t_last, self.step_last = now, step

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
