"""The setup layer: a config, the data's spec and a mesh -> everything a run is made of.

    spec = experiment.data_spec(config)            # from the prepared dataset's metadata
    exp = experiment.Experiment(config, spec, mesh)  # every check; nothing compiled yet
    state = exp.initial_state()                    # or exp.restore(ckpt, data_iter)
    state = exp.warm_start(state, source)          # step 0 only (e.g. a memory bank)
    step = exp.train_step()                        # jitted (state, batch) -> (state, metrics)

train, evaluate, export and the benchmarks all build a run through here, so the
state's layout is defined once. The train state:

    {"step": () int32, "params": ..., "opt_state": ..., "method_state": ...,
     and "online": the online linear probe's state when config.online.linear}

Stream 0 of fold_in(key(seed), .) initialises, stream 1 drives training: step s
uses fold_in(stream 1, s), so a resumed run replays the randomness an
uninterrupted one would use.

Gradient accumulation (config.accumulate_steps): ssl_jax/accumulate.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_jax import accumulate, checkpoint, errors, faults, methods, optim, parallel
from ssl_jax import config as cfg_lib
from ssl_jax.data import decode, sources, video_sampler
from ssl_jax.dataspec import DataSpec
from ssl_jax.eval import features, online
from ssl_jax.methods import network
from ssl_jax.views import augment, canvas, pair


def data_spec(config, info: dict | None = None) -> DataSpec:
    """The train split's facts from the prepared dataset's metadata, without
    decoding it (a sliced split, e.g. "train[:10%]", is opened to count it).
    Images of varying size are decoded onto config.data.canvas-sized canvases.
    info: that metadata as sources.dataset_info gives it (default: read from the
    prepared dataset; raises sources.DatasetNotFoundError when it is not prepared)."""
    info = info or sources.dataset_info(config.dataset, config.data_dir)
    n, shape = info["num_examples"].get(config.train_split), tuple(info["image_shape"])
    varying = None in shape[:2]
    if varying:
        size = canvas_size(config)
        shape = (size, size, shape[-1] or 3)
    if n is None:
        n = len(sources.open_source(config.dataset, config.train_split, config.data_dir,
                                    memory_limit=0, decode=decode.for_training(config)))
    return DataSpec(num_examples=int(n), image_shape=shape, num_classes=info["num_classes"],
                    class_names=tuple(info["class_names"]), varying_size=varying)


def canvas_size(config) -> int:
    """config.data.canvas, checked: the side of the canvas images of varying size
    are decoded onto (views are cropped from them on device)."""
    size = config.data.get("canvas", 512)  # a stored config from before the field
    crop = max(config.aug.crop_size)
    if isinstance(size, bool) or not isinstance(size, int) or size < crop:
        raise errors.UserError(
            f"config.data.canvas={size!r}: {config.dataset}'s images vary in size and are "
            f"decoded onto a square canvas whose side must be an integer >= the crop "
            f"({crop}); e.g. --config.data.canvas={max(512, 2 * crop)} (an image that does not "
            "fit is shrunk to fit, so crops of it come from fewer pixels).")
    return size


def check_images(config, image_shape) -> None:
    """The dataset's images must match what the config normalises: one mean/std
    value per channel (a 1-value preset would silently treat RGB as grey)."""
    if len(image_shape) != 3:
        raise errors.UserError(f"{config.dataset} images have shape {image_shape}; the "
                               "encoders take (H, W, C) images.")
    c = image_shape[-1]
    for name in ("mean", "std"):
        n = len(config.aug[name])
        if n != c:
            raise errors.UserError(
                f"{config.dataset} has {c}-channel images {image_shape} but config.aug.{name} "
                f"has {n} value(s): the config was made for another dataset. Use its preset for "
                f"this one (configs/{config.method}.py:dataset={config.dataset}) or set "
                f"--config.aug.mean and --config.aug.std with {c} values each.")


def check_batch(config, spec: DataSpec, mesh) -> None:
    """config.batch_size: a positive integer that splits over the devices and processes,
    and that the train split can fill (an epoch of no step has no schedule)."""
    b, n = config.batch_size, mesh.devices.size
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise errors.UserError(f"config.batch_size={b!r}: use a positive integer, the "
                               f"global batch (a multiple of the {n} device(s)).")
    parallel.check_batch_size(b, mesh)
    if spec.num_examples < b:
        fits = max(n, spec.num_examples // n * n)
        raise errors.UserError(
            f"A split of {spec.num_examples} examples ({config.dataset} {config.train_split}) "
            f"cannot fill a batch of {b}: use --config.batch_size={fits} or less, or a "
            "bigger split.")


def check_accumulate_steps(config, mesh) -> int:
    """config.accumulate_steps (1 where a stored config predates it) -> A, checked: an
    integer >= 1 dividing the per-device batch, so every micro-batch splits evenly
    over the devices."""
    a = config.get("accumulate_steps", 1)
    if isinstance(a, bool) or not isinstance(a, int) or a < 1:
        raise errors.UserError(f"config.accumulate_steps={a!r}: use an integer >= 1 "
                               "(1: no gradient accumulation).")
    n = mesh.devices.size
    per_device = config.batch_size // n
    if per_device % a:
        fits = max(d for d in range(1, a + 1) if per_device % d == 0)
        raise errors.UserError(
            f"config.accumulate_steps={a} does not divide the per-device batch {per_device} "
            f"(config.batch_size={config.batch_size} over {n} devices): each micro-batch "
            f"takes per_device / accumulate_steps images from every device. Use "
            f"--config.accumulate_steps={fits}, or a config.batch_size that is a multiple of "
            f"{n * a} (e.g. {max(1, config.batch_size // (n * a)) * n * a}).")
    return a


def init_model(config, spec: DataSpec, images):
    """images (B, H, W, C) uint8 -> (params, method_state) at step 0: stream 0 of
    the seed, split into the views' key and the initialisation's."""
    method = methods.get(config.method)
    r_views, r_init = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 0))
    return method.init(r_init, method.views(r_views, images, config), config, spec)


def at(tree, path, default=None):
    """tree[path[0]][path[1]]..., or `default` where a key is missing (ViTs: no BN)."""
    for key in path:
        if key not in tree:
            return default
        tree = tree[key]
    return tree


def encoder_variables(state, config) -> dict:
    """The frozen encoder's variables of a train state, {"params", "batch_stats"}: where the
    method keeps the encoder it evaluates (Method.encoder_at: the trained one,
    params["encoder"], for all but DINO, whose teacher is evaluated by default)."""
    p, s = methods.get(config.method).encoder_at(config)
    return {"params": at(state, p), "batch_stats": at(state, s, {})}


class Experiment:
    """A method's run: its optimizer, schedule, intervals, train state and step.

    Constructing it runs every check that needs no compilation (batch vs mesh,
    channels vs normalisation, the method's own `check`, interval units, the
    online probes' needs), so an entry point can construct it before writing
    anything.
    """

    def __init__(self, config, spec: DataSpec, mesh):
        self.config, self.spec, self.mesh = config, spec, mesh
        self.method = methods.get(config.method)
        check_batch(config, spec, mesh)
        self.accumulate_steps = check_accumulate_steps(config, mesh)
        check_images(config, spec.image_shape)
        self.method.check(config, spec, mesh)
        self.steps_per_epoch = spec.num_examples // config.batch_size
        units = dict(steps_per_epoch=self.steps_per_epoch, batch_size=config.batch_size)
        self.total_steps = cfg_lib.steps(config, "total", **units)
        if self.total_steps is None:
            raise errors.UserError(
                "Set one of config.total_steps / total_epochs / total_examples.")
        warmup = cfg_lib.steps(config.optimizer, "warmup", **units, default=0)
        decay = cfg_lib.steps(config.optimizer, "decay", **units, default=())  # "step" schedule
        self.schedule = optim.learning_rate(config.optimizer, config.batch_size,
                                            self.total_steps, warmup, decay)
        freeze = cfg_lib.steps(config.optimizer, "freeze", **units, default=0)
        self.tx = optim.make_optimizer(config.optimizer, self.schedule, self.total_steps, freeze)
        self.log_every = cfg_lib.steps(config, "log_every", **units, default=50)
        self.ckpt_every = cfg_lib.steps(config, "ckpt_every", **units, default=self.total_steps)
        self.online = online.make(config, spec, units, self.encoder_features())
        if config.get("nonfinite", "raise") not in faults.POLICIES:
            raise errors.UserError(f"config.nonfinite={config.nonfinite!r} unknown; valid: "
                                   f"{list(faults.POLICIES)}.")
        self.batch_sharding = parallel.batch_sharding(mesh)
        # What a method's views get: a batch of images, or of canvases (varying sizes).
        b, shard = config.batch_size, self.batch_sharding
        self.sample = jax.ShapeDtypeStruct((b,) + tuple(spec.image_shape), jnp.uint8,
                                           sharding=shard)
        if spec.varying_size:
            self.sample = canvas.Canvas(self.sample, jax.ShapeDtypeStruct((b, 2), jnp.int32,
                                                                          sharding=shard))
        # Video positives (config.video): the data brings each example's two images.
        self.positives = video_sampler.positives(config)
        if self.positives != "frame":
            if not self.method.takes_pairs:
                raise errors.UserError(
                    f"config.video.positives={self.positives!r}: {config.method} does not take "
                    "positive pairs from the data (its views are not two views of one image); "
                    "the two-view methods simclr and moco do. Use one of them, or positives="
                    "frame.")
            if self.positives == "region":  # crops of the object, one size, no canvas
                r = video_sampler.region_size(config, spec.image_shape)
                self.sample = jax.ShapeDtypeStruct((b, r, r, spec.image_shape[-1]), jnp.uint8,
                                                   sharding=shard)
            self.sample = pair.Pair(self.sample, self.sample)
        # Tracing the initialiser (no compilation) finds the model's and the views'
        # config mistakes (an unknown encoder, tiles too small for it, ...) here too.
        self.shapes = jax.eval_shape(self.init_state, self.sample)

    # ------------------------------------------------------------ the state

    def init_state(self, images):
        """images (B, H, W, C) uint8 (a canvas.Canvas for images of varying size, a
        pair.Pair for video positives) -> the train state at step 0 (module docstring)."""
        params, method_state = init_model(self.config, self.spec, images)
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": self.tx.init(params), "method_state": method_state}
        if self.online is not None and self.online.stateful:
            state["online"] = self.online.init(encoder_variables(state, self.config),
                                               pair.first(images))
        return state

    @functools.cached_property
    def state_sharding(self):
        """Replicated, except the method state of a method that shards it (a memory bank)."""
        out = jax.tree.map(lambda _: parallel.replicated(self.mesh), self.shapes)
        out["method_state"] = self.method.state_sharding(self.shapes["method_state"], self.mesh)
        return out

    def abstract_state(self):
        return checkpoint.abstract(self.shapes, self.state_sharding)

    def initial_state(self):
        with jax.set_mesh(self.mesh):
            # Black images; a canvas's valid size (the int32 leaf) is the whole canvas, so
            # no crop is empty.
            images = jax.tree.map(lambda x: jnp.full(
                x.shape, self.spec.image_shape[0] if x.dtype == jnp.int32 else 0, x.dtype,
                device=self.batch_sharding), self.sample)
            return jax.jit(self.init_state, out_shardings=self.state_sharding)(images)

    def restore(self, ckpt: checkpoint.Checkpointer, data_iter=None):
        """-> (state, step) of the newest readable checkpoint, data_iter restored in
        place; (None, None) when the workdir has none."""
        return ckpt.restore(self.abstract_state(), data_iter)

    def encoder_features(self):
        """-> (final stage, f(variables, images uint8) -> {stage: (B, C)}): the eval view's
        globally pooled final stage, what the online probes read."""
        stage = network.final_stage(self.config.model)
        return stage, features.make_features_fn(network.make_encoder(self.config.model),
                                                features.eval_view_config(self.config),
                                                stages=(stage,))

    # ------------------------------------------------------------ step 0

    def warm_start(self, state, source):
        """The method's WarmStart, if this run wants one: its embeddings of the train
        split (`source`) through the feature extraction, written into the method state
        one global batch at a time. Returns the state (method_state replaced)."""
        ws, config, mesh = self.method.warm_start, self.config, self.mesh
        if ws is None or not ws.wanted(config):
            return state
        view = features.eval_view_config(config)

        def embed(variables, images):
            x = augment.batch_views(jax.random.key(0), images, view)
            return {"embed": ws.embed(*variables, x, config)}
        with jax.set_mesh(mesh):
            emb, _ = features.extract(embed, (state["params"], state["method_state"]), source,
                                      batch_size=config.batch_size, mesh=mesh)
        emb = emb["embed"]  # (N, D) numpy, every row on every process
        rows = getattr(source, "index", None)  # an in-memory split that skipped corrupt rows
        index = np.arange(len(emb), dtype=np.int32) if rows is None else np.asarray(rows)
        sh = self.state_sharding["method_state"]
        write = jax.jit(lambda s, i, v: ws.write(s, i, v, config, self.spec), donate_argnums=0,
                        in_shardings=(sh, self.batch_sharding, self.batch_sharding),
                        out_shardings=sh)
        b, p = config.batch_size, jax.process_count()
        local = slice(jax.process_index() * b // p, (jax.process_index() + 1) * b // p)
        method_state = state["method_state"]
        with jax.set_mesh(mesh):
            for first in range(0, len(emb), b):
                i, v = index[first:first + b], emb[first:first + b]
                i = np.concatenate([i, np.full((b - len(i),), -1, np.int32)])
                v = np.concatenate([v, np.zeros((b - len(v), v.shape[1]), v.dtype)])
                batch = parallel.global_batch({"i": i[local], "v": v[local]}, mesh)
                method_state = write(method_state, batch["i"], batch["v"])
        return dict(state, method_state=method_state)

    # ------------------------------------------------------------ the step

    def train_step(self):
        """-> jitted (state, batch) -> (state, metrics); the state is donated.

        batch: {"image": (B, H, W, C) uint8, "index": (B,) int32, "label": (B,) int32,
        "image_hw" (B, 2) int32 for canvases, "key_image" (B, H, W, C) for video
        positives} sharded over the mesh's data axis;
        views are made on device inside the step.
        The method sees batch["label"] only if it declares uses_labels.
        """
        config, method, tx, hook = self.config, self.method, self.tx, self.online
        base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
        repl = parallel.replicated(self.mesh)
        grads_fn = accumulate.grads_fn(method, config, self.spec, self.mesh,
                                       self.state_sharding["method_state"],
                                       self.accumulate_steps)

        @functools.partial(jax.jit, donate_argnums=0, out_shardings=(self.state_sharding, repl),
                           in_shardings=(self.state_sharding, self.batch_sharding))
        def train_step(state, batch):
            r_views, r_loss = jax.random.split(jax.random.fold_in(base_rng, state["step"]))
            images = pair.images_of(batch)
            views = method.views(r_views, images, config)
            facts = {"index": batch["index"]}
            if method.uses_labels:
                facts["label"] = batch["label"]
            method_state = method.before_step(state["params"], state["method_state"], config)
            loss, metrics, method_state, grads = grads_fn(
                state["params"], method_state, views, facts, r_loss)
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            method_state = method.after_step(params, method_state, config, self.spec)
            metrics = dict(metrics, loss=loss, lr=self.schedule(state["step"]),
                           grad_norm=optax.tree.norm(grads))
            # A non-finite loss or gradient leaves the state as it was (faults.py); the
            # step counter moves on either way, as the data iterator does.
            new = {"params": params, "opt_state": opt_state, "method_state": method_state}
            if "online" in state:  # sees the encoder, never trains it
                new["online"], online_metrics = hook.update(
                    state["online"], encoder_variables(state, config), pair.first(images),
                    batch["label"])
                metrics.update(online_metrics)
            old = {k: state[k] for k in new}
            new, flags = faults.guarded_update(loss, grads, new, old)
            return dict(new, step=state["step"] + 1), dict(metrics, **flags)
        return train_step
