"""The offline evaluators: one interface, one registry.

An evaluator is a function `run(inputs, settings) -> {stage: record}`: the
frozen features of every requested stage in (`Inputs`), its settings
(config.eval.<name> as a dict; {} when the config has no such section), and
one record per stage out, holding "top1" and "top5" in percent and whatever
else the evaluator reports. ssl_jax/evaluate.py runs the requested ones and
eval/results.py prints each record and writes it to eval_<name>.json and
results.md. Adding an evaluator: a module with its `run` (and, if it reports
more than one number per stage, `extra` / `details`), plus one line here.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ssl_jax.eval import invariance, knn, linear, lowshot, mlp


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What every evaluator is given: features of the frozen encoder, stages shallow to deep."""
    train: dict[str, np.ndarray]  # {stage: (N, D_stage) float32}, the train split
    train_y: np.ndarray  # (N,) int32 in [0, num_classes)
    test: dict[str, np.ndarray]  # {stage: (M, D_stage) float32}, the test split
    test_y: np.ndarray  # (M,) int32
    num_classes: int
    seed: int  # config.seed, for evaluators that draw random numbers
    # augment settings (config.eval.linear.augment: {"views": V, light_augment's
    # arguments}) -> V augmented copies of `train`, [{stage: (N, D_stage)}]; [] when
    # V < 1. Extracted (or read from the feature cache) only when called.
    train_views: Callable[[dict], list[dict[str, np.ndarray]]]
    # (dataset, data_dir, split) -> the features of a split of a prepared dataset whose
    # records carry a `set_id` (transformation sets, eval/invariance.py), SetFeatures,
    # extracted (or read from the cache) only when called; dataset, data_dir None: the
    # run's own sets (<dataset>_invariance) in the run's data_dir.
    sets: Callable[[str | None, str | None, str], "SetFeatures"] | None = None
    # (dataset, data_dir) -> that transformation-set dataset's split names (None, None:
    # the run's own sets, <dataset>_invariance).
    set_splits: Callable[[str | None, str | None], list[str]] | None = None


@dataclasses.dataclass(frozen=True)
class SetFeatures:
    """Features of one split of a transformation-set dataset, rows in split order."""
    features: dict[str, np.ndarray]  # {stage: (N, D_stage) float32}
    label: np.ndarray  # (N,) int32, the class of each image
    set_id: np.ndarray  # (N,) int64: images of one object under one transformation share it
    dataset: str  # the sets' dataset, as read


def _nothing(stage_record: dict) -> dict:
    return {}


def _no_lines(stage_record: dict) -> list[str]:
    return []


def _newest(old_stage: dict, new_stage: dict) -> dict:
    return new_stage


def _accuracy(stage_record: dict) -> str:
    return f"top-1 {stage_record['top1']:.2f}%  top-5 {stage_record['top5']:.2f}%"


ACCURACY_COLUMNS = ("top-1", "top-5")


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """run(inputs: Inputs, settings: dict) -> {stage: record}, record {"top1", "top5", ...}."""
    run: Callable[[Inputs, dict], dict[str, dict]]
    # stage record -> {label: {"top1", "top5"}}: further results of the same run, printed
    # under the main one and written as results.md rows of their own (kNN at further k).
    extra: Callable[[dict], dict[str, dict]] = _nothing
    # stage record -> further lines printed under it (low-shot's whole curve).
    details: Callable[[dict], list[str]] = _no_lines
    # What the evaluator reads from Inputs: "splits" (train/test features and labels,
    # the classification evaluators) or "sets" (Inputs.sets only: the train and test
    # splits are then neither extracted nor required to have labels).
    needs: str = "splits"
    # stage record -> the line printed for it.
    summary: Callable[[dict], str] = _accuracy
    # results.md: the value columns of this evaluator's rows, and stage record ->
    # [(what, cells)], one row each (default: top-1/top-5 of the record and of extra).
    columns: tuple[str, ...] = ACCURACY_COLUMNS
    rows: Callable[[dict], list[tuple[str, tuple[str, ...]]]] | None = None
    # (stage record in eval_<name>.json, this evaluation's record of the same stage and
    # step) -> the record to keep (default: this evaluation's; invariance keeps the
    # transformations not scored again).
    merge: Callable[[dict, dict], dict] = _newest


# name (--eval, config.eval.<name>, eval_<name>.json) -> evaluator; --eval's default
# runs them all, in this order.
REGISTRY: dict[str, Evaluator] = {
    "linear": Evaluator(linear.evaluate),
    "knn": Evaluator(knn.evaluate, extra=knn.further_k, summary=knn.summary, rows=knn.rows),
    "mlp": Evaluator(mlp.evaluate),
    "lowshot": Evaluator(lowshot.evaluate, details=lowshot.curve),
    "invariance": Evaluator(invariance.evaluate, details=invariance.details, needs="sets",
                            summary=invariance.summary, columns=invariance.COLUMNS,
                            rows=invariance.rows, merge=invariance.merge),
}
# --eval's default: the classification evaluators (invariance needs a dataset of
# transformation sets prepared beside the run's: it runs when asked for).
DEFAULT = ("linear", "knn", "mlp", "lowshot")
