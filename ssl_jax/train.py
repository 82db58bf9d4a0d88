r"""The one training loop, for every method.

  python -m ssl_jax.train --config configs/simclr.py:dataset=fashion_mnist \
      --workdir runs/simclr [--config.optimizer.lr=0.3 ...]

Re-running the same command resumes from the newest complete checkpoint in
--workdir. Sections, top to bottom: mesh -> input -> method, optimizer and state
-> restore -> jitted step -> loop (log, checkpoint) -> final checkpoint.
"""
from __future__ import annotations

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from ssl_jax import checkpoint, faults, methods, optim, parallel
from ssl_jax import config as cfg_lib
from ssl_jax.data import pipeline
from ssl_jax.eval import online
from ssl_jax.methods import network
from ssl_jax.progress import Progress

FLAGS = flags.FLAGS


def _check_same_config(config, workdir: str) -> None:
    """A workdir belongs to one config: resuming under another silently mixes runs."""
    if not os.path.exists(os.path.join(workdir, "config.json")):
        return
    changed = cfg_lib.diff(cfg_lib.load(workdir), config)
    changed = [c for c in changed if not c.startswith("resume_from_different_config")]
    if changed and not config.resume_from_different_config:
        raise ValueError(
            f"{workdir} holds a run of a different config; differing keys:\n  "
            + "\n  ".join(changed)
            + "\nUse another --workdir, or pass --config.resume_from_different_config=True.")


def check_images(config, image_shape) -> None:
    """The dataset's images must match what the config normalises: one mean/std
    value per channel (a 1-value preset would silently treat RGB as grey)."""
    if len(image_shape) != 3:
        raise ValueError(f"{config.dataset} images have shape {image_shape}; the encoders take "
                         "(H, W, C) images.")
    c = image_shape[-1]
    for name in ("mean", "std"):
        n = len(config.aug[name])
        if n != c:
            raise ValueError(
                f"{config.dataset} has {c}-channel images {image_shape} but config.aug.{name} has "
                f"{n} value(s): the config was made for another dataset. Use its preset for "
                f"this one (configs/{config.method}.py:dataset={config.dataset}) or set "
                f"--config.aug.mean and --config.aug.std with {c} values each.")


def optimizer(config, num_train_examples: int):
    """-> (total_steps, learning-rate schedule, optax transformation) of a run."""
    units = dict(steps_per_epoch=num_train_examples // config.batch_size,
                 batch_size=config.batch_size)
    total_steps = cfg_lib.steps(config, "total", **units)
    if total_steps is None:
        raise ValueError("Set one of config.total_steps / total_epochs / total_examples.")
    warmup = cfg_lib.steps(config.optimizer, "warmup", **units, default=0)
    decay = cfg_lib.steps(config.optimizer, "decay", **units, default=())  # "step" schedule
    schedule = optim.learning_rate(config.optimizer, config.batch_size, total_steps, warmup, decay)
    return total_steps, schedule, optim.make_optimizer(config.optimizer, schedule)


def state_initializer(config, method, tx, num_classes: int | None = None):
    """images (B, H, W, C) uint8 -> the train state at step 0.

    Also used (through jax.eval_shape) to know the checkpoint's structure. With
    config.online.linear the state also holds the online probe ("online"), which
    needs the dataset's num_classes.
    """
    if online.linear_enabled(config) and not num_classes:
        raise ValueError(f"config.online.linear=True needs labels, and {config.dataset} has "
                         "none: pass --config.online.linear=False.")

    def init_state(images):
        # Stream 0 of the seed initialises; stream 1 drives training (see train_step).
        r_views, r_init = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 0))
        params, method_state = method.init(r_init, method.views(r_views, images, config), config)
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": tx.init(params), "method_state": method_state}
        if online.linear_enabled(config):
            feats = jax.eval_shape(online.pooled_final(config),
                                   network.encoder_variables(params, method_state), images)
            state["online"] = online.init(config, feats.shape[-1], num_classes)
        return state
    return init_state


def state_sharding(method, shapes, mesh):
    """Where each leaf of the train state lives: replicated, except the method
    state of a method that says otherwise with `state_sharding(shapes, mesh)`
    (PIRL/NPID shard their memory bank's rows over the mesh)."""
    repl = parallel.replicated(mesh)
    out = jax.tree.map(lambda _: repl, shapes)
    if hasattr(method, "state_sharding"):
        out["method_state"] = method.state_sharding(shapes["method_state"], mesh)
    return out


def make_train_step(config, method, tx, schedule, mesh, state_sh):
    """-> jitted (state, batch) -> (state, metrics); the state is donated.

    batch: {"image": (B, H, W, C) uint8, "index": (B,) int32} sharded over the
    mesh's data axis; views are made on device inside the step. state_sh: the
    state's shardings (`state_sharding`).
    """
    base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    repl, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    nan_at = config.get("debug_nan_at_step")  # tests only: poison the loss at this step

    def loss_fn(params, method_state, views, index, rng, step):
        loss, aux = method.loss(params, method_state, views, index, rng, config)
        if nan_at is not None:
            loss = loss * jnp.where(step + 1 == nan_at, jnp.nan, 1.0)
        return loss, aux

    @functools.partial(jax.jit, donate_argnums=0,
                       in_shardings=(state_sh, batch_sharding), out_shardings=(state_sh, repl))
    def train_step(state, batch):
        # Every random number of step s comes from fold_in(seed, s): resuming at
        # step s replays exactly the randomness an uninterrupted run would use.
        r_views, r_loss = jax.random.split(jax.random.fold_in(base_rng, state["step"]))
        views = method.views(r_views, batch["image"], config)
        if getattr(method, "USES_LABELS", False):
            views = dict(views, label=batch["label"])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (metrics, method_state)), grads = grad_fn(
            state["params"], state["method_state"], views, batch["index"], r_loss, state["step"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, loss=loss, lr=schedule(state["step"]),
                       grad_norm=optax.tree.norm(grads))
        # A non-finite loss or gradient leaves the state as it was (faults.py); the
        # step counter moves on either way, as the data iterator does.
        new = {"params": params, "opt_state": opt_state, "method_state": method_state}
        if "online" in state:  # eval/online.py: sees the encoder, never trains it
            new["online"], online_metrics = online.update(
                config, state["online"], state["params"], state["method_state"],
                batch["image"], batch["label"])
            metrics.update(online_metrics)
        old = {k: state[k] for k in new}
        new, flags = faults.guarded_update(loss, grads, new, old)
        return dict(new, step=state["step"] + 1), dict(metrics, **flags)
    return train_step


def train(config, workdir: str):
    """Trains config.method and returns the final state (placed as `state_sharding`)."""
    # ---------------------------------------------------------------- mesh
    parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh()
    method = methods.get(config.method)
    parallel.check_batch_size(config.batch_size, mesh)
    if hasattr(method, "check"):
        method.check(config, config.batch_size)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    _check_same_config(config, workdir)
    if is_main:
        cfg_lib.save(config, workdir)
        logging.get_absl_handler().use_absl_log_file("train", workdir)

    # --------------------------------------------------------------- input
    source = pipeline.open_source(config.dataset, config.train_split, config.data_dir,
                                  skip_corrupt=config.data.get("skip_corrupt", False))
    steps_per_epoch = len(source) // config.batch_size
    units = dict(steps_per_epoch=steps_per_epoch, batch_size=config.batch_size)
    total_steps, schedule, tx = optimizer(config, len(source))
    log_every = cfg_lib.steps(config, "log_every", **units, default=50)
    ckpt_every = cfg_lib.steps(config, "ckpt_every", **units, default=total_steps)
    data_iter = pipeline.train_iterator(
        source, global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        worker_count=config.data.worker_count)
    image_shape = tuple(source[0]["image"].shape)
    check_images(config, image_shape)
    online_every = cfg_lib.steps(config.get("online", {}), "every", **units)
    num_classes = None
    if online_every or online.linear_enabled(config):
        num_classes = pipeline.dataset_info(config.dataset, config.data_dir)["num_classes"]

    # ------------------------------------------ method, optimizer and state
    batch_sharding = parallel.batch_sharding(mesh)
    init_state = state_initializer(config, method, tx, num_classes)
    sample = jax.ShapeDtypeStruct((config.batch_size,) + image_shape, jnp.uint8,
                                  sharding=batch_sharding)
    shapes = jax.eval_shape(init_state, sample)
    state_sh = state_sharding(method, shapes, mesh)
    abstract_state = checkpoint.abstract(shapes, state_sh)

    # ------------------------------------------------------------- restore
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.keep_ckpts)
    state, start = ckpt.restore(abstract_state, data_iter)
    with jax.set_mesh(mesh):
        if state is None:
            state = jax.jit(init_state, out_shardings=state_sh)(
                jnp.zeros(sample.shape, jnp.uint8, device=batch_sharding))
            start = 0
            if hasattr(method, "warm_start"):  # once, at step 0: a resume keeps its state
                t0 = time.time()
                state["method_state"] = method.warm_start(
                    state["params"], state["method_state"], source, config, mesh)
                if is_main:
                    logging.info("%s.warm_start: %.1f s", config.method, time.time() - t0)
        elif is_main:
            logging.info("Resumed from step %d in %s", start, ckpt.dir)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))

    # ----------------------------------------------------------- jitted step
    train_step = make_train_step(config, method, tx, schedule, mesh, state_sh)

    # ---------------------------------------------------------------- loop
    writer = None
    if is_main:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(os.path.join(workdir, "tb"))
        print(f"{config.method}: {n_params / 1e6:.2f}M params, {total_steps} steps "
              f"({steps_per_epoch} per epoch) of {config.batch_size} images on "
              f"{mesh.devices.size} device(s); workdir {workdir}", flush=True)
    progress = Progress(total_steps, start, config.batch_size, enabled=is_main)
    preemption = faults.Preemption()
    nonfinite = faults.NonFiniteCheck(config.get("nonfinite", "raise"),
                                      faults.leaf_names(state["params"]))
    # Every process extracts its share of the features; the main one reports.
    online_eval = online.Evaluator(config, source, mesh) if online_every else None
    step = start
    try:
        with jax.set_mesh(mesh):
            for step in range(start + 1, total_steps + 1):
                batch = parallel.global_batch(next(data_iter), mesh)
                state, metrics = train_step(state, batch)
                metrics = nonfinite.add(step, metrics)
                last, stop = step == total_steps, preemption.requested(step)
                save = step % ckpt_every == 0 or last or stop
                if step % log_every == 0 or save:
                    nonfinite.check()  # before any checkpoint of this state
                    metrics = jax.device_get(metrics)
                    progress.update(step, metrics)
                    if writer is not None:
                        scalars = dict(metrics, skipped_steps=nonfinite.skipped,
                                       images_per_sec=progress.rate)
                        for k, v in scalars.items():
                            writer.add_scalar(f"train/{k}", float(v), step)
                        logging.info("step %d %s", step, {k: float(v) for k, v in scalars.items()})
                if online_eval is not None and (step % online_every == 0 or last):
                    scalars = online_eval(state)  # online_knn (+ online_linear) on test
                    if is_main:
                        print("  " + "  ".join(f"{k} {v:.2f}%" for k, v in scalars.items())
                              + f" at step {step}", flush=True)
                        for k, v in scalars.items():
                            writer.add_scalar(k, v, step)
                if save:
                    ckpt.save(step, state, data_iter, force=True)
                if stop:
                    break
    finally:
        preemption.close()
        progress.close()
        try:
            ckpt.close()  # waits for the last save: a checkpoint is complete or absent
        finally:
            if writer is not None:
                try:
                    writer.close()
                except OSError as e:  # a full disk must not hide the checkpoint's error
                    logging.warning("TensorBoard writer: %s", e)
    if is_main:
        if step < total_steps:
            print(f"Preempted (SIGTERM) at step {step}/{total_steps}: checkpoint saved in "
                  f"{ckpt.dir}. Re-run the same command to resume.", flush=True)
        else:
            n = nonfinite.skipped
            skipped = f" ({n} non-finite steps skipped)" if n else ""
            print(f"Done: {total_steps} steps{skipped}, checkpoint in {ckpt.dir}", flush=True)
        print(f"Checkpointing: {ckpt.saves} saves blocked training for {ckpt.blocked_s:.1f} s "
              "in all (arrays are copied to host, then written in the background).", flush=True)
    return state


def main(argv):
    del argv
    if not jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR wins
        jax.config.update("jax_compilation_cache_dir",
                          os.path.expanduser("~/.cache/ssl_jax/jax_compilation_cache"))
    cfg_lib.clear_other_units(FLAGS.config, sys.argv)
    train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
    flags.mark_flags_as_required(["config", "workdir"])
    cfg_lib.check_command_line(sys.argv)
    sys.exit(app.run(main))
