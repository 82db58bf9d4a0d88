r"""Soak test: a long real training run, watched from outside for leaks.

    python benchmarks/soak.py [--minutes 10] [--method simclr] [--ckpt_every_s 60]

Runs `python -m ssl_jax.train` on the prepared Fashion-MNIST (the method's
config, grain reading in a worker process) for --minutes at full speed,
checkpointing about every --ckpt_every_s seconds, with the offline evaluators
(`python -m ssl_jax.evaluate --eval knn`) run on its newest checkpoint every
--eval_every_min minutes beside it, then stops it the way a cluster does
(SIGTERM) and checks what it leaves behind. While it runs, the trainer's
resident memory (RSS), threads and child processes are sampled every 2 s from
/proc. Then linear and kNN evaluation run on its last checkpoint.

Reports: RSS at minute 1 and at the end (and the peak), thread count at both,
the grain worker processes seen and whether any outlived the trainer, the time
checkpointing blocked training, steps done, the exit code, and the evaluators'
time and accuracy. Writes benchmarks/results/soak.json.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MINUTES = flags.DEFINE_float("minutes", 10.0, "How long to train.")
_METHOD = flags.DEFINE_string("method", "simclr", "configs/<method>.py")
_CKPT_EVERY_S = flags.DEFINE_float("ckpt_every_s", 60.0, "Seconds between checkpoints (aimed).")
_STEP_S = flags.DEFINE_float("step_s", 0.57, "Expected seconds per step, to turn "
                             "--ckpt_every_s into steps (the demo's SimCLR step here).")
_EVAL_EVERY_MIN = flags.DEFINE_float("eval_every_min", 3.0, "Minutes between evaluations "
                                     "run beside training (0: none).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir; default TFDS's.")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "results", "soak.json"),
                           "Results file.")


def _proc(pid: int, field: str) -> int | None:
    """A field of /proc/<pid>/status in kB (VmRSS, VmHWM) or a count (Threads)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in os.listdir(f"/proc/{p}/task") if os.path.exists(f"/proc/{p}/task") else []:
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                kids = []
            for k in kids:
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def main(argv):
    del argv
    workdir = tempfile.mkdtemp(prefix="soak_")
    ckpt_every = max(1, int(_CKPT_EVERY_S.value / _STEP_S.value))
    cmd = [sys.executable, "-m", "ssl_jax.train",
           "--config", f"configs/{_METHOD.value}.py:dataset=fashion_mnist", "--workdir", workdir,
           "--config.total_epochs=1000", f"--config.ckpt_every_steps={ckpt_every}",
           "--config.data.worker_count=1"]
    if _DATA_DIR.value:
        cmd.append(f"--config.data_dir={_DATA_DIR.value}")
    log_path = os.path.join(workdir, "soak.out")
    print(f"soak: {' '.join(cmd[1:])}\n  log {log_path}", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        samples, workers, evals, ev_proc, next_eval = [], set(), [], None, _EVAL_EVERY_MIN.value
        ev_start = 0.0  # set with ev_proc, read only while it is not None
        while time.time() - t0 < 60 * _MINUTES.value and p.poll() is None:
            time.sleep(2.0)
            samples.append((time.time() - t0, _proc(p.pid, "VmRSS"), _proc(p.pid, "Threads")))
            workers |= _descendants(p.pid)
            if ev_proc is not None and ev_proc.poll() is not None:
                evals.append({"minute": round(ev_start / 60, 1), "rc": ev_proc.returncode,
                              "seconds": round(time.time() - t0 - ev_start, 1),
                              "result": [ln for ln in ev_proc.communicate()[0].splitlines()
                                         if "top-1" in ln]})
                ev_proc = None
            if (_EVAL_EVERY_MIN.value and ev_proc is None and time.time() - t0 >= 60 * next_eval
                    and os.path.isdir(os.path.join(workdir, "checkpoints"))):
                ev_start, next_eval = time.time() - t0, next_eval + _EVAL_EVERY_MIN.value
                ev_proc = subprocess.Popen(
                    [sys.executable, "-m", "ssl_jax.evaluate", "--workdir", workdir, "--eval",
                     "knn"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if ev_proc is not None:  # the last one, still running when training stopped
            evals.append({"minute": round(ev_start / 60, 1), "rc": ev_proc.wait(),
                          "seconds": round(time.time() - t0 - ev_start, 1),
                          "result": [ln for ln in ev_proc.communicate()[0].splitlines()
                                     if "top-1" in ln]})
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=300)
    time.sleep(2.0)
    leaked = sorted(w for w in workers if os.path.exists(f"/proc/{w}"))
    with open(log_path) as f:
        text = f.read()
    done = [ln for ln in text.splitlines() if ln.startswith("Preempted")]
    with open(os.path.join(workdir, "train.log")) as f:  # the save-time line is kept there
        done += [ln for ln in f.read().splitlines() if "Checkpoint saves" in ln]

    def at(minute):
        rows = [s for s in samples if s[1] is not None and s[0] <= 60 * minute]
        return rows[-1] if rows else (None, None, None)
    m1, end = at(1.0), at(_MINUTES.value)
    rss = [s[1] for s in samples if s[1] is not None]

    t_eval = time.time()
    ev = subprocess.run([sys.executable, "-m", "ssl_jax.evaluate", "--workdir", workdir,
                         "--eval", "linear,knn"], cwd=ROOT, capture_output=True, text=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "method": _METHOD.value,
        "minutes": _MINUTES.value, "ckpt_every_steps": ckpt_every,
        "rss_mb_minute_1": round(m1[1] / 1024, 1) if m1[1] else None,
        "rss_mb_end": round(end[1] / 1024, 1) if end[1] else None,
        "rss_mb_peak_sampled": round(max(rss) / 1024, 1) if rss else None,
        "threads_minute_1": m1[2], "threads_end": end[2],
        "rss_mb_per_minute": [round(at(m)[1] / 1024, 1) for m in range(1, int(_MINUTES.value) + 1)
                              if at(m)[1]],
        "grain_worker_pids_seen": sorted(workers), "processes_left_after_exit": leaked,
        "exit_code": rc, "trainer_summary": done, "evaluations_during_training": evals,
        "evaluate_seconds": round(time.time() - t_eval, 1), "evaluate_rc": ev.returncode,
        "evaluate_output": [ln for ln in ev.stdout.splitlines() if "top-1" in ln],
        "workdir": workdir,
    }
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
