r"""Offline evaluation of a trained encoder, frozen.

  python -m ssl_jax.evaluate --workdir runs/simclr --eval linear,knn [--stages all]
  python -m ssl_jax.evaluate --exported exported/simclr --eval knn [--data_dir DIR]
  python -m ssl_jax.evaluate --workdir runs/simclr --eval linear --stages all --pool avg2x2

Reads the encoder, either the config and newest checkpoint of --workdir or an
encoder written by `python -m ssl_jax.export` (--exported; its export.json
names the dataset, splits and eval settings, and --dataset, --data_dir,
--train_split, --test_split fill in or override them), extracts the pooled
features of its stages for the train and test splits, and runs each evaluator
on each requested stage (`--stages final`, the default; `all`; or names such as
`block2,block4`). --pool: `global` average (default), or `avg{s}x{s}` (e.g.
avg2x2, avg3x3), VISSL's pooling of a conv stage to an s x s grid, s*s*C
features. "Offline" means after pretraining, on a frozen encoder (the numbers
papers report), as opposed to the online probes logged during training.

Everything goes to RESULTS, which is --results_dir, else the workdir or the
export: the features under RESULTS/features/, keyed by the weights, model, eval
view, pooling, stages, split and example limit, so that evaluating the same
checkpoint again skips extraction (--nocache: neither read nor write them);
the results printed, written to RESULTS/eval_<name>[_<pool>][_random_init].json
and appended as rows to the Markdown table RESULTS/results.md.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from ssl_jax import checkpoint, export, methods, models, parallel
from ssl_jax import config as cfg_lib
from ssl_jax.data import pipeline
from ssl_jax import eval as eval_lib
from ssl_jax.eval import features, knn, linear, lowshot, mlp
from ssl_jax.methods import network

EVALUATORS = ("linear", "knn", "mlp", "lowshot")


def load_encoder(workdir: str, mesh, random_init: bool = False):
    """-> (config, encoder module, encoder variables, step) from a workdir's newest
    checkpoint; or, with random_init, the same encoder as initialised (step 0,
    seed config.seed), the baseline a pretrained encoder must beat."""
    config = cfg_lib.load(workdir)
    if not random_init:
        ckpt = checkpoint.Checkpointer(workdir, async_save=False)
        if ckpt.latest_step() is None:  # say so before reading data or tracing the model
            ckpt.close()
            raise FileNotFoundError(
                f"No checkpoint in {ckpt.dir}: {workdir} has a config.json but no trained "
                f"weights yet. Train first (`python -m ssl_jax.train --config "
                f"configs/{config.method}.py --workdir {workdir}`, with the config arguments "
                "it was started with, resumes it), or pass --random_init for the untrained "
                "baseline.")
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
    init_state = state_initializer(config, method, tx, info["num_classes"])
    if random_init:
        with jax.set_mesh(mesh):
            state = jax.jit(init_state)(jnp.zeros(sample.shape, jnp.uint8))
        step = 0
    else:
        with jax.set_mesh(mesh):
            shapes = jax.eval_shape(init_state, sample)
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


def _settings(config, overrides):
    """config with the eval fields it lacks (stored by an older version) at their
    defaults, then the command line's --config.eval.* applied."""
    config.eval = eval_lib.with_defaults(config.eval)
    return cfg_lib.apply_overrides(config, overrides or {})


def _num_classes(config, evals) -> int:
    """The dataset's number of classes; a ValueError naming the dataset when it has
    no labels (every evaluator here fits or votes on them), before any loading."""
    n = pipeline.dataset_info(config.dataset, config.data_dir)["num_classes"]
    if not n:
        raise ValueError(
            f"Dataset {config.dataset!r} in {config.data_dir or pipeline.default_data_dir()} has "
            "no labels (no 'label' feature with a number of classes in its dataset_info), and "
            f"the evaluators {list(evals)} need labelled train and test splits. Evaluate on a "
            "labelled dataset: export the encoder (python -m ssl_jax.export) and pass "
            "--exported OUT --dataset NAME --data_dir DIR.")
    return n


def _label(stage: str, pool: str) -> str:
    """How a stage is named in printouts and results.md: the pooling unless global."""
    return stage if pool == "global" else f"{stage} ({pool})"


def evaluate(workdir: str | None = None, evals=EVALUATORS, stages="final",
             random_init: bool = False, *, exported: str | None = None, pool: str = "global",
             cache: bool = True, results_dir: str | None = None, dataset: str | None = None,
             data_dir: str | None = None, train_split: str | None = None,
             test_split: str | None = None, plot: bool = False,
             overrides: dict[str, str] | None = None) -> dict:
    """Runs each evaluator on each stage of the encoder of `workdir` (a training
    run) or `exported` (python -m ssl_jax.export's OUT): exactly one. Returns
    {evaluator: record}, where a record holds the deepest requested stage's
    numbers ("top1", "top5", "stage", ...), "stages": {stage: {"top1", "top5"}}
    for every requested stage, and the "pool" that made the features.

    pool: "global" or "avg{s}x{s}" (features.pool_stage).
    random_init (workdir only): evaluate the run's encoder as initialised instead,
    with its BN statistics measured on the train split (features.calibrate_bn):
    the random baseline. Results then go to eval_<name>_random_init.json.
    cache: read and write the split's features under RESULTS/features/.
    results_dir: RESULTS, where everything is written (default: workdir or exported).
    dataset, data_dir, train_split, test_split (exported only): override export.json's.
    plot: also write figures to RESULTS/figures/ (`_plot`).
    overrides: {"eval.a.b": "value"} (--config.eval.a.b=value): evaluation settings
    changed from the run's (or the export's) stored config.
    """
    if (workdir is None) == (exported is None):
        raise ValueError("Give exactly one of --workdir (a training run) or --exported (an "
                         "encoder written by `python -m ssl_jax.export`).")
    unknown = [e for e in evals if e not in EVALUATORS]
    if unknown:
        raise ValueError(f"--eval {unknown} unknown; valid: {list(EVALUATORS)}.")
    features.pool_grid(pool)
    data_args = dict(dataset=dataset, data_dir=data_dir, train_split=train_split,
                     test_split=test_split)
    if workdir is not None and any(v is not None for v in data_args.values()):
        given = [f"--{k}" for k, v in data_args.items() if v is not None]
        raise ValueError(f"{', '.join(given)} go with --exported; a workdir's config.json "
                         "names the data it is evaluated on.")
    if exported is not None and random_init:
        raise ValueError("--random_init needs --workdir: an export holds the trained weights, "
                         "not the run's initialisation.")

    mesh = parallel.make_mesh()
    if exported is None:
        config = cfg_lib.load(workdir)
    else:
        meta = export.read_meta(exported)
        config = export.eval_config(exported, meta, **data_args)
    config = _settings(config, overrides)
    num_classes = _num_classes(config, evals)  # before the slow loading
    names = _stages(config, stages)
    if exported is None:
        # The same config.json as above: keep the one with the eval settings applied.
        _, encoder, variables, step = load_encoder(workdir, mesh, random_init)
        view_cfg = features.eval_view_config(config)
        fn = features.make_features_fn(encoder, view_cfg, pool, names)
        origin = {"step": int(step), "random_init": random_init}
    else:
        fn, variables = export.load(exported, pool=pool, stages=names)
        view_cfg = meta["preprocessing"]["view"]
        step = meta["source"]["step"]
        origin = {"step": int(step), "source": meta["source"]}
    results_dir = results_dir or workdir or exported
    sources = {split: pipeline.open_source(config.dataset, split, config.data_dir)
               for split in (config.train_split, config.eval.test_split)}  # each decoded once
    key = None
    if cache:  # everything the features depend on; the weights by content, not by name
        # (a random init's as initialised: calibration is deterministic, origin says it ran)
        key = dict(origin, weights=features.fingerprint(variables),
                   model=config.model.to_dict(), view=dict(view_cfg), pool=pool, stages=names,
                   dataset=config.dataset,
                   data_dir=os.path.abspath(config.data_dir or pipeline.default_data_dir()))
    if random_init:  # BN statistics measured only if some features must be extracted
        uncalibrated = variables

        @functools.cache
        def variables():
            with jax.set_mesh(mesh):
                return features.calibrate_bn(encoder, view_cfg, uncalibrated,
                                             sources[config.train_split],
                                             batch_size=config.eval.batch_size, mesh=mesh)
    t0 = time.time()
    split_kw = dict(batch_size=config.eval.batch_size, mesh=mesh, stages=names, step=step,
                    cache_dir=os.path.join(results_dir, "features"))
    splits = {split: features.split_features(fn, variables, sources[split], split, limit,
                                             key=key, **split_kw)
              for split, limit in ((config.train_split, config.eval.train_examples),
                                   (config.eval.test_split, 0))}
    (ftr, ytr), (fte, yte) = splits[config.train_split], splits[config.eval.test_split]
    print(f"Features of {', '.join(f'{_label(n, pool)} {ftr[n].shape[1]}-d' for n in names)} "
          f"at step {step}: {len(ytr)} train, {len(yte)} test ({time.time() - t0:.1f}s)",
          flush=True)
    views = _augmented_views(config, fn, variables, sources[config.train_split], key,
                             split_kw) if "linear" in evals else []

    results = {}
    for name in evals:
        t0 = time.time()
        if name == "linear":  # every stage's probe in one run
            per_stage = _linear(config, ftr, ytr, fte, yte, num_classes, names, views)
        else:
            per_stage = {n: _run(name, config, ftr[n], ytr, fte[n], yte, num_classes)
                         for n in names}
        final = names[-1]
        r = {"top1": per_stage[final]["top1"], "top5": per_stage[final]["top5"], "stage": final,
             "pool": pool, "stages": per_stage, "step": int(step), "random_init": random_init,
             "train_examples": int(len(ytr)),
             "test_examples": int(len(yte)), "seconds": round(time.time() - t0, 1)}
        if exported is not None:
            r["exported"] = os.path.abspath(exported)
        results[name] = r
        what = "offline, frozen" + (", random init" if random_init else "")
        for n in names:
            at = n if pool == "global" else f"{n}, {pool}"
            print(f"{name} ({what} {at}): top-1 {per_stage[n]['top1']:.2f}%  "
                  f"top-5 {per_stage[n]['top5']:.2f}%  [{config.dataset} "
                  f"{config.eval.test_split}]", flush=True)
            for label, v in per_stage[n].get("also", {}).items():  # kNN at further k
                print(f"    {label}: top-1 {v['top1']:.2f}%  top-5 {v['top5']:.2f}%", flush=True)
            if "per_k" in per_stage[n]:  # low-shot: the whole curve
                print("    " + "  ".join(f"k={k}: {v['mean']:.2f}±{v['std']:.2f}"
                                         for k, v in per_stage[n]["per_k"].items()), flush=True)
        if jax.process_index() == 0:
            os.makedirs(results_dir, exist_ok=True)
            suffix = ("" if pool == "global" else f"_{pool}") + ("_random_init" if random_init
                                                                 else "")
            with open(os.path.join(results_dir, f"eval_{name}{suffix}.json"), "w") as f:
                json.dump(r, f, indent=2)
            append_table(os.path.join(results_dir, "results.md"), config, name, r)
    if plot and jax.process_index() == 0:
        _plot(results_dir, sources[config.train_split], sources[config.eval.test_split],
              ftr[names[-1]], ytr, fte[names[-1]], yte, random_init)
    return results


def _plot(results_dir: str, train, test, ftr, ytr, fte, yte, random_init: bool,
          queries: int = 8, k: int = 8) -> None:
    """--plot: RESULTS/figures/ gets the per-stage bars and low-shot curve of
    every record there (report.write_figures) and retrieval.png: the first
    `queries` test images and their k nearest train images by the deepest
    requested stage's features (cosine), wrong-label neighbours framed red."""
    from ssl_jax.eval import report  # matplotlib only when figures are asked for
    nn = knn.nearest(ftr, fte[:queries], k)  # rows of ftr are the train split in order
    paths = report.write_figures(results_dir)
    suffix = "_random_init" if random_init else ""
    paths.append(os.path.join(results_dir, "figures", f"retrieval{suffix}.png"))
    report.retrieval_grid(np.stack([test[i]["image"] for i in range(len(nn))]),
                          np.stack([[train[int(j)]["image"] for j in row] for row in nn]),
                          paths[-1], yte[:len(nn)], ytr[nn])
    print("Figures: " + ", ".join(paths), flush=True)


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
            extra = [(f"{name} {k}", x) for k, x in v.get("also", {}).items()]  # kNN's k=20
            for what, w in [(name, v)] + extra:
                f.write(f"| {time.strftime('%Y-%m-%d %H:%M')} | {method} | {config.dataset} | "
                        f"{record['step']} | {what} (offline) | "
                        f"{_label(stage, record.get('pool', 'global'))} | {w['top1']:.2f} | "
                        f"{w['top5']:.2f} |\n")


def _augmented_views(config, fn, variables, source, key, split_kw) -> list[dict]:
    """eval.linear.augment.views > 0: that many light_augment views of the train
    split ({stage: (N, D)} each, cached like the centre view), for the linear
    probe to fit epoch e on view e % views. Else []."""
    aug = dict(config.eval.linear.augment)
    n_views = int(aug.pop("views", 0))
    if n_views < 1:
        return []
    transform = functools.partial(features.light_augment, **aug)
    t0 = time.time()
    views = [features.split_features(
        fn, variables, source, config.train_split, config.eval.train_examples,
        key=key and dict(key, augment=aug, augment_view=v), transform=transform,
        seed=config.seed * 10_007 + v, **split_kw)[0] for v in range(n_views)]
    print(f"Augmented train views for the linear probe: {n_views} ({time.time() - t0:.1f}s)",
          flush=True)
    return views


def _linear(config, ftr, ytr, fte, yte, num_classes, names, views) -> dict:
    """Every stage's linear probe trained together -> {stage: {"top1", "top5", ...}}."""
    settings = dict(config.eval.linear)
    del settings["augment"]
    out = linear.train_linear_probes({n: ftr[n] for n in names}, ytr,
                                     {n: fte[n] for n in names}, yte, num_classes=num_classes,
                                     seed=config.seed, train_views=views, **settings)
    return {n: {k: r[k] for k in ("top1", "top5", "train_top1", "objective", "weight_decay")}
            for n, r in out.items()}


def _run(name, config, xtr, ytr, xte, yte, num_classes) -> dict:
    """One evaluator on one stage's features -> {"top1", "top5"} in percent."""
    settings = dict(config.eval[name])  # complete: _settings filled in what a run lacks
    if name == "mlp":
        r = mlp.train_mlp_probe(xtr, ytr, xte, yte, num_classes=num_classes, seed=config.seed,
                                **settings)
    elif name == "lowshot":
        r = lowshot.lowshot(xtr, ytr, xte, yte, num_classes=num_classes, **settings)
        return {"top1": r["top1"], "top5": r["top5"], "per_k": r["per_k"]}
    else:
        r = knn.knn_classify(xtr, ytr, xte, yte, num_classes=num_classes, **settings)
        return {"top1": float(r["top1"]), "top5": float(r["top5"]), "k": r["k"],
                "also": {n: {"top1": v["top1"], "top5": v["top5"]}
                         for n, v in r["also"].items()}}
    return {"top1": float(r["top1"]), "top5": float(r["top5"])}


def main(argv, overrides=None):
    del argv
    # TFDS logs every split it opens at INFO; results are what this command prints.
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    evaluate(f.workdir, tuple(f.eval), f.stages[0] if len(f.stages) == 1 else f.stages,
             f.random_init, exported=f.exported, pool=f.pool, cache=f.cache,
             results_dir=f.results_dir, dataset=f.dataset, data_dir=f.data_dir,
             train_split=f.train_split, test_split=f.test_split, plot=f.plot,
             overrides=overrides)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and checkpoints).")
    flags.DEFINE_string("exported", None, "Instead of --workdir: an encoder written by "
                        "`python -m ssl_jax.export` (its OUT folder).")
    flags.DEFINE_string("pool", "global", "How a stage's (H, W, C) map becomes features: "
                        "global (average, C-d) or avg{s}x{s} (e.g. avg2x2: an s x s grid of "
                        "averages, s*s*C-d, as VISSL probes conv stages).")
    flags.DEFINE_bool("cache", True, "Read and write the extracted features under "
                      "RESULTS/features/ (--nocache: extract afresh, write nothing).")
    flags.DEFINE_string("results_dir", None, "Where results and the feature cache go (default: "
                        "the workdir or the export).")
    flags.DEFINE_string("dataset", None, "With --exported: the dataset (default: export.json's).")
    flags.DEFINE_string("data_dir", None, "With --exported: its data_dir (default: export.json's).")
    flags.DEFINE_string("train_split", None, "With --exported: the split probes fit on.")
    flags.DEFINE_string("test_split", None, "With --exported: the split probes are scored on.")
    flags.DEFINE_list("eval", list(EVALUATORS), f"Evaluators to run: {', '.join(EVALUATORS)}.")
    flags.DEFINE_list("stages", ["final"], "Encoder stages to probe: final, all, or names "
                      "(e.g. block2,block4).")
    flags.DEFINE_bool("random_init", False, "Evaluate the run's encoder as initialised (BN "
                      "statistics measured on train): the baseline pretraining must beat.")
    flags.DEFINE_bool("plot", False, "Also write PNG figures to RESULTS/figures/: accuracy per "
                      "stage, the low-shot curve, and a retrieval grid (test images and their "
                      "nearest train images).")
    flags.mark_flags_as_mutual_exclusive(["workdir", "exported"], required=True)
    # --config.eval.a.b=value: taken out before absl parses the flags it knows.
    sys.argv, _overrides = cfg_lib.split_overrides(sys.argv)
    sys.exit(app.run(lambda argv: main(argv, _overrides)))
