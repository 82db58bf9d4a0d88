r"""Offline evaluation of a trained encoder, frozen.

  python -m ssl_jax.evaluate --workdir runs/simclr --eval linear,knn [--stages all]

Reads the config and the newest checkpoint of --workdir, extracts the globally
pooled features of the encoder's stages for the train and test splits, and runs
each evaluator on each requested stage (`--stages final`, the default; `all`;
or names such as `block2,block4`). "Offline" means after pretraining, on a
frozen encoder (the numbers papers report), as opposed to the online probes
logged during training.
Results are printed, written to WORKDIR/eval_<name>.json and appended as rows
to the Markdown table WORKDIR/results.md.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from ssl_jax import checkpoint, methods, models, parallel
from ssl_jax import config as cfg_lib
from ssl_jax.data import pipeline
from ssl_jax.eval import features, knn, linear, lowshot, mlp
from ssl_jax.methods import network

EVALUATORS = ("linear", "knn", "mlp", "lowshot")


def load_encoder(workdir: str, mesh, random_init: bool = False):
    """-> (config, encoder module, encoder variables, step) from a workdir's newest
    checkpoint; or, with random_init, the same encoder as initialised (step 0,
    seed config.seed), the baseline a pretrained encoder must beat."""
    config = cfg_lib.load(workdir)
    method = methods.get(config.method)
    from ssl_jax.train import optimizer, state_initializer  # the one definition of the state
    # Shapes only: the dataset's metadata, not a decode of the train split (the
    # evaluators read the splits themselves). Sliced splits or images of varying
    # size need one record.
    info = pipeline.dataset_info(config.dataset, config.data_dir)
    n, shape = info["num_examples"].get(config.train_split), info["image_shape"]
    if n is None or None in shape:
        source = pipeline.open_source(config.dataset, config.train_split, config.data_dir,
                                      memory_limit=0)
        n, shape = len(source), source[0]["image"].shape
    _, _, tx = optimizer(config, n)
    sample = jax.ShapeDtypeStruct((config.batch_size,) + tuple(shape), jnp.uint8)
    with jax.set_mesh(mesh):
        shapes = jax.eval_shape(state_initializer(config, method, tx), sample)
    if random_init:
        with jax.set_mesh(mesh):
            state = jax.jit(state_initializer(config, method, tx))(jnp.zeros(sample.shape,
                                                                              jnp.uint8))
        step = 0
    else:
        ckpt = checkpoint.Checkpointer(workdir, async_save=False)
        state, step = ckpt.restore_state_only(checkpoint.abstract(shapes,
                                                                  parallel.replicated(mesh)))
        ckpt.close()
    variables = network.encoder_variables(state["params"], state["method_state"])
    return config, network.make_encoder(config.model), variables, step


def _stages(config, stages) -> list[str]:
    """'final' | 'all' | [names] -> stage names, shallow to deep; errors list the valid ones."""
    valid = models.stages(config.model.name, **network.encoder_kwargs(config.model))
    if stages in ("final", ["final"], ("final",)):
        return [valid[-1]]
    if stages in ("all", ["all"], ("all",)):
        return valid
    names = [stages] if isinstance(stages, str) else list(stages)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"--stages {unknown}: {config.model.name} has stages {valid} "
                         "(or use 'final' / 'all').")
    return [n for n in valid if n in names]


def evaluate(workdir: str, evals=EVALUATORS, stages="final", random_init: bool = False) -> dict:
    """Runs each evaluator on each stage. Returns {evaluator: record}, where a record
    holds the deepest requested stage's numbers ("top1", "top5", "stage", ...) and
    "stages": {stage: {"top1", "top5"}} for every requested stage.

    random_init: evaluate the run's encoder as initialised instead, with its BN
    statistics measured on the train split (features.calibrate_bn): the random
    baseline. Results then go to eval_<name>_random_init.json.
    """
    unknown = [e for e in evals if e not in EVALUATORS]
    if unknown:
        raise ValueError(f"--eval {unknown} unknown; valid: {list(EVALUATORS)}.")
    mesh = parallel.make_mesh()
    config, encoder, variables, step = load_encoder(workdir, mesh, random_init)
    names = _stages(config, stages)
    view_cfg = features.eval_view_config(config)
    fn = features.make_features_fn(encoder, view_cfg)
    sources = {split: pipeline.open_source(config.dataset, split, config.data_dir)
               for split in (config.train_split, config.eval.test_split)}  # each decoded once
    if random_init:
        with jax.set_mesh(mesh):
            variables = features.calibrate_bn(encoder, view_cfg, variables,
                                              sources[config.train_split],
                                              batch_size=config.eval.batch_size, mesh=mesh)
    t0 = time.time()
    splits = {}
    for split, limit in ((config.train_split, config.eval.train_examples),
                         (config.eval.test_split, 0)):
        with jax.set_mesh(mesh):
            feats, labels = features.extract(fn, variables, sources[split],
                                             batch_size=config.eval.batch_size, mesh=mesh,
                                             max_examples=limit)
        splits[split] = ({n: feats[n] for n in names}, labels)
    (ftr, ytr), (fte, yte) = splits[config.train_split], splits[config.eval.test_split]
    num_classes = pipeline.dataset_info(config.dataset, config.data_dir)["num_classes"]
    print(f"Features of {', '.join(f'{n} {ftr[n].shape[1]}-d' for n in names)} at step {step}: "
          f"{len(ytr)} train, {len(yte)} test ({time.time() - t0:.1f}s)", flush=True)

    results = {}
    for name in evals:
        t0 = time.time()
        per_stage = {n: _run(name, config, ftr[n], ytr, fte[n], yte, num_classes) for n in names}
        final = names[-1]
        r = {"top1": per_stage[final]["top1"], "top5": per_stage[final]["top5"], "stage": final,
             "stages": per_stage, "step": int(step), "random_init": random_init,
             "train_examples": int(len(ytr)),
             "test_examples": int(len(yte)), "seconds": round(time.time() - t0, 1)}
        results[name] = r
        what = "offline, frozen" + (", random init" if random_init else "")
        for n in names:
            print(f"{name} ({what} {n}): top-1 {per_stage[n]['top1']:.2f}%  "
                  f"top-5 {per_stage[n]['top5']:.2f}%  [{config.dataset} "
                  f"{config.eval.test_split}]", flush=True)
            if "per_k" in per_stage[n]:  # low-shot: the whole curve
                print("    " + "  ".join(f"k={k}: {v['mean']:.2f}±{v['std']:.2f}"
                                         for k, v in per_stage[n]["per_k"].items()), flush=True)
        if jax.process_index() == 0:
            suffix = "_random_init" if random_init else ""
            with open(os.path.join(workdir, f"eval_{name}{suffix}.json"), "w") as f:
                json.dump(r, f, indent=2)
            append_table(os.path.join(workdir, "results.md"), config, name, r)
    return results


TABLE_HEADER = ("| date | method | dataset | step | evaluator | stage | top-1 | top-5 |\n"
                "|---|---|---|---:|---|---|---:|---:|\n")


def append_table(path: str, config, name: str, record: dict) -> None:
    """Appends one row per stage of an evaluator's record to a Markdown table
    (written with its header on first use): the file people read and paste."""
    new = not os.path.exists(path)
    method = config.method + (" (random init)" if record["random_init"] else "")
    with open(path, "a") as f:
        if new:
            f.write(TABLE_HEADER)
        for stage, v in record["stages"].items():
            f.write(f"| {time.strftime('%Y-%m-%d %H:%M')} | {method} | {config.dataset} | "
                    f"{record['step']} | {name} (offline) | {stage} | {v['top1']:.2f} | "
                    f"{v['top5']:.2f} |\n")


def _run(name, config, xtr, ytr, xte, yte, num_classes) -> dict:
    """One evaluator on one stage's features -> {"top1", "top5"} in percent."""
    if name == "linear":
        lc = config.eval.linear
        r = linear.train_linear_probe(xtr, ytr, xte, yte, num_classes=num_classes,
                                      epochs=lc.epochs, lr=lc.lr, weight_decay=lc.weight_decay,
                                      batch_size=lc.batch_size, seed=config.seed)
    elif name == "mlp":
        # Workdirs trained before eval.mlp existed get train_mlp_probe's defaults.
        settings = dict(config.eval.get("mlp", {}))
        r = mlp.train_mlp_probe(xtr, ytr, xte, yte, num_classes=num_classes, seed=config.seed,
                                **settings)
    elif name == "lowshot":
        r = lowshot.lowshot(xtr, ytr, xte, yte, num_classes=num_classes,
                            **dict(config.eval.get("lowshot", {})))
        return {"top1": r["top1"], "top5": r["top5"], "per_k": r["per_k"]}
    else:
        kc = config.eval.knn
        r = knn.knn_classify(xtr, ytr, xte, yte, num_classes=num_classes, k=kc.k,
                             temperature=kc.temperature)
    return {"top1": float(r["top1"]), "top5": float(r["top5"])}


def main(argv):
    del argv
    # TFDS logs every split it opens at INFO; results are what this command prints.
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    stages = flags.FLAGS.stages
    evaluate(flags.FLAGS.workdir, tuple(flags.FLAGS.eval),
             stages[0] if len(stages) == 1 else stages, flags.FLAGS.random_init)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and checkpoints).")
    flags.DEFINE_list("eval", list(EVALUATORS), f"Evaluators to run: {', '.join(EVALUATORS)}.")
    flags.DEFINE_list("stages", ["final"], "Encoder stages to probe: final, all, or names "
                      "(e.g. block2,block4).")
    flags.DEFINE_bool("random_init", False, "Evaluate the run's encoder as initialised (BN "
                      "statistics measured on train): the baseline pretraining must beat.")
    flags.mark_flags_as_required(["workdir"])
    sys.exit(app.run(main))
