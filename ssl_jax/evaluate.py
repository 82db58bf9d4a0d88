r"""Offline evaluation of a trained encoder, frozen.

  python -m ssl_jax.evaluate --workdir runs/simclr --eval linear,knn [--stages all]
  python -m ssl_jax.evaluate --exported exported/simclr --eval knn [--data_dir DIR]
  python -m ssl_jax.evaluate --workdir runs/simclr --eval linear --stages all --pool avg2x2
  python -m ssl_jax.evaluate --workdir runs/simclr --eval invariance [--invariance occlusion]

Reads the encoder, either the config and newest checkpoint of --workdir or an
encoder written by `python -m ssl_jax.export` (--exported; its export.json
names the dataset, splits and eval settings, and --dataset, --data_dir,
--train_split, --test_split fill in or override them), extracts the pooled
features of its stages for the train and test splits, and runs each evaluator
on each requested stage (`--stages final`, the default; `all`; or names such as
`block2,block4`). --pool: of a ConvNet's stage, the `global` average (its
default), or `avg{s}x{s}` (e.g. avg2x2, avg3x3), VISSL's pooling of a conv stage
to an s x s grid, s*s*C features; of a ViT's block, its class token `cls` (its
default, what ViT papers report), the `mean` patch token, `avg{s}x{s}` of the
patch grid, or `dino`, DINO's linear-eval feature (the class tokens of the last
4 blocks; ViT-B: the last block's, and its mean patch token). "Offline" means
after pretraining, on a frozen encoder (the numbers papers report), as opposed to
the online probes logged during training.

Everything goes to RESULTS, which is --results_dir, else the workdir or the
export: the features under RESULTS/features/, keyed by the weights, model, eval
view, pooling, stages, split and example limit, so that evaluating the same
checkpoint again skips extraction (--nocache: neither read nor write them);
the results printed, written to RESULTS/eval_<name>[_<pool>][_random_init].json
and appended as rows to the Markdown table RESULTS/results.md. The work is
ssl_jax/evaluation.py's `evaluate`; this module is its command line.

Several processes (`launch/local.sh --processes N evaluate -- ...`, the process
flags) extract a share of the features each; process 0 alone prints, and the
line Gloo (the CPU collectives) writes as the processes connect is dropped.
--verbosity (any value) shows every process's output, as it comes.
"""
from __future__ import annotations

import json

from absl import flags

from ssl_jax import cli, parallel, process_output
from ssl_jax import eval as eval_lib
from ssl_jax.errors import UserError
from ssl_jax.eval import evaluators
from ssl_jax.evaluation import EVALUATORS, check_evals, evaluate


# The flags that say what is evaluated (every process must be given the same).
ARGUMENTS = ("workdir", "exported", "pool", "cache", "results_dir", "dataset", "data_dir",
             "train_split", "test_split", "eval", "invariance", "stages", "random_init", "plot")


def main(argv):
    del argv
    f = flags.FLAGS
    evals, overrides = tuple(f.eval), dict(f["config"].override_values)  # {"eval.a.b": value}
    if f.invariance:  # which transformations (splits of the sets dataset) to score
        if "invariance" not in evals:
            if f["eval"].present:
                raise UserError("--invariance picks the transformations that --eval "
                                "invariance scores: add invariance to --eval.")
            evals = ("invariance",)
        overrides["eval.invariance.splits"] = tuple(f.invariance)
    check_evals(evals)  # these before waiting for the other processes
    cli.join_processes()  # every process extracts its share of the features
    # Several processes: process 0 speaks, without Gloo's chatter (--verbosity, of any
    # value: every process's output as it comes).
    with process_output.one_voice(verbose=f["verbosity"].present):
        # Processes given different arguments would combine different extractions.
        parallel.agree(json.dumps([{name: f[name].value for name in ARGUMENTS}, overrides],
                                  default=str, sort_keys=True), "evaluate arguments")
        evaluate(f.workdir, evals, f.stages[0] if len(f.stages) == 1 else f.stages,
                 f.random_init, exported=f.exported, pool=f.pool, cache=f.cache,
                 results_dir=f.results_dir, dataset=f.dataset, data_dir=f.data_dir,
                 train_split=f.train_split, test_split=f.test_split, plot=f.plot,
                 overrides=overrides)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and checkpoints).")
    flags.DEFINE_string("exported", None, "Instead of --workdir: an encoder written by "
                        "`python -m ssl_jax.export` (its OUT folder).")
    flags.DEFINE_string("pool", None, "How a stage becomes features. A ConvNet's (H, W, C) "
                        "map: global (average, C-d; its default) or avg{s}x{s} (e.g. avg2x2: "
                        "an s x s grid of averages, s*s*C-d, as VISSL probes conv stages). A "
                        "ViT block's tokens: cls (the class token; its default), mean (of "
                        "the patch tokens; global is the same), avg{s}x{s} (of the patch "
                        "grid), or dino (DINO's linear eval: the class tokens of the last 4 "
                        "blocks concatenated; for ViT-B, width 768, the last block's with "
                        "its mean patch token).")
    flags.DEFINE_bool("cache", True, "Read and write the extracted features under "
                      "RESULTS/features/ (--nocache: extract afresh, write nothing).")
    flags.DEFINE_string("results_dir", None, "Where results and the feature cache go (default: "
                        "the workdir or the export).")
    flags.DEFINE_string("dataset", None, "With --exported: the dataset (default: export.json's).")
    flags.DEFINE_string("data_dir", None, "With --exported: its data_dir (default: export.json's).")
    flags.DEFINE_string("train_split", None, "With --exported: the split probes fit on.")
    flags.DEFINE_string("test_split", None, "With --exported: the split probes are scored on.")
    flags.DEFINE_list("eval", list(evaluators.DEFAULT), "Evaluators to run, of "
                      f"{', '.join(EVALUATORS)}.")
    flags.DEFINE_list("invariance", None, "With --eval invariance (implied when --eval is not "
                      "given): the transformations to score, splits of the sets dataset, e.g. "
                      "occlusion,viewpoint,illumination,instance (default: all of its splits).")
    flags.DEFINE_list("stages", ["final"], "Encoder stages to probe: final, all, or names "
                      "(e.g. block2,block4).")
    flags.DEFINE_bool("random_init", False, "Evaluate the run's encoder as initialised (BN "
                      "statistics measured on train): the baseline pretraining must beat.")
    flags.DEFINE_bool("plot", False, "Also write PNG figures to RESULTS/figures/: accuracy per "
                      "stage, the low-shot curve, a retrieval grid (test images and their "
                      "nearest train images) and, for a ViT, attention.png (each head's "
                      "class-token attention of the last block on a few test images).")
    cli.define_process_flags()
    flags.mark_flags_as_mutual_exclusive(["workdir", "exported"], required=True)
    # --config.eval.a.b=value: typed by the evaluators' defaults, applied to the
    # stored config by evaluate(); the rest of a stored config is not for changing.
    cli.run(main, config={"eval": eval_lib.defaults()})
