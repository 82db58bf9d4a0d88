"""Offline evaluation of a frozen encoder, as a function: `evaluate(...)` loads
the encoder (a training run's, its random init, or an export's), extracts the
pooled features of the requested stages for the train and test splits (cached
on disk; a ConvNet's maps globally averaged, a ViT's class token, unless --pool
says otherwise), runs each requested evaluator of eval/evaluators.py on them and
writes the records (eval/results.py). `python -m ssl_jax.evaluate` is its
command line; benchmarks and notebooks call it directly.

Everything goes to RESULTS, which is `results_dir`, else the workdir or the
export: the features under RESULTS/features/, keyed by the weights, model, eval
view, pooling, stages, split and example limit, so that evaluating the same
checkpoint again skips extraction (cache=False: neither read nor write them);
the results printed, written to RESULTS/eval_<name>[_<pool>][_random_init].json
and appended as rows to the Markdown table RESULTS/results.md.
"""
from __future__ import annotations

import difflib
import functools
import os
import time

import jax
import numpy as np

from ssl_jax import config as cfg_lib
from ssl_jax import encoders, methods, models, parallel, storage
from ssl_jax import eval as eval_lib
from ssl_jax.data import decode, sources
from ssl_jax.errors import UserError
from ssl_jax.eval import evaluators, features
from ssl_jax.eval import results as results_lib
from ssl_jax.methods import base, network
from ssl_jax.views import augment

EVALUATORS = tuple(evaluators.REGISTRY)  # --eval's names


def _stage_names(stages) -> list[str]:
    """--stages as given ('final', 'all', 'block2,block4' split by the flag, or a list)
    -> its names, empty ones dropped (a trailing comma)."""
    return [n for n in ([stages] if isinstance(stages, str) else list(stages)) if n]


def _stages(config, stages) -> list[str]:
    """'final' | 'all' | [names, 'final' among them] -> stage names, shallow to deep;
    errors list the valid ones."""
    valid = models.stages(config.model.name, **network.encoder_kwargs(config.model))
    names = _stage_names(stages)
    if "all" in names:
        return valid
    # 'final' is a name of the deepest stage, alone or in a list (final,block2).
    names = [valid[-1] if n == "final" else n for n in names]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise UserError(f"--stages: {', '.join(unknown)} is not a stage of this "
                         f"{config.model.name}; its stages are {', '.join(valid)} (also "
                         "'final', the deepest, alone or in a list, and 'all').")
    return [n for n in valid if n in names]


def _settings(config, overrides):
    """config with the eval fields it lacks (stored by an older version) at their
    defaults, then the command line's --config.eval.* applied."""
    config.eval = eval_lib.with_defaults(config.eval)
    return cfg_lib.apply_overrides(config, overrides or {})


def _num_classes(config, evals) -> int:
    """The dataset's number of classes; a ValueError naming the dataset when it has
    no labels (every evaluator here fits or votes on them), before any loading."""
    n = sources.dataset_info(config.dataset, config.data_dir)["num_classes"]
    if not n:
        raise UserError(
            f"Dataset {config.dataset!r} in {config.data_dir or sources.default_data_dir()} has "
            "no labels (no 'label' feature with a number of classes in its dataset_info), and "
            f"the evaluators {list(evals)} need labelled train and test splits. Evaluate on a "
            "labelled dataset: export the encoder (python -m ssl_jax.export) and pass "
            "--exported OUT --dataset NAME --data_dir DIR.")
    return n


def check_evals(evals) -> None:
    """A UserError unless evals names at least one evaluator, each a known one."""
    if not evals:
        raise UserError(f"--eval is empty: name the evaluators to run, of "
                        f"{', '.join(EVALUATORS)} (default: {','.join(evaluators.DEFAULT)}).")
    for name in evals:
        if name not in EVALUATORS:
            close = difflib.get_close_matches(name, EVALUATORS, n=1)
            raise UserError(f"--eval: {name!r} is not an evaluator"
                            + (f" (did you mean {close[0]}?)" if close else "")
                            + f"; the evaluators are {', '.join(EVALUATORS)}.")


def _check_arguments(workdir, exported, evals, stages, pool, random_init, data_args) -> None:
    """Errors in evaluate's arguments, each raised before anything is loaded or written."""
    if (workdir is None) == (exported is None):
        raise UserError("Give exactly one of --workdir (a training run) or --exported (an "
                         "encoder written by `python -m ssl_jax.export`).")
    check_evals(evals)
    if not _stage_names(stages):
        raise UserError("--stages is empty: give final (the default: the deepest stage), "
                        "all, or stage names such as block2,block4.")
    features.pool_grid(pool)
    if workdir is not None and any(v is not None for v in data_args.values()):
        given = [f"--{k}" for k, v in data_args.items() if v is not None]
        raise UserError(f"{', '.join(given)} go with --exported; a workdir's config.json "
                         "names the data it is evaluated on.")
    if exported is not None and random_init:
        raise UserError("--random_init needs --workdir: an export holds the trained weights, "
                         "not the run's initialisation.")


def evaluate(workdir: str | None = None, evals=evaluators.DEFAULT, stages="final",
             random_init: bool = False, *, exported: str | None = None, pool: str | None = None,
             cache: bool = True, results_dir: str | None = None, dataset: str | None = None,
             data_dir: str | None = None, train_split: str | None = None,
             test_split: str | None = None, plot: bool = False,
             overrides: dict[str, str] | None = None) -> dict:
    """Runs each evaluator on each stage of the encoder of `workdir` (a training
    run) or `exported` (python -m ssl_jax.export's OUT): exactly one. Returns
    {evaluator: record}, where a record holds the deepest requested stage's
    numbers ("top1", "top5", "stage", ...), "stages": {stage: {"top1", "top5"}}
    for every requested stage, and the "pool" that made the features.

    evals: names in eval/evaluators.py's REGISTRY.
    pool: how a stage becomes a vector (features.pool_stage): None, the encoder's
    default (a map's "global" average, a ViT block's class token "cls"); "global" or
    "avg{s}x{s}" of a map; "cls", "mean" (of the patch tokens; "global" is read as it),
    "avg{s}x{s}" of the patch grid or "dino" (DINO's linear-eval feature) of a ViT.
    random_init (workdir only): evaluate the run's encoder as initialised instead,
    with its BN statistics measured on the train split (features.calibrate_bn):
    the random baseline. Results then go to eval_<name>_random_init.json.
    cache: read and write the split's features under RESULTS/features/.
    results_dir: RESULTS, where everything is written (default: workdir or exported).
    dataset, data_dir, train_split, test_split (exported only): override export.json's.
    plot: also write figures to RESULTS/figures/ (eval/results.py's `plot`, and for a ViT
    its `plot_attention`).
    overrides: {"eval.a.b": "value"} (--config.eval.a.b=value): evaluation settings
    changed from the run's (or the export's) stored config.
    """
    data_args = dict(dataset=dataset, data_dir=data_dir, train_split=train_split,
                     test_split=test_split)
    _check_arguments(workdir, exported, evals, stages, pool, random_init, data_args)

    # ---------------------------------------------------------------- encoder
    mesh = parallel.make_mesh()
    if exported is None:
        config = cfg_lib.load(workdir)
    else:
        meta = encoders.read_meta(exported)
        config = encoders.eval_config(exported, meta, **data_args)
    config = _settings(config, overrides)
    # Classification evaluators read the train and test splits; invariance reads sets.
    on_splits = [e for e in evals if evaluators.REGISTRY[e].needs == "splits"]
    num_classes = _num_classes(config, on_splits) if on_splits else 0  # before loading
    names = _stages(config, stages)
    if exported is None:
        # The same config.json as above: keep the one with the eval settings applied.
        _, encoder, variables, step = encoders.load_run(workdir, mesh, random_init)
        at = methods.get(config.method).encoder_at(config)[0]
        if at != base.ENCODER_AT[0] and not random_init:  # e.g. DINO's teacher
            print(f"Evaluating the encoder at {'/'.join(at)} of the {config.method} run "
                  "(the one the method evaluates and exports).", flush=True)
        view_cfg = features.eval_view_config(config)
        fn = features.make_features_fn(encoder, view_cfg, pool, names)
        origin = {"step": int(step), "random_init": random_init}
    else:
        fn, variables = encoders.load_export(exported, pool=pool, stages=names)
        encoder = network.make_encoder(config.model)  # its stages' kinds; --plot's attention
        view_cfg = meta["preprocessing"]["view"]
        step = meta["source"]["step"]
        origin = {"step": int(step), "source": meta["source"]}
    results_dir = results_dir or workdir or exported
    # Images of varying size: the centre crop at the eval view's size (an export's own).
    centre = decode.CenterCrop(int(max(view_cfg["crop_size"])),
                               config.eval.get("crop_fraction", 0.875))
    data = {split: sources.open_source(config.dataset, split, config.data_dir, decode=centre)
            for split in ((config.train_split, config.eval.test_split) if on_splits
                          else (config.train_split,))}  # each decoded once
    # The pool's name in records, files and cache keys, and the encoder's default (whose
    # files have no _<pool>), from the kinds of its stages (maps or a ViT's tokens); a
    # stage it lacks or a pool that does not fit a stage is refused here, before any
    # work. fn, made with the pool as given, computes the same (features.canonical_pool).
    outputs = _stage_outputs(encoder, view_cfg, variables,
                             data[config.train_split][0]["image"].shape)
    default_pool, pool = (features.resolve_pool(p, outputs, names) for p in (None, pool))
    # The variables features are extracted with, a zero-argument function called only
    # when some features must be extracted: a random init's BN statistics are then
    # measured, once; not at all when every split's features are cached.
    extraction_variables = (functools.cache(functools.partial(
        _calibrated, encoder, view_cfg, variables, data[config.train_split],
        config.eval.batch_size, mesh)) if random_init else lambda: variables)

    # --------------------------------------------------------------- features
    key = None
    if cache:  # everything the features depend on; the weights by content, not by name
        # (a random init's as initialised: calibration is deterministic, origin says it ran)
        key = dict(origin, weights=features.fingerprint(variables),
                   model=config.model.to_dict(), view=dict(view_cfg), pool=pool, stages=names,
                   dataset=config.dataset,
                   data_dir=str(storage.path(config.data_dir or sources.default_data_dir())))
    split_kw = dict(batch_size=config.eval.batch_size, mesh=mesh, stages=names, step=step,
                    cache_dir=os.path.join(results_dir, "features"))
    (ftr, ytr), (fte, yte) = (_split_features(config, fn, extraction_variables, data, key,
                                              split_kw, pool) if on_splits
                              else (({}, np.zeros(0, np.int32)),) * 2)
    inputs = evaluators.Inputs(
        train=ftr, train_y=ytr, test=fte,
        test_y=yte, num_classes=num_classes, seed=config.seed,
        train_views=functools.partial(_augmented_views, config, fn, extraction_variables,
                                      data[config.train_split], centre.size, key, split_kw),
        sets=functools.partial(set_features, fn, extraction_variables, centre, key, split_kw,
                               config.dataset, config.data_dir),
        set_splits=lambda dataset, data_dir: list(sets_dataset(
            config.dataset, config.data_dir, dataset, data_dir)[2]["num_examples"]))

    # ------------------------------------------------------------- evaluators
    results = {}
    for name in evals:
        evaluator, t0 = evaluators.REGISTRY[name], time.time()
        # Complete for the known evaluators: _settings filled in what a stored config lacks.
        per_stage = evaluator.run(inputs, dict(config.eval[name]) if name in config.eval else {})
        counts = (dict(train_examples=len(ytr), test_examples=len(yte))
                  if evaluator.needs == "splits" else {})
        r = results[name] = results_lib.record(
            per_stage, names[-1], pool=pool, step=step, random_init=random_init,
            seconds=round(time.time() - t0, 1), exported=exported, **counts)
        results_lib.show(name, r, evaluator, config.dataset, config.eval.test_split)
        if jax.process_index() == 0:
            results_lib.write(results_dir, config, name, r, evaluator,
                              stage_order=_stages(config, "all"), default_pool=default_pool)
    if plot and on_splits and jax.process_index() == 0:
        results_lib.plot(results_dir, data[config.train_split],
                         data[config.eval.test_split], ftr[names[-1]], ytr, fte[names[-1]],
                         yte, random_init, method=config.method, class_names=sources.
                         dataset_info(config.dataset, config.data_dir)["class_names"])
    if plot and jax.process_index() == 0:  # a ViT's attention maps (none for a ConvNet)
        test = (data[config.eval.test_split] if on_splits else sources.open_source(
            config.dataset, config.eval.test_split, config.data_dir, decode=centre))
        path = results_lib.plot_attention(results_dir, encoder, extraction_variables(),
                                          view_cfg, test, random_init, method=config.method)
        if path:
            print(f"Figures: {path}", flush=True)
    return results


def _stage_outputs(encoder, view_cfg, variables, image_shape) -> dict:
    """The encoder's outputs on the eval view of one uint8 image of `image_shape` (H, W,
    C), as jax.eval_shape gives them ({stage: ShapeDtypeStruct | models.Tokens of them}):
    which stages it has, of which kind, without running it."""
    def f(v, images):
        return encoder.apply(v, augment.batch_views(jax.random.key(0), images, view_cfg),
                             train=False)
    return jax.eval_shape(f, variables, jax.ShapeDtypeStruct((1, *image_shape), np.uint8))


def _split_features(config, fn, variables, data, key, split_kw, pool):
    """((train features, labels), (test features, labels)) of the run's splits."""
    t0 = time.time()
    splits = {split: features.split_features(fn, variables, data[split], split, limit,
                                             key=key, **split_kw)
              for split, limit in ((config.train_split, config.eval.train_examples),
                                   (config.eval.test_split, 0))}
    (ftr, ytr), (fte, yte) = splits[config.train_split], splits[config.eval.test_split]
    dims = ", ".join(f"{results_lib.label(n, pool)} {v.shape[1]}-d" for n, v in ftr.items())
    print(f"Features of {dims} at step {split_kw['step']}: {len(ytr)} train, {len(yte)} test "
          f"({time.time() - t0:.1f}s)", flush=True)
    return (ftr, ytr), (fte, yte)


def sets_dataset(run_dataset: str, run_data_dir: str | None, dataset: str | None,
                 data_dir: str | None) -> tuple[str, str | None, dict]:
    """Which transformation-set dataset a run is scored on -> (dataset, data_dir, its
    dataset_info). dataset None: the run's own images' sets, <run dataset>_invariance;
    data_dir None: the run's."""
    dataset, data_dir = dataset or f"{run_dataset}_invariance", data_dir or run_data_dir
    try:
        return dataset, data_dir, sources.dataset_info(dataset, data_dir)
    except sources.DatasetNotFoundError:
        where = data_dir or sources.default_data_dir()
        raise UserError(
            f"The transformation sets {dataset!r} are not prepared in {where}. Make them "
            f"from the run's images with `python -m ssl_jax.prepare --dataset "
            f"invariance_sets --source {run_dataset} --data_dir {where}`, or name other "
            "prepared sets with --config.eval.invariance.dataset=NAME.") from None


def set_features(fn, variables, centre, key, split_kw, run_dataset: str,
                 run_data_dir: str | None, dataset: str | None, data_dir: str | None,
                 split: str) -> evaluators.SetFeatures:
    """Inputs.sets: the features of one split of a transformation-set dataset (records
    with `set_id`; sets_dataset says which), through the same extraction and cache as
    the run's own splits."""
    dataset, data_dir, info = sets_dataset(run_dataset, run_data_dir, dataset, data_dir)
    if split not in info["num_examples"]:
        raise UserError(f"{dataset} has no split {split!r}; its splits: "
                        f"{', '.join(info['num_examples'])}.")
    want = sources.dataset_info(run_dataset, run_data_dir)["image_shape"][-1]
    if info["image_shape"][-1] and want and info["image_shape"][-1] != want:
        raise UserError(f"{dataset}'s images have {info['image_shape'][-1]} channel(s) and "
                        f"the encoder takes {want} ({run_dataset}'s): score it on sets made "
                        "from its own kind of images.")
    try:
        set_id = sources.column(dataset, split, data_dir, "set_id")
    except UserError as e:
        raise UserError(f"{e} Invariance is scored on transformation sets, whose images "
                        "carry a set_id: python -m ssl_jax.prepare --dataset "
                        "invariance_sets makes them.") from None
    source = sources.open_source(dataset, split, data_dir, decode=centre)
    key = key and dict(key, dataset=dataset, data_dir=str(storage.path(
        data_dir or sources.default_data_dir())))
    feats, labels = features.split_features(fn, variables, source, f"{dataset}.{split}", 0,
                                            key=key, **split_kw)
    return evaluators.SetFeatures(features=feats, label=labels, set_id=set_id, dataset=dataset)


def _calibrated(encoder, view_cfg, variables, source, batch_size: int, mesh):
    """A random init's variables with BN statistics measured on source (features.calibrate_bn)."""
    with jax.set_mesh(mesh):
        return features.calibrate_bn(encoder, view_cfg, variables, source,
                                     batch_size=batch_size, mesh=mesh)


def _augmented_views(config, fn, variables, source, crop, key, split_kw, augment
                     ) -> list[dict]:
    """The linear evaluator's Inputs.train_views: augment (config.eval.linear.augment)
    views > 0: that many light_augment views of the train split ({stage: (N, D)}
    each, cached like the centre view). Else []. variables: a zero-argument function;
    source: the train split as the centre view reads it; crop: the eval view's side."""
    aug = dict(augment)
    n_views = int(aug.pop("views", 0))
    if n_views < 1:
        return []
    transform = functools.partial(features.light_augment, **aug)
    if None in sources.dataset_info(config.dataset, config.data_dir)["image_shape"][:2]:
        # Images of varying size: the probe's crops are drawn from each whole decoded
        # image (a canvas), as the papers' RandomResizedCrop does, not from centre crops.
        source = sources.open_source(config.dataset, config.train_split, config.data_dir,
                                     decode=decode.for_training(config))
        transform = functools.partial(transform, size=(crop, crop))
        key = key and dict(key, augment_from="canvas")
    t0 = time.time()
    views = [features.split_features(
        fn, variables, source, config.train_split, config.eval.train_examples,
        key=key and dict(key, augment=aug, augment_view=v), transform=transform,
        seed=config.seed * 10_007 + v, **split_kw)[0] for v in range(n_views)]
    print(f"Augmented train views for the linear probe: {n_views} ({time.time() - t0:.1f}s)",
          flush=True)
    return views
