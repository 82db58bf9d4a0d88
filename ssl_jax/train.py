r"""The one training loop, for every method.

  python -m ssl_jax.train --config configs/simclr.py:dataset=fashion_mnist \
      --workdir runs/simclr [--config.optimizer.lr=0.3 ...]

Re-running the same command resumes from the newest complete checkpoint in
--workdir. Sections, top to bottom: mesh and checks -> input -> workdir (nothing
is written before the checks and the input have passed) -> state (restore or
initialise) -> loop (log, online probes, checkpoint) -> end.
What a run is made of (method, optimizer, state layout, the jitted step) is
built by the setup layer, ssl_jax/experiment.py; this file only drives it.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time

import jax
from absl import flags, logging

from ssl_jax import checkpoint, cli, cpu_budget, experiment, faults, parallel, storage
from ssl_jax import config as cfg_lib
from ssl_jax.data import decode, pipeline, sources, video_sampler
from ssl_jax.errors import UserError
from ssl_jax.progress import Progress, RunLog, Scalars

FLAGS = flags.FLAGS


def train(config, workdir: str):
    """Trains config.method and returns the final state (placed as the experiment's
    state_sharding)."""
    return run(config, workdir)[0]


def run(config, workdir: str, command: str | None = None, cpu_from: float | None = None):
    """train(), and what stopped it early: -> (state, None | "SIGTERM" | "SIGINT" |
    "budget": config.cpu_budget_minutes).
    command: the command line that started it (saved in WORKDIR/command.txt: the
    hints that say "re-run" print it). cpu_from: where the run's CPU time counts from
    (cpu_budget.process_seconds(); the train command: 0, its process's start; None: now)."""
    cpu_from = cpu_budget.process_seconds() if cpu_from is None else cpu_from
    # ------------------------------------------------------ mesh and checks
    # Everything that can refuse the run does so before the workdir is touched: the
    # config and the method (Experiment), the run already in the workdir, and the data
    # (below: the split, a video dataset's columns, a batch the split can fill). A start
    # that fails leaves the workdir as it was.
    # (A multi-process run has joined jax.distributed before this: cli.join_processes.)
    mesh = parallel.make_mesh()
    # Every process must train the same thing: a host with other code or flags
    # would make the collectives combine different programs' values.
    parallel.agree(config.to_json(sort_keys=True), "configs")
    exp = experiment.Experiment(config, experiment.data_spec(config), mesh)
    check_workdir(exp, workdir)
    cpu_budget.check(config.get("cpu_budget_minutes"))
    is_main = jax.process_index() == 0

    # --------------------------------------------------------------- input
    skip = config.data.get("skip_corrupt", False)
    source = sources.open_source(config.dataset, config.train_split, config.data_dir,
                                  skip_corrupt=skip, decode=decode.for_training(config))
    # What the frozen-feature consumers (a memory bank's warm start, the online kNN)
    # read: the same split, and for images of varying size the eval centre crop.
    eval_source = source if not exp.spec.varying_size else sources.open_source(
        config.dataset, config.train_split, config.data_dir, skip_corrupt=skip,
        decode=decode.for_eval(config))
    # Video positives (config.video): each query frame's key is another frame of its video.
    pairs = video_sampler.pair_sampler(config, exp.spec.image_shape)
    workers = pipeline.worker_count(config.data.worker_count, source)
    data_iter = pipeline.train_iterator(  # lazy: no batch is read, no worker started yet
        source, global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        worker_count=workers, pairs=pairs)

    # ------------------------------------------------------------- workdir
    # Local or a bucket (gs://: a pod's workers share it). Process 0 writes the
    # run's files; every process writes its part of each checkpoint.
    storage.path(workdir).mkdir(parents=True, exist_ok=True)
    # WORKDIR/train.log: the run's own lines (progress, evaluations, resumes, the end),
    # appended across restarts; the libraries' INFO stays out of it and the console.
    log = RunLog(storage.path(workdir) / "train.log" if is_main else None, enabled=is_main)
    if is_main:
        cfg_lib.save(config, workdir)
        if command:
            (storage.path(workdir) / "command.txt").write_text(command + "\n")
            log.say(f"command: {command}", log_only=True)
        if pairs is not None:
            log.say(pairs.describe())
        if workers:
            each = (f" in each of the {jax.process_count()} processes"
                    if jax.process_count() > 1 else "")
            log.say(f"Reading with {workers} grain worker processes{each} "
                    f"(config.data.worker_count={config.data.worker_count}).")

    # --------------------------------------------------------------- state
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.keep_ckpts)
    state, start = exp.restore(ckpt, data_iter)
    if state is None:
        state, start = exp.initial_state(), 0
        t0 = time.time()  # once, at step 0: a resume keeps its state
        state = exp.warm_start(state, eval_source)
        if is_main and exp.method.warm_start is not None:
            log.say(f"{config.method} warm start: {time.time() - t0:.1f} s", log_only=True)
    elif is_main:
        log.say(f"Resumed from step {start} in {ckpt.dir}")
    train_step = exp.train_step()
    total_steps, hook = exp.total_steps, exp.online

    # ---------------------------------------------------------------- loop
    writer = metrics_log = None
    if is_main:
        writer = Scalars(storage.path(workdir) / "tb")  # TensorBoard; gs:// too
        # One JSON object per log step (and per online evaluation): what sweeps and
        # scripts read, without parsing TensorBoard events. Appended on resume.
        metrics_log = storage.path(workdir) / "metrics.jsonl"
        n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
        log.say(f"{config.method}: {n_params / 1e6:.2f}M params, {total_steps} steps "
                f"({exp.steps_per_epoch} per epoch) of {config.batch_size} images on "
                f"{mesh.devices.size} device(s); workdir {workdir}")
    progress = Progress(total_steps, start, config.batch_size, enabled=is_main, log=log)
    # config.cpu_budget_minutes: the run stops (saved) at that much CPU time, resumes'
    # included (ssl_jax/cpu_budget.py says what is counted).
    budget = cpu_budget.Budget(config.get("cpu_budget_minutes"),
                               cpu_budget.spent_before(workdir, start), start_s=cpu_from)
    watch = exp.method.watch(config, exp.spec)  # e.g. DINO's collapse warning
    preemption = faults.Preemption()
    nonfinite = faults.NonFiniteCheck(config.get("nonfinite", "raise"),
                                      faults.leaf_names(state["params"]))
    step, finished, t_loop = start, False, time.perf_counter()
    spent = budget.exhausted()  # a resumed run whose budget is already used: no step
    end = start if spent else total_steps
    try:
        with jax.set_mesh(mesh):
            for step in range(start + 1, end + 1):
                batch = parallel.global_batch(next(data_iter), mesh)
                state, metrics = train_step(state, batch)
                metrics = nonfinite.add(step, metrics)
                last, stop = step == total_steps, preemption.requested(step)
                due = step % exp.ckpt_every == 0 or last or stop
                if budget.every_step() or step % exp.log_every == 0 or due:
                    budget.used()  # a collective in a multi-process run: at these steps only
                    spent = budget.exhausted()
                save = due or spent
                if step % exp.log_every == 0 or save:
                    nonfinite.check()  # before any checkpoint of this state
                    metrics = dict(jax.device_get(metrics), cpu_minutes=budget.seconds / 60)
                    warning = budget.at_log_step(step, total_steps)  # won't fit: say so once
                    if warning and is_main:
                        log.say(warning)
                    progress.update(step, metrics)
                    warning = watch(step, metrics) if watch is not None else None
                    if warning and is_main:
                        log.say(warning)
                    if writer is not None:
                        scalars = dict(metrics, skipped_steps=nonfinite.skipped,
                                       images_per_sec=progress.rate)
                        writer.add(step, {f"train/{k}": v for k, v in scalars.items()})
                        _log_line(metrics_log, step, {f"train/{k}": v for k, v in scalars.items()})
                if hook is not None and hook.due(step, last):
                    # online_knn (+ online_linear) on the test split; every process
                    # extracts its share of the features, the main one reports.
                    scalars = hook.evaluate(experiment.encoder_variables(state, config),
                                            state.get("online"), eval_source, mesh)
                    if is_main:
                        log.say("  " + "  ".join(f"{k} {v:.2f}%" for k, v in scalars.items())
                                + f" at step {step}")
                        writer.add(step, scalars)
                        _log_line(metrics_log, step, scalars)
                if save:
                    ckpt.save(step, state, data_iter, force=True)
                    if is_main:
                        budget.record(workdir, step)
                if stop or spent:
                    break
        finished = True
    finally:
        progress.close()
        try:
            _close(ckpt, writer, failing=not finished)
        finally:
            try:  # grain's worker processes stop and unlink their shared memory
                data_iter.close()
            finally:  # only now: a further SIGTERM must not kill the last save
                preemption.close()
    stopped_by = preemption.signal if step < total_steps else None
    if stopped_by is None and spent and step < total_steps:
        stopped_by = "budget"
    if is_main:
        if stopped_by == "budget":
            log.say(f"Stopped at the CPU budget ({budget.limit_s / 60:g} CPU-min, "
                    f"config.cpu_budget_minutes) at step {step}/{total_steps}: "
                    f"{budget.seconds / 60:.1f} CPU-min used, checkpoint in {ckpt.dir}. The "
                    "learning-rate schedule did not end: on this machine set "
                    f"--config.total_steps={step} for one that does.")
        elif stopped_by:
            what = "Stopped (Ctrl-C)" if stopped_by == "SIGINT" else "Preempted (SIGTERM)"
            log.say(f"{what} at step {step}/{total_steps}: checkpoint saved in "
                    f"{ckpt.dir}. Re-run the same command to resume.")
        else:
            n = nonfinite.skipped
            skipped = f" ({n} non-finite steps skipped)" if n else ""
            used = f" in {budget.seconds / 60:.1f} CPU-min" if budget.seconds else ""
            log.say(f"Done: {total_steps} steps{skipped}{used}, checkpoint in {ckpt.dir}")
        # Saves are written in the background; only the copy to host blocks the loop.
        # Worth a console line only when that is a real share of the run.
        blocked = (f"Checkpoint saves ({ckpt.saves}) blocked training for "
                   f"{ckpt.blocked_s:.1f} s")
        share = ckpt.blocked_s / max(time.perf_counter() - t_loop, 1e-9)
        if ckpt.blocked_s > 10 and share > 0.05:
            log.say(f"{blocked}, {share:.0%} of the run: save less often "
                    "(config.ckpt_every_*) or on a faster disk.")
        else:
            log.say(blocked + ".", log_only=True)
    return state, stopped_by


def check_workdir(exp: experiment.Experiment, workdir: str) -> None:
    """Refuses, before anything is written, to resume a run this config cannot continue:
    another config's (config.check_same_config), or, with
    config.resume_from_different_config, one whose saved state does not fit this
    config's arrays (read from the checkpoint's metadata: restoring it would fail with
    orbax's tree of every mismatch, after config.json was rewritten). A workdir without
    a complete checkpoint holds no run (a start that failed or stopped before its first
    save): any config may start there."""
    if not checkpoint.complete_steps(workdir):
        return
    stored = storage.path(workdir) / "config.json"
    stored = cfg_lib.load(workdir) if stored.exists() else None
    changed = cfg_lib.check_same_config(exp.config, stored)  # refused unless the override
    if stored is not None and not changed:  # the run's own config: its state fits
        return
    found = checkpoint.misfits(workdir, exp.shapes)
    if not found:  # it fits, or no readable metadata (restore() reports that)
        return
    step, differ = found
    was = f" of a {stored.method} run" if stored is not None else ""
    raise UserError(
        f"The checkpoint in {workdir} (step {step}{was}) does not fit this "
        f"{exp.config.method} config: {len(differ)} of its arrays differ "
        f"({'; '.join(differ[:3])}). {cfg_lib.RESUME_OVERRIDE} only resumes a change that "
        f"keeps the state's arrays ({cfg_lib.COMPATIBLE}); train this config in another "
        "--workdir.")


def _close(ckpt, writer, failing: bool) -> None:
    """Waits for the last checkpoint (complete or absent), then closes TensorBoard.

    failing: the loop is already raising (a failed save, a NaN, a dead peer). Then an
    error while closing (orbax's metadata flush or TensorBoard's on the same full disk)
    is logged, not raised: it would replace the error that names the cause and the
    newest complete checkpoint.
    """
    try:
        ckpt.close()
    except Exception as e:  # noqa: BLE001 -- see failing
        if not failing:
            raise
        logging.warning("Closing the checkpointer after the run failed: %s: %s",
                        type(e).__name__, e)
    finally:
        if writer is not None:
            writer.close()  # a full disk is logged there, not raised


def _log_line(path, step: int, scalars: dict) -> None:
    try:
        storage.append_text(
            path, json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
    except OSError as e:  # a full disk is the checkpoint's error to report, not this log's
        logging.warning("metrics.jsonl: %s", e)


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on SIGTERM with a checkpoint; re-run to resume
EXIT_INTERRUPTED = 130  # the shell's status for Ctrl-C: stopped with a checkpoint


def main(argv):
    del argv
    if not jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR wins
        jax.config.update("jax_compilation_cache_dir",
                          os.path.expanduser("~/.cache/ssl_jax/jax_compilation_cache"))
    cli.join_processes()
    command = "python -m ssl_jax.train " + shlex.join(sys.argv[1:])
    _, stopped_by = run(FLAGS.config, FLAGS.workdir, command, cpu_from=0.0)  # --config: cli.run parsed it
    if stopped_by == "SIGINT":
        sys.exit(EXIT_INTERRUPTED)
    if stopped_by and stopped_by != "budget":  # a budget's stop is the run's end
        sys.exit(EXIT_PREEMPTED)  # launch/slurm.sbatch requeues the job on this status


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
    flags.mark_flags_as_required(["workdir"])
    cli.define_process_flags()
    cli.run(main, config=cli.FILE)
