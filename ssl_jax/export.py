r"""Encoder-only export: what a user keeps after pretraining.

  python -m ssl_jax.export --workdir runs/simclr --out exported/simclr

writes into OUT
  encoder/      the encoder's parameters and BN statistics (an orbax checkpoint)
  params.npz    the same arrays flat, "params/conv1/kernel" -> array, for other frameworks
  export.json   format version, the model config, the preprocessing the encoder
                expects (input size and channels, eval crop, mean/std), its
                stages, where it came from (workdir, step, method, dataset),
                the data it was trained on (dataset, data_dir, train_split,
                num_classes) and the run's evaluation settings (config.eval and
                seed): `python -m ssl_jax.evaluate --exported OUT` reads these

and `load(OUT)` gives back `(features_fn, variables)` with
`features_fn(variables, images) -> {stage: (B, C) float32}` for uint8 images
(B, H, W, C): the eval view (centre crop, normalisation) and global average
pooling included (`load(OUT, pool="avg2x2")`: VISSL's grid pooling, see
eval/features.py). Loading needs no method code, optimizer state or training
config; an artefact written by a newer format version is refused. "data" and
"eval" were added within format version 1: readers treat them as optional.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags

from ssl_jax.config import to_tuples

FORMAT_VERSION = 1


def _flat(tree) -> dict[str, np.ndarray]:
    """{"params": {"conv1": {"kernel": x}}} -> {"params/conv1/kernel": x}."""
    return {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def export(workdir: str, out: str) -> dict:
    """Writes the encoder of `workdir`'s newest checkpoint to `out`; -> export.json's contents."""
    from ssl_jax import evaluate, models, parallel  # training-side code, not needed by load()
    from ssl_jax.data import pipeline
    from ssl_jax.eval import features
    from ssl_jax.methods import network

    mesh = parallel.make_mesh()
    config, _, variables, step = evaluate.load_encoder(workdir, mesh)
    variables = jax.device_get(variables)
    info = pipeline.dataset_info(config.dataset, config.data_dir)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": config.model.to_dict(),
        "preprocessing": {"input_shape": list(info["image_shape"]),
                          "view": features.eval_view_config(config).to_dict(),
                          "dtype": "uint8"},
        "stages": models.stages(config.model.name, **network.encoder_kwargs(config.model)),
        "source": {"workdir": os.path.abspath(workdir), "step": int(step),
                   "method": config.method, "dataset": config.dataset},
        "data": {"dataset": config.dataset, "data_dir": config.data_dir,
                 "train_split": config.train_split, "num_classes": info["num_classes"]},
        "eval": dict(config.eval.to_dict(), seed=config.seed),
    }
    os.makedirs(out, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.abspath(os.path.join(out, "encoder")), variables, force=True)
    ckpt.wait_until_finished()
    np.savez(os.path.join(out, "params.npz"), **_flat(variables))
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(meta, f, indent=2, default=list)
    return meta


def read_meta(out: str) -> dict:
    """export.json of `out`; errors when it is not an export, or a newer format."""
    path = os.path.join(out, "export.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {out} is not an exported encoder. Write one "
                                "with `python -m ssl_jax.export --workdir RUN --out OUT`.")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{out} was exported with format version {meta['format_version']}; "
                         f"this ssl_jax reads versions <= {FORMAT_VERSION}: upgrade ssl_jax.")
    return meta


def eval_config(out: str, meta: dict, *, dataset=None, data_dir=None, train_split=None,
                test_split=None) -> ml_collections.ConfigDict:
    """The config fields evaluate reads, for an export: the arguments given win,
    then export.json's "data", "eval" and "source", then the evaluators' defaults
    (exports written before "data" and "eval" existed name only the dataset)."""
    from ssl_jax import eval as eval_lib

    data, source = meta.get("data", {}), meta.get("source", {})
    dataset = dataset or data.get("dataset") or source.get("dataset")
    if not dataset:
        raise ValueError(f"{os.path.join(out, 'export.json')} names no dataset: pass --dataset "
                         "(and --data_dir) to say what to evaluate on.")
    ev = dict(meta.get("eval", {}))
    seed = ev.pop("seed", 0)
    if test_split:
        ev["test_split"] = test_split
    config = ml_collections.ConfigDict(to_tuples({
        "method": source.get("method", "exported"), "dataset": dataset,
        "data_dir": data_dir or data.get("data_dir"),
        "train_split": train_split or data.get("train_split") or "train",
        "seed": seed, "model": meta["model"]}))
    config.eval = eval_lib.with_defaults(to_tuples(ev))
    return config


def load(out: str, *, pool: str = "global", stages=None):
    """-> (features_fn, variables) of an exported encoder (see the module docstring);
    pool and stages as features.make_features_fn takes them."""
    from ssl_jax.eval import features
    from ssl_jax.methods import network

    meta = read_meta(out)
    model = ml_collections.ConfigDict(to_tuples(meta["model"]))
    encoder = network.make_encoder(model)
    variables = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(out, "encoder")))
    view = ml_collections.ConfigDict(to_tuples(meta["preprocessing"]["view"]))
    return jax.jit(features.make_features_fn(encoder, view, pool, stages)), variables


def main(argv):
    del argv
    meta = export(flags.FLAGS.workdir, flags.FLAGS.out)
    print(f"Exported the {meta['model']['name']} encoder of {meta['source']['method']} "
          f"(step {meta['source']['step']}) to {flags.FLAGS.out}: encoder/, params.npz, "
          "export.json. Load it with ssl_jax.export.load(OUT).", flush=True)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A training workdir.")
    flags.DEFINE_string("out", None, "Where to write the exported encoder.")
    flags.mark_flags_as_required(["workdir", "out"])
    sys.exit(app.run(main))
