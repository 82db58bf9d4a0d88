r"""Offline evaluation of a trained encoder, frozen.

  python -m ssl_jax.evaluate --workdir runs/simclr --eval linear,knn

Reads the config and the newest checkpoint of --workdir, extracts the pooled
features of the final encoder stage for the train and test splits, and runs
each evaluator. "Offline" means after pretraining, on a frozen encoder (the
numbers papers report), as opposed to the online probes logged during training.
Results are printed and written to WORKDIR/eval_<name>.json.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ssl_jax import checkpoint, methods, parallel
from ssl_jax import config as cfg_lib
from ssl_jax.data import pipeline
from ssl_jax.eval import features, knn, linear
from ssl_jax.methods import network

EVALUATORS = ("linear", "knn")


def load_encoder(workdir: str, mesh):
    """-> (config, encoder module, encoder variables, step) from a workdir's newest checkpoint."""
    config = cfg_lib.load(workdir)
    method = methods.get(config.method)
    from ssl_jax.train import optimizer, state_initializer  # the one definition of the state
    source = pipeline.open_source(config.dataset, config.train_split, config.data_dir)
    _, _, tx = optimizer(config, len(source))
    sample = jax.ShapeDtypeStruct((config.batch_size,) + tuple(source[0]["image"].shape), jnp.uint8)
    with jax.set_mesh(mesh):
        shapes = jax.eval_shape(state_initializer(config, method, tx), sample)
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    state, step = ckpt.restore_state_only(checkpoint.abstract(shapes, parallel.replicated(mesh)))
    ckpt.close()
    variables = network.encoder_variables(state["params"], state["method_state"])
    return config, network.make_encoder(config.model), variables, step


def evaluate(workdir: str, evals=EVALUATORS) -> dict:
    unknown = [e for e in evals if e not in EVALUATORS]
    if unknown:
        raise ValueError(f"--eval {unknown} unknown; valid: {list(EVALUATORS)}.")
    mesh = parallel.make_mesh()
    config, encoder, variables, step = load_encoder(workdir, mesh)
    fn = features.make_features_fn(encoder, features.eval_view_config(config))
    stage = network.final_stage(config.model)
    t0 = time.time()
    splits = {}
    for split, limit in ((config.train_split, config.eval.train_examples),
                         (config.eval.test_split, 0)):
        src = pipeline.open_source(config.dataset, split, config.data_dir)
        with jax.set_mesh(mesh):
            feats, labels = features.extract(fn, variables, src, batch_size=config.eval.batch_size,
                                             mesh=mesh, max_examples=limit)
        splits[split] = (feats[stage], labels)
    (xtr, ytr), (xte, yte) = splits[config.train_split], splits[config.eval.test_split]
    num_classes = pipeline.dataset_info(config.dataset, config.data_dir)["num_classes"]
    print(f"Features of {stage} at step {step}: train {xtr.shape}, test {xte.shape} "
          f"({time.time() - t0:.1f}s)", flush=True)

    results = {}
    for name in evals:
        t0 = time.time()
        if name == "linear":
            lc = config.eval.linear
            r = linear.train_linear_probe(xtr, ytr, xte, yte, num_classes=num_classes,
                                          epochs=lc.epochs, lr=lc.lr,
                                          weight_decay=lc.weight_decay,
                                          batch_size=lc.batch_size, seed=config.seed)
        else:
            kc = config.eval.knn
            r = knn.knn_classify(xtr, ytr, xte, yte, num_classes=num_classes, k=kc.k,
                                 temperature=kc.temperature)
        r = {"top1": float(r["top1"]), "top5": float(r["top5"]), "stage": stage, "step": int(step),
             "train_examples": int(len(ytr)), "test_examples": int(len(yte)),
             "seconds": round(time.time() - t0, 1)}
        results[name] = r
        print(f"{name} ({'offline, frozen ' + stage}): top-1 {r['top1']:.2f}%  "
              f"top-5 {r['top5']:.2f}%  [{config.dataset} {config.eval.test_split}, "
              f"{r['seconds']}s]", flush=True)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, f"eval_{name}.json"), "w") as f:
                json.dump(r, f, indent=2)
    return results


def main(argv):
    del argv
    evaluate(flags.FLAGS.workdir, tuple(flags.FLAGS.eval))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and checkpoints).")
    flags.DEFINE_list("eval", list(EVALUATORS), f"Evaluators to run: {', '.join(EVALUATORS)}.")
    flags.mark_flags_as_required(["workdir"])
    sys.exit(app.run(main))
