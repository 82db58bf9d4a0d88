"""Where offline evaluation results go: printed, written to
RESULTS/eval_<name>[_<pool>][_random_init].json (one record per evaluator, what
eval/report.py reads), appended as rows to the Markdown table RESULTS/results.md,
and, with --plot, drawn into RESULTS/figures/.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from ssl_jax import storage
from ssl_jax.eval import knn

TABLE_HEADER = ("| date | method | dataset | step | evaluator | stage | top-1 | top-5 |\n"
                "|---|---|---|---:|---|---|---:|---:|\n")


def label(stage: str, pool: str) -> str:
    """How a stage is named in printouts and results.md: the pooling unless global."""
    return stage if pool == "global" else f"{stage} ({pool})"


def record(per_stage: dict[str, dict], final: str, *, pool: str, step: int, random_init: bool,
           train_examples: int, test_examples: int, seconds: float,
           exported: str | None = None) -> dict:
    """An evaluator's {stage: record} -> the record of eval_<name>.json: the `final`
    (deepest requested) stage's "top1", "top5" and name, every stage's under "stages",
    and where the numbers come from."""
    r = {"top1": per_stage[final]["top1"], "top5": per_stage[final]["top5"], "stage": final,
         "pool": pool, "stages": per_stage, "step": int(step), "random_init": random_init,
         "train_examples": int(train_examples),
         "test_examples": int(test_examples), "seconds": seconds}
    if exported is not None:
        r["exported"] = os.path.abspath(exported)
    return r


def show(name: str, r: dict, evaluator, dataset: str, test_split: str) -> None:
    """Prints a record: one line per stage, then the evaluator's further results
    (evaluator.extra) and lines (evaluator.details) under it."""
    what = "offline, frozen" + (", random init" if r["random_init"] else "")
    pool = r["pool"]
    for n, v in r["stages"].items():
        at = n if pool == "global" else f"{n}, {pool}"
        print(f"{name} ({what} {at}): top-1 {v['top1']:.2f}%  "
              f"top-5 {v['top5']:.2f}%  [{dataset} {test_split}]", flush=True)
        for extra, w in evaluator.extra(v).items():  # e.g. kNN at further k
            print(f"    {extra}: top-1 {w['top1']:.2f}%  top-5 {w['top5']:.2f}%", flush=True)
        for line in evaluator.details(v):  # e.g. the whole low-shot curve
            print("    " + line, flush=True)


def write(results_dir: str, config, name: str, r: dict, evaluator) -> None:
    """RESULTS/eval_<name>[_<pool>][_random_init].json and rows of RESULTS/results.md."""
    out = storage.path(results_dir)  # local, or a bucket's gs://
    out.mkdir(parents=True, exist_ok=True)
    suffix = (("" if r["pool"] == "global" else f"_{r['pool']}")
              + ("_random_init" if r["random_init"] else ""))
    (out / f"eval_{name}{suffix}.json").write_text(json.dumps(r, indent=2))
    append_table(out / "results.md", config, name, r, evaluator.extra)


def append_table(path: str, config, name: str, record: dict,
                 extra=lambda stage_record: {}) -> None:
    """Appends one row per stage of an evaluator's record to a Markdown table
    (written with its header on first use): the file people read and paste.
    extra(stage record) -> {label: {"top1", "top5"}}: further rows of a stage,
    named "<name> <label>" (kNN's k=20)."""
    rows = [] if storage.path(path).exists() else [TABLE_HEADER]
    method = config.method + (" (random init)" if record["random_init"] else "")
    for stage, v in record["stages"].items():
        more = [(f"{name} {k}", x) for k, x in extra(v).items()]
        for what, w in [(name, v)] + more:
            rows.append(f"| {time.strftime('%Y-%m-%d %H:%M')} | {method} | {config.dataset} | "
                        f"{record['step']} | {what} (offline) | "
                        f"{label(stage, record.get('pool', 'global'))} | {w['top1']:.2f} | "
                        f"{w['top5']:.2f} |\n")
    storage.append_text(path, "".join(rows))


def plot(results_dir: str, train, test, ftr, ytr, fte, yte, random_init: bool,
         queries: int = 8, k: int = 8) -> None:
    """--plot: RESULTS/figures/ gets the per-stage bars and low-shot curve of
    every record there (report.write_figures) and retrieval.png: the first
    `queries` test images and their k nearest train images by the deepest
    requested stage's features (cosine), wrong-label neighbours framed red.
    train, test: the splits' sources; ftr (N, D), fte (M, D): their features."""
    from ssl_jax.eval import figures, report  # matplotlib only when figures are asked for
    nn = knn.nearest(ftr, fte[:queries], k)  # rows of ftr are the train split in order
    paths = report.write_figures(results_dir)
    suffix = "_random_init" if random_init else ""
    paths.append(os.path.join(results_dir, "figures", f"retrieval{suffix}.png"))
    figures.retrieval_grid(np.stack([test[i]["image"] for i in range(len(nn))]),
                           np.stack([[train[int(j)]["image"] for j in row] for row in nn]),
                           paths[-1], yte[:len(nn)], ytr[nn])
    print("Figures: " + ", ".join(paths), flush=True)
