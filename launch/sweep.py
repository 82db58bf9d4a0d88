#!/usr/bin/env python
r"""Hyperparameter sweeps: a grid of ssl_jax.train runs, one workdir per point.

  python launch/sweep.py --config configs/moco.py:dataset=fashion_mnist \
      --sweep 'config.optimizer.lr=0.03,0.1' --sweep 'config.moco.temperature=0.1,0.2' \
      --root runs/sweep_moco [--launcher local|slurm|tpu] [--parallel N] \
      [--eval linear,knn] [--metric KEY] [--plot] [--dry_run] [-- extra train flags]
  python launch/sweep.py --root runs/sweep_moco --summarize   # the table only, nothing runs

Points: the cartesian product of every --sweep KEY=V1,V2,... (commas inside
brackets or quotes do not split: 'config.model.widths=(8,16,32,64),(16,32,64,128)'),
or the list of {"config.a.b": value} dicts a `sweep(arg)` function of the
config file returns (--sweep_fn [NAME]; used by default when the file defines
`sweep` and no --sweep is given), times the grid when both are given.

Every point is parsed as train parses its command line (ssl_jax/cli.py) before
anything starts: an unknown key (named with the valid keys beside it) or a
value that does not parse as its field's type is `error: ...`, exit status 2,
and nothing is created under --root.

Each point trains in ROOT/<its values, e.g. optimizer.lr=0.03,moco.temperature=0.1>
(the commands' output: train.out, eval.out there, beside train's own train.log).
A point whose newest checkpoint is its last step is skipped; an interrupted one
(train exited 75 on SIGTERM, or was killed) is resumed by running the same command
again; --eval runs
`python -m ssl_jax.evaluate` on each finished point, skipping evaluators whose
eval_<name>.json is of the newest step. SIGTERM/SIGINT to the sweep is passed
on to its runs (they checkpoint and stop). Then ROOT/summary.md and
ROOT/summary.json (launch/sweep_summary.py). Exit status: 0 when every point is
done, 75 when some are interrupted (re-run the same command), 1 when one failed.

Launchers: local (subprocesses, --parallel at a time); slurm (a job array,
one task per unfinished point, written to ROOT/sweep.sbatch and submitted with
sbatch [--slurm_args]; the summary is rebuilt with --summarize once it ran);
tpu (launch/tpu_pod.sh NAME ZONE PROJECT -- <train args> per point, in turn;
--tpu NAME,ZONE,PROJECT; ROOT must be a path readable here and by the workers, e.g.
a gcsfuse mount of a bucket: gs:// roots are not supported; --eval runs here).
--dry_run prints the commands (or the sbatch script) and creates nothing.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO]
import sweep_summary as summary  # noqa: E402  (launch/, beside this file)
from sweep_points import (  # noqa: E402,F401  (the names tests use, too)
    SweepError, combine, from_function, grid, load_config_module, name_points, point_name,
    split_values, validate)

EXIT_USAGE, EXIT_PREEMPTED = 2, 75

# -------------------------------------------------------------------- running

class Runner:
    """Runs points' train (and evaluate) commands, --parallel at a time; passes
    SIGTERM/SIGINT on to them."""

    def __init__(self, args, extra):
        self.args, self.extra = args, extra
        self.procs, self.lock, self.stopping = set(), threading.Lock(), False

    def train_argv(self, p) -> list[str]:
        return (["--config", self.args.config, "--workdir", p["workdir"]]
                + [f"--config.{k}={v}" for k, v in p["point"]] + self.extra)

    def command(self, p) -> list[str]:
        if self.args.launcher == "tpu":
            return [os.path.join(HERE, "tpu_pod.sh"), *self.args.tpu, "--", *self.train_argv(p)]
        return [sys.executable, "-m", "ssl_jax.train", *self.train_argv(p)]

    def eval_command(self, p, names) -> list[str]:
        return ([sys.executable, "-m", "ssl_jax.evaluate", "--workdir", p["workdir"],
                 "--eval", ",".join(names)] + shlex.split(self.args.eval_flags or ""))

    def stop(self, signum, frame):
        self.stopping = True
        print(f"sweep: signal {signum}: stopping the runs (they checkpoint; re-run to "
              "resume).", file=sys.stderr, flush=True)
        with self.lock:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

    def _run(self, cmd, log_path, record=None):
        with open(log_path, "a") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            with self.lock:
                if self.stopping:
                    return None
                # Its own session: a Ctrl-C reaches the sweep only, which passes
                # on a SIGTERM (train checkpoints on it; SIGINT would crash it).
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                self.procs.add(proc)
            if record is not None:
                record(proc.pid)
            try:
                return proc.wait()
            finally:
                with self.lock:
                    self.procs.discard(proc)

    def point(self, i, n, p):
        wd, name = p["workdir"], p["name"]
        state = summary.read_point(wd)
        state.update(name=name, values=dict(p["point"]), command=self.command(p))
        if p["total_steps"] is not None:
            state["total_steps"] = p["total_steps"]
        if not summary.is_finished(wd, state):
            print(f"[{i + 1}/{n}] {name}: training (output {wd}/train.out)", flush=True)
            t0 = time.time()
            rc = self._run(self.command(p), os.path.join(wd, "train.out"),
                           record=lambda pid: summary.write_point(wd, dict(state, pid=pid)))
            if rc is None:
                return
            state.update(train_rc=rc, train_seconds=round(time.time() - t0, 1))
            state["train_seconds_total"] = round(state.get("train_seconds_total", 0)
                                                 + state["train_seconds"], 1)
            done = re.findall(r"Done: (\d+) steps", _tail(os.path.join(wd, "train.out")))
            if rc == 0 and done:
                state["total_steps"] = int(done[-1])
            summary.write_point(wd, state)
            what = {0: "done", EXIT_PREEMPTED: "interrupted"}.get(
                rc, "interrupted" if rc < 0 else f"FAILED (exit {rc})")
            print(f"[{i + 1}/{n}] {name}: {what} after {state['train_seconds']:.0f} s",
                  flush=True)
            if not summary.is_finished(wd, state):
                return
        else:
            print(f"[{i + 1}/{n}] {name}: finished before, skipped", flush=True)
        todo = summary.evals_to_do(wd, self.args.eval)
        if todo and not self.stopping:
            print(f"[{i + 1}/{n}] {name}: evaluating {','.join(todo)} (output {wd}/eval.out)",
                  flush=True)
            t0 = time.time()
            rc = self._run(self.eval_command(p, todo), os.path.join(wd, "eval.out"))
            if rc is not None and not (self.stopping and rc != 0):  # stopped: not a failure
                state.update(eval_rc=rc, eval_seconds=round(time.time() - t0, 1))
                summary.write_point(wd, state)
                print(f"[{i + 1}/{n}] {name}: evaluation "
                      f"{'done' if rc == 0 else f'FAILED (exit {rc})'}", flush=True)
        elif self.args.eval and "eval_rc" not in state:
            state["eval_rc"] = 0
            summary.write_point(wd, state)

    def run_all(self, points):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self.stop)
        parallel = 1 if self.args.launcher == "tpu" else (self.args.parallel or 1)
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            futures = [pool.submit(self.point, i, len(points), p) for i, p in enumerate(points)]
            for f in futures:
                f.result()


def _tail(path, n=20000) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - n))
        return f.read().decode(errors="replace")


def slurm_script(args, points, extra, todo) -> str:
    ids = ",".join(str(i) for i in todo) + (f"%{args.parallel}" if args.parallel else "")
    lines = ["#!/bin/bash", f"#SBATCH --job-name=sweep-{os.path.basename(args.root)}",
             f"#SBATCH --array={ids}", f"#SBATCH --output={args.root}/slurm-%A_%a.out",
             "#SBATCH --open-mode=append", "#SBATCH --requeue",
             "# Written by launch/sweep.py: one array task per point (its index in",
             "# ROOT/sweep.json). Train exits 75 when preempted: the task is requeued and",
             "# resumes. Afterwards: python launch/sweep.py --root ROOT --summarize.",
             "set -uo pipefail", f"cd {shlex.quote(os.getcwd())}",
             f"PYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}",
             'case "$SLURM_ARRAY_TASK_ID" in']
    runner = Runner(args, extra)
    for i in todo:
        p = points[i]
        lines.append(f"  {i}) WORKDIR={shlex.quote(p['workdir'])}; "
                     f"set -- {shlex.join(runner.train_argv(p))} ;;")
    lines += ['  *) echo "no point $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac",
              'srun "$PYTHON" -m ssl_jax.train "$@"', "rc=$?",
              'if [ "$rc" -eq 75 ]; then',
              '  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; exit 0',
              "fi", '[ "$rc" -eq 0 ] || exit "$rc"']
    if args.eval:
        lines.append(f'srun "$PYTHON" -m ssl_jax.evaluate --workdir "$WORKDIR" --eval '
                     f"{shlex.quote(','.join(args.eval))} {args.eval_flags or ''}".rstrip())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the command

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="launch/sweep.py", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.partition("\n\n")[2])
    ap.add_argument("--config", help="configs/<method>.py[:args], as train's --config.")
    ap.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...")
    ap.add_argument("--sweep_fn", nargs="?", const="sweep", metavar="NAME",
                    help="use the config file's NAME(arg) (default: sweep) for the points.")
    ap.add_argument("--root", required=True, help="one workdir per point goes here.")
    ap.add_argument("--launcher", choices=("local", "slurm", "tpu"), default="local")
    ap.add_argument("--parallel", type=int, default=None, help="points at a time (local: 1).")
    ap.add_argument("--eval", type=lambda s: [x for x in s.split(",") if x], default=[],
                    help="evaluators to run on each finished point, e.g. linear,knn.")
    ap.add_argument("--eval_flags", default="", help="more flags for ssl_jax.evaluate.")
    ap.add_argument("--metric", help="the column to sort by (default: the first --eval's "
                    "top-1, else online accuracy, else final train loss).")
    ap.add_argument("--plot", action="store_true", help="ROOT/sweep_<key>.png per swept key.")
    ap.add_argument("--dry_run", action="store_true", help="print the commands, run nothing.")
    ap.add_argument("--summarize", action="store_true", help="only rebuild the summary.")
    ap.add_argument("--tpu", type=lambda s: s.split(","), metavar="NAME,ZONE,PROJECT")
    ap.add_argument("--slurm_args", default="", help="more sbatch flags (e.g. '-p gpu').")
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    else:
        extra = []
    args = ap.parse_args(argv)
    args.root = os.path.abspath(args.root)
    return args, extra


def prepare(args, extra):
    """Checks everything and builds the points; creates nothing."""
    if args.parallel is not None and args.parallel < 1:
        raise SweepError("--parallel must be >= 1.")
    if args.launcher == "tpu" and (not args.tpu or len(args.tpu) != 3):
        raise SweepError("--launcher tpu needs --tpu NAME,ZONE,PROJECT.")
    if not args.config:
        raise SweepError("--config is required (unless --summarize).")
    if any(a.startswith("--workdir") for a in extra):
        raise SweepError("--workdir is the sweep's: each point trains in ROOT/<its values>.")
    from ssl_jax.evaluation import EVALUATORS
    unknown = [e for e in args.eval if e not in EVALUATORS]
    if unknown:
        raise SweepError(f"--eval {','.join(unknown)}: unknown; the evaluators are "
                         f"{', '.join(EVALUATORS)}.")
    fn = args.sweep_fn
    if fn is None and not args.sweep and hasattr(load_config_module(args.config), "sweep"):
        fn = "sweep"
    points = combine(from_function(args.config, fn) if fn else [], grid(args.sweep))
    if not points:
        raise SweepError("nothing to sweep: give --sweep KEY=V1,V2,... or a config file "
                         "with a sweep(arg) function (--sweep_fn).")
    names = name_points(points)
    out = []
    for point, name in zip(points, names):
        config = validate(args.config, point, extra)
        out.append(dict(point=point, name=name, workdir=os.path.join(args.root, name),
                        total_steps=summary.total_steps(config)))
    return out


def main(argv=None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.summarize:
            if not os.path.isdir(args.root):
                raise SweepError(f"--summarize: {args.root} is not a directory (no sweep there).")
            if not summary.points(args.root)[0]:
                raise SweepError(f"--summarize: {args.root} holds no sweep (no sweep.json, no "
                                 f"point with {summary.POINT_FILE}): give the --root a sweep "
                                 "ran in.")
            return report(args)
        points = prepare(args, extra)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    runner = Runner(args, extra)
    todo = [i for i, p in enumerate(points)
            if not summary.is_finished(p["workdir"], dict(summary.read_point(p["workdir"]),
                                                            total_steps=p["total_steps"]))]
    if args.dry_run:
        if args.launcher == "slurm":
            print(slurm_script(args, points, extra, todo) if todo else "# nothing to run")
        else:
            for p in points:
                print(shlex.join(runner.command(p)))
                if args.eval:
                    print(shlex.join(runner.eval_command(p, args.eval)))
        return 0
    os.makedirs(args.root, exist_ok=True)
    with open(os.path.join(args.root, "sweep.json"), "w") as f:
        json.dump(dict(config=args.config, extra=extra, eval=args.eval, metric=args.metric,
                       keys=list(dict.fromkeys(k for p in points for k, _ in p["point"])),
                       points=[dict(name=p["name"], values=dict(p["point"]),
                                   total_steps=p["total_steps"]) for p in points]),
                  f, indent=2)
    for p in points:
        os.makedirs(p["workdir"], exist_ok=True)
    t0 = time.time()
    if args.launcher == "slurm":
        if not todo:
            print("Every point is finished; nothing submitted.")
            return report(args)
        path = os.path.join(args.root, "sweep.sbatch")
        with open(path, "w") as f:
            f.write(slurm_script(args, points, extra, todo))
        cmd = ["sbatch", *shlex.split(args.slurm_args), path]
        print("$ " + shlex.join(cmd), flush=True)
        try:
            return subprocess.call(cmd)
        except FileNotFoundError:
            print(f"error: sbatch not found; submit {path} yourself, or --dry_run.",
                  file=sys.stderr)
            return 1
    runner.run_all(points)
    print(f"Sweep of {len(points)} points: {time.time() - t0:.0f} s wall.", flush=True)
    return report(args)


def report(args) -> int:
    rows, metric = summary.write(args.root, metric=args.metric, plot=args.plot)
    print(open(os.path.join(args.root, "summary.md")).read(), flush=True)
    statuses = {r["status"] for r in rows}
    if "failed" in statuses:
        return 1
    return 0 if statuses <= {"done"} else EXIT_PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
