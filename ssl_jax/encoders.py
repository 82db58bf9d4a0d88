"""Frozen encoders for evaluation and export: from a training run, at random init,
or from an exported folder (its format, read and written here).

  config, encoder, variables, step = encoders.load_run(workdir, mesh)
  features_fn, variables = encoders.load_export(out)    # what ssl_jax.export.load is

A run's encoder is read alone from its newest checkpoint (orbax partial restore of
params["encoder"] and method_state["batch_stats"]["encoder"]): no optimizer state,
no memory bank, no decode of the dataset (its metadata gives the shapes).

An export (python -m ssl_jax.export) holds
  encoder/      the encoder's parameters and BN statistics (an orbax checkpoint)
  params.npz    the same arrays flat, "params/conv1/kernel" -> array, for other frameworks
  export.json   format version, the model config, the preprocessing the encoder
                expects (input size and channels, eval crop, mean/std), its
                stages, where it came from (workdir, step, method, dataset),
                the data it was trained on (dataset, data_dir, train_split,
                num_classes) and the run's evaluation settings (config.eval and seed)
An artefact written by a newer format version is refused; "data" and "eval" were
added within format version 1, so readers treat them as optional.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ssl_jax import checkpoint, errors, experiment, methods, models, parallel, storage
from ssl_jax import config as cfg_lib
from ssl_jax import eval as eval_lib
from ssl_jax.data import sources
from ssl_jax.eval import features
from ssl_jax.methods import network

FORMAT_VERSION = 1


def _encoder_init(config, spec):
    """images -> the encoder's variables at step 0 (a function to jit or eval_shape)."""
    return lambda images: network.encoder_variables(*experiment.init_model(config, spec, images))


def load_run(workdir: str, mesh, random_init: bool = False):
    """-> (config, encoder module, encoder variables, step) from a workdir's newest
    checkpoint; or, with random_init, the same encoder as initialised (step 0,
    seed config.seed), the baseline a pretrained encoder must beat."""
    config = cfg_lib.load(workdir)
    ckpt = None
    if not random_init:
        ckpt = checkpoint.Checkpointer(workdir, async_save=False)
        if ckpt.latest_step() is None:  # say so before reading data or tracing the model
            ckpt.close()
            stored = storage.path(workdir) / "command.txt"  # written by the run's train
            again = (f"`{stored.read_text().strip()}`, the run's own command, resumes it"
                     if stored.exists() else
                     f"`python -m ssl_jax.train --config configs/{config.method}.py --workdir "
                     f"{workdir}`, with the config arguments it was started with, resumes it")
            raise errors.UserError(
                f"No checkpoint in {ckpt.dir}: {workdir} has a config.json but no trained "
                f"weights yet. Train first ({again}), or pass --random_init for the "
                "untrained baseline.")
    spec = experiment.data_spec(config)
    init = _encoder_init(config, spec)
    images = jax.ShapeDtypeStruct((config.batch_size,) + spec.image_shape, jnp.uint8)
    with jax.set_mesh(mesh):
        if random_init:
            variables, step = jax.jit(init)(jnp.zeros(images.shape, images.dtype)), 0
        else:
            shapes = jax.eval_shape(init, images)  # shapes only: no batch is allocated
            # Where the method keeps the encoder it evaluates (DINO: the teacher's).
            p_path, s_path = methods.get(config.method).encoder_at(config)
            check_stored_encoder(workdir, config, shapes["params"], p_path)
            part = _nest(p_path, shapes["params"])
            if shapes["batch_stats"]:  # a ViT has none (and its run may store {} there)
                part = _merge(part, _nest(s_path, shapes["batch_stats"]))
            got, step = ckpt.restore_state_only(
                checkpoint.abstract(part, parallel.replicated(mesh)), partial=True)
            ckpt.close()
            variables = {"params": experiment.at(got, p_path),
                         "batch_stats": experiment.at(got, s_path, {})}
    return config, network.make_encoder(config.model), variables, step


def _nest(path, leaf) -> dict:
    """("a", "b"), x -> {"a": {"b": x}}."""
    for key in reversed(path):
        leaf = {key: leaf}
    return leaf


def _merge(a: dict, b: dict) -> dict:
    """Two nested dicts with disjoint leaves -> one."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if k in out else v
    return out


def check_stored_encoder(workdir: str, config, params,
                         path=("params", "encoder")) -> None:
    """Refuses, in one line, a checkpoint whose encoder arrays have other shapes than
    config.json's model builds (`params`: their ShapeDtypeStructs), read from its
    metadata before restoring: orbax would fail with a tree of every mismatch. A ViT's
    learned position table is stored for config.model.img_size (its grid); evaluating
    another crop size resamples it, but a config whose img_size changed after training
    no longer describes the stored table."""
    saved = checkpoint.saved_shapes(workdir)
    if saved is None:  # nothing readable: restore() reports it
        return
    step, have = saved
    want = checkpoint.leaf_shapes(_nest(path, params))
    differ = [k for k, shape in want.items() if k in have and have[k] != shape]
    if not differ:
        return
    table, model = "/".join(path) + "/pos_embedding", config.model
    if table in differ:
        grid, patch = have[table][1:3], model.patch
        size = model.img_size if isinstance(model.img_size, int) else list(model.img_size)
        raise errors.UserError(
            f"The checkpoint in {workdir} (step {step}) stores the ViT's position table for "
            f"a {grid[0]}x{grid[1]} grid (img_size {grid[0] * patch}x{grid[1] * patch}), not "
            f"config.json's model.img_size={size}: set it back to "
            f"{[grid[0] * patch, grid[1] * patch]} in {workdir}/config.json (another eval "
            "crop size is resampled, not configured).")
    raise errors.UserError(
        f"The checkpoint in {workdir} (step {step}) does not fit config.json's model: "
        f"{len(differ)} encoder arrays differ ({differ[0]}: {have[differ[0]]} stored, "
        f"{want[differ[0]]} configured); restore config.json's model fields to the run's.")


# ------------------------------------------------------------------ exports

def _flat(tree) -> dict[str, np.ndarray]:
    """{"params": {"conv1": {"kernel": x}}} -> {"params/conv1/kernel": x}."""
    return {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_out(out, overwrite: bool) -> None:
    """An export goes into a new or empty folder, or replaces an earlier export whole
    (overwrite): never beside another encoder's eval_*.json and results.md."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / "export.json").exists():
        raise errors.UserError(f"--out {out} is a folder that holds files and no export: "
                               "choose a new or empty folder for the export.")
    if not overwrite:
        raise errors.UserError(f"--out {out} holds an export already (with whatever was "
                               "evaluated on it): pass --overwrite to replace it whole, or "
                               "choose another --out.")


def write_export(workdir: str, out: str, overwrite: bool = False) -> dict:
    """Writes the encoder of `workdir`'s newest checkpoint to `out`; -> export.json's
    contents. `out` must be new or empty, or an earlier export with overwrite: that is
    then replaced whole (written beside it first, so a failure leaves the old one)."""
    final = storage.path(out)
    _check_out(final, overwrite)
    mesh = parallel.make_mesh()
    config, _, variables, step = load_run(workdir, mesh)
    variables = jax.device_get(variables)
    info = sources.dataset_info(config.dataset, config.data_dir)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": config.model.to_dict(),
        "preprocessing": {"input_shape": list(info["image_shape"]),
                          "view": features.eval_view_config(config).to_dict(),
                          "dtype": "uint8"},
        "stages": models.stages(config.model.name, **network.encoder_kwargs(config.model)),
        "source": {"workdir": str(storage.path(workdir)), "step": int(step),
                   "method": config.method, "dataset": config.dataset},
        "data": {"dataset": config.dataset, "data_dir": config.data_dir,
                 "train_split": config.train_split, "num_classes": info["num_classes"]},
        "eval": dict(config.eval.to_dict(), seed=config.seed),
    }
    # Local, or a bucket's gs://. Written into a sibling first: the old export (if any)
    # goes only once the new one is whole.
    out = final.parent / f".{final.name}.writing"
    if out.exists():  # an earlier, interrupted export
        out.rmtree()
    out.mkdir(parents=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(out / "encoder", variables, force=True)
    ckpt.wait_until_finished()
    with (out / "params.npz").open("wb") as f:
        np.savez(f, **_flat(variables))
    (out / "export.json").write_text(json.dumps(meta, indent=2, default=list))
    if final.exists():
        final.rmtree()
    out.rename(final)
    return meta


def read_meta(out: str) -> dict:
    """export.json of `out`; errors when it is not an export, or a newer format."""
    path = storage.path(out) / "export.json"
    if not path.exists():
        raise errors.UserError(
            f"{path} not found: {out} is not an exported encoder. Write one with "
            "`python -m ssl_jax.export --workdir RUN --out OUT`.")
    meta = json.loads(path.read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise errors.UserError(
            f"{out} was exported with format version {meta['format_version']}; this ssl_jax "
            f"reads versions <= {FORMAT_VERSION}: upgrade ssl_jax.")
    return meta


def eval_config(out: str, meta: dict, *, dataset=None, data_dir=None, train_split=None,
                test_split=None) -> ml_collections.ConfigDict:
    """The config fields evaluate reads, for an export: the arguments given win,
    then export.json's "data", "eval" and "source", then the evaluators' defaults
    (exports written before "data" and "eval" existed name only the dataset)."""
    data, source = meta.get("data", {}), meta.get("source", {})
    dataset = dataset or data.get("dataset") or source.get("dataset")
    if not dataset:
        raise errors.UserError(f"{storage.path(out) / 'export.json'} names no dataset: pass "
                               "--dataset (and --data_dir) to say what to evaluate on.")
    ev = dict(meta.get("eval", {}))
    seed = ev.pop("seed", 0)
    if test_split:
        ev["test_split"] = test_split
    config = ml_collections.ConfigDict(cfg_lib.to_tuples({
        "method": source.get("method", "exported"), "dataset": dataset,
        "data_dir": data_dir or data.get("data_dir"),
        "train_split": train_split or data.get("train_split") or "train",
        "seed": seed, "model": meta["model"]}))
    config.eval = eval_lib.with_defaults(cfg_lib.to_tuples(ev))
    return config


def load_export(out: str, *, pool: str | None = None, stages=None):
    """-> (features_fn, variables) of an exported encoder: features_fn(variables,
    images uint8 (B, H, W, C)) -> {stage: (B, D) float32}, the eval view (centre
    crop, normalisation) and pooling included; pool (None: the encoder's default, a
    map's global average, a ViT's class token) and stages as
    features.make_features_fn takes them."""
    meta = read_meta(out)
    model = ml_collections.ConfigDict(cfg_lib.to_tuples(meta["model"]))
    encoder = network.make_encoder(model)
    variables = ocp.StandardCheckpointer().restore(storage.path(out) / "encoder")
    view = ml_collections.ConfigDict(cfg_lib.to_tuples(meta["preprocessing"]["view"]))
    fn = jax.jit(features.make_features_fn(encoder, view, pool, stages))
    shape = meta["preprocessing"].get("input_shape")  # absent: nothing to check against
    dataset = meta.get("data", {}).get("dataset") or meta.get("source", {}).get("dataset")

    def features_fn(variables, images):
        if shape is not None:
            check_images(images, tuple(shape), dataset)
        return fn(variables, images)
    return features_fn, variables


def check_images(images, shape: tuple, dataset: str | None = None) -> None:
    """An export's features_fn takes a numpy (or JAX) array of uint8 images (B, *shape)
    (None: any size), shape (H, W, C) as export.json's preprocessing "input_shape"
    says, of `dataset`'s kind; anything else would run silently or fail deep in Flax:
    say what is expected, and the fix."""
    want = "(B, " + ", ".join("any" if d is None else str(d) for d in shape) + ")"
    like = f" like {dataset}'s" if dataset else ""
    if not hasattr(images, "dtype"):  # a list of arrays or numbers
        raise errors.UserError(f"features_fn takes an array of uint8 images {want}{like}; "
                               f"got a {type(images).__name__}: pass "
                               "np.asarray(images, np.uint8).")
    dims = tuple(np.shape(images))
    got = f"{images.dtype} {dims}"

    def fits(d) -> bool:
        return len(d) == len(shape) and all(w is None or w == g for w, g in zip(shape, d))
    if not fits(dims[1:]):
        if fits(dims):
            fix = "add a batch axis for one image (images[None])"
        elif shape[-1] == 1 and fits(dims[1:] + (1,)):
            fix = "add the channel axis (images[..., None])"
        elif shape[-1] == 1 and fits(dims + (1,)):
            fix = "add a batch and a channel axis for one image (images[None, ..., None])"
        else:
            fix = (f"images of another dataset than the export's{f' ({dataset})' if dataset else ''}"
                   ": resize them to its height and width, with its channels, first")
        raise errors.UserError(f"features_fn takes a batch of uint8 images {want}{like} "
                               f"(export.json's preprocessing); got {got}: {fix}.")
    if images.dtype != np.uint8:
        floats = np.issubdtype(images.dtype, np.floating)
        raise errors.UserError(f"features_fn takes uint8 pixels in [0, 255] {want} (it "
                               f"normalises them itself); got {got}: pass the raw pixels"
                               + (" (e.g. np.uint8(x * 255) for floats in [0, 1])." if floats
                                  else " as uint8 (images.astype(np.uint8)) if they are "
                                  "in [0, 255]."))
