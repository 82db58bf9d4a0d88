"""What several processes of one command print: process 0 speaks, the others keep quiet,
and Gloo's (the CPU collectives') connection lines are kept off the console.

    with one_voice(verbose=False): ...        # what a command does, on every process

one_voice is both below, chosen by the process: processes 1.. send stdout to
/dev/null (quiet_unless_first), process 0's stdout loses Gloo's lines
(without_gloo_chatter); one process, or verbose, changes nothing.

Gloo writes from C++ straight to file descriptor 1, so the filter sits on the
descriptor (a pipe read by a thread), not on sys.stdout.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading

import jax
from absl import logging


def quiet_unless_first(process_index: int) -> None:
    """A multi-process evaluation speaks once (process 0 logs): on every process but
    0, stdout (its prints, and whatever C++ writes to file descriptor 1) goes to
    /dev/null and absl logging keeps only errors. Errors (stderr) still come from
    every process: each one's own may differ."""
    if process_index == 0:
        return
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    logging.set_verbosity(logging.ERROR)


def is_gloo_chatter(line: bytes) -> bool:
    """Whether a stdout line is (part of) what Gloo, the CPU collectives, writes from
    C++ as each group of devices first connects: "[Gloo] Rank 0 is connected to 1
    peer ranks. Expected number of connected peer ranks is : 1". Two devices of one
    process connecting at once interleave theirs, leaving a tail ("1", or " peer
    ranks. ...") on a line of its own."""
    text = line.strip()
    return b"[Gloo]" in text or b"peer ranks" in text or text.isdigit()


@contextlib.contextmanager
def without_gloo_chatter():
    """For the block, file descriptor 1 (Python's prints and C++'s std::cout) is a
    pipe whose lines a thread passes on to the real stdout, less Gloo's chatter."""
    sys.stdout.flush()
    real = os.dup(1)
    read, write = os.pipe()
    os.dup2(write, 1)
    os.close(write)

    def forward():
        rest = b""
        while chunk := os.read(read, 1 << 16):
            *lines, rest = (rest + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not is_gloo_chatter(line))
            if kept:
                os.write(real, kept)
        if rest and not is_gloo_chatter(rest):
            os.write(real, rest)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        ctypes.CDLL(None).fflush(None)  # C's stdio buffers (std::cout's)
        os.dup2(real, 1)  # the pipe's last write end closes: the thread sees its end
        thread.join(timeout=10)
        os.close(read)
        os.close(real)


def one_voice(verbose: bool):
    """A context in which a multi-process command speaks once: process 0's output
    without Gloo's lines, the others' stdout silenced (for good: their stdout is
    not theirs to reclaim once the command ends). verbose, or one process: as is."""
    if verbose or jax.process_count() == 1:
        return contextlib.nullcontext()
    if jax.process_index() > 0:
        quiet_unless_first(jax.process_index())
        return contextlib.nullcontext()
    return without_gloo_chatter()
