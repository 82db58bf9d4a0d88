"""Where offline evaluation results go: printed, written to
RESULTS/eval_<name>[_<pool>][_random_init].json (one record per evaluator, what
eval/report.py reads; _<pool> unless the encoder's default pool made the features:
a ConvNet's global average, a ViT's class token), appended as rows to the Markdown
table RESULTS/results.md, and, with --plot, drawn into RESULTS/figures/.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from ssl_jax import storage
from ssl_jax.eval import knn

TABLE_COLUMNS = ("date", "method", "dataset", "step", "evaluator", "stage")


def table_header(columns=("top-1", "top-5")) -> str:
    """The Markdown header of results.md rows whose value columns are `columns`."""
    return ("| " + " | ".join(TABLE_COLUMNS + tuple(columns)) + " |\n"
            "|---|---|---|---:|---|---|" + "---:|" * len(columns) + "\n")


TABLE_HEADER = table_header()  # the classification evaluators' table


def label(stage: str, pool: str) -> str:
    """How a stage is named in printouts and results.md: the pooling unless global."""
    return stage if pool == "global" else f"{stage} ({pool})"


def record(per_stage: dict[str, dict], final: str, *, pool: str, step: int, random_init: bool,
           seconds: float, exported: str | None = None, **counts: int) -> dict:
    """An evaluator's {stage: record} -> the record of eval_<name>.json: the `final`
    (deepest requested) stage's "top1", "top5" (if it has them) and name, every
    stage's under "stages", and where the numbers come from. counts: e.g.
    train_examples=N, test_examples=M."""
    head = {k: per_stage[final][k] for k in ("top1", "top5") if k in per_stage[final]}
    r = {**head, "stage": final, "pool": pool, "stages": per_stage, "step": int(step),
         "random_init": random_init, **{k: int(v) for k, v in counts.items()},
         "seconds": seconds}
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
        print(f"{name} ({what} {at}): {evaluator.summary(v)}  [{dataset} {test_split}]",
              flush=True)
        for extra, w in evaluator.extra(v).items():  # e.g. kNN at further k
            print(f"    {extra}: top-1 {w['top1']:.2f}%  top-5 {w['top5']:.2f}%", flush=True)
        for line in evaluator.details(v):  # e.g. the whole low-shot curve
            print("    " + line, flush=True)


def write(results_dir: str, config, name: str, r: dict, evaluator,
          stage_order=None, default_pool: str = "global") -> None:
    """RESULTS/eval_<name>[_<pool>][_random_init].json, merged with what it holds
    (`merge`), and rows of RESULTS/results.md (this evaluation's alone). default_pool:
    the encoder's (features.default_pool), whose records have no _<pool>."""
    out = storage.path(results_dir)  # local, or a bucket's gs://
    out.mkdir(parents=True, exist_ok=True)
    suffix = (("" if r["pool"] == default_pool else f"_{r['pool']}")
              + ("_random_init" if r["random_init"] else ""))
    path = out / f"eval_{name}{suffix}.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:  # a half-written file: this evaluation replaces it
        old = None
    path.write_text(json.dumps(merge(old, r, stage_order, evaluator.merge), indent=2))
    rows = evaluator.rows or (lambda v: accuracy_rows(name, v, evaluator.extra))
    append_table(out / "results.md", config, r, rows, evaluator.columns)


def merge(old: dict | None, new: dict, stage_order=None,
          merge_stage=lambda old_stage, new_stage: new_stage) -> dict:
    """The record to keep when `new` is written where `old` was: a later evaluation of
    some stages must not erase the others' numbers, which report and --plot read.

    Same step (the same weights): old's stages updated with new's, ordered as
    stage_order (the encoder's stages, shallow to deep) when given, a stage in both
    becoming merge_stage(old's, new's) (the evaluator's `merge`: new's, or for
    invariance old's transformations updated with new's); the top level names the
    deepest. Another step: new alone, with old's stages kept under "previous_steps"
    {step: stages} (one evaluation's record per earlier step).
    """
    if old is None or "stages" not in old:
        return new
    if old.get("step") != new["step"]:
        previous = dict(old.get("previous_steps", {}), **{str(old.get("step")): old["stages"]})
        return dict(new, previous_steps=previous)
    stages = {**old["stages"], **{s: merge_stage(old["stages"][s], v) if s in old["stages"]
                                  else v for s, v in new["stages"].items()}}
    rank = {s: i for i, s in enumerate(stage_order or ())}
    names = sorted(stages, key=lambda s: rank.get(s, len(rank)))  # stable: others keep order
    final = names[-1]
    head = {k: stages[final][k] for k in ("top1", "top5") if k in stages[final]}
    out = dict(new, **head, stage=final, stages={s: stages[s] for s in names})
    if "previous_steps" in old:
        out["previous_steps"] = old["previous_steps"]
    return out


def accuracy_rows(name: str, stage_record: dict,
                  extra=lambda stage_record: {}) -> list[tuple[str, tuple[str, ...]]]:
    """A classification evaluator's rows of one stage: [(what, (top-1, top-5))], its
    own and extra(stage record)'s ({label: {"top1", "top5"}}, named "<name> <label>":
    kNN's k=20)."""
    more = [(f"{name} {k}", x) for k, x in extra(stage_record).items()]
    return [(what, (f"{w['top1']:.2f}", f"{w['top5']:.2f}"))
            for what, w in [(name, stage_record)] + more]


def append_table(path: str, config, record: dict, rows, columns=("top-1", "top-5")) -> None:
    """Appends rows of an evaluator's record to the Markdown table results.md, the
    file people read and paste: rows(stage record) -> [(what, cells)], one row each,
    under a header of `columns` (written when the file starts, or when its last
    table has other columns: invariance scores are not top-1/top-5)."""
    path = storage.path(path)
    header = table_header(columns)
    text = path.read_text() if path.exists() else ""
    tables = [line for line in text.splitlines() if line.startswith("| date |")]
    out = [] if tables and tables[-1] + "\n" == header.splitlines(True)[0] else (
        ["\n" if text else "", header])
    method = config.method + (" (random init)" if record["random_init"] else "")
    for stage, v in record["stages"].items():
        for what, cells in rows(v):
            out.append(f"| {time.strftime('%Y-%m-%d %H:%M')} | {method} | {config.dataset} | "
                       f"{record['step']} | {what} (offline) | "
                       f"{label(stage, record.get('pool', 'global'))} | "
                       + " | ".join(cells) + " |\n")
    storage.append_text(path, "".join(out))


def plot(results_dir: str, train, test, ftr, ytr, fte, yte, random_init: bool,
         queries: int = 8, k: int = 8, class_names=(), method: str = "") -> None:
    """--plot: RESULTS/figures/ gets the per-stage bars and low-shot curve of
    every record there (report.write_figures) and retrieval.png: the first
    `queries` test images and their k nearest train images by the deepest
    requested stage's features (cosine), wrong-label neighbours framed red.
    train, test: the splits' sources; ftr (N, D), fte (M, D): their features;
    class_names caption the images, method (+ random init) titles the grid."""
    from ssl_jax.eval import figures, report  # matplotlib only when figures are asked for
    nn = knn.nearest(ftr, fte[:queries], k)  # rows of ftr are the train split in order
    paths = report.write_figures(results_dir)
    suffix = "_random_init" if random_init else ""
    paths.append(os.path.join(results_dir, "figures", f"retrieval{suffix}.png"))
    figures.retrieval_grid(np.stack([test[i]["image"] for i in range(len(nn))]),
                           np.stack([[train[int(j)]["image"] for j in row] for row in nn]),
                           paths[-1], yte[:len(nn)], ytr[nn], class_names=class_names,
                           title=f"{method}{' (random init)' if random_init else ''}: "
                                 "nearest train images by the final stage's features")
    print("Figures: " + ", ".join(paths), flush=True)


def plot_attention(results_dir: str, encoder, variables, view_cfg, source, random_init: bool,
                   count: int = 4, method: str = "") -> str | None:
    """--plot of a ViT: RESULTS/figures/attention[_random_init].png, the first `count`
    images of `source` (the test split) as the encoder sees them and each head's
    class-token attention of its last block over them (eval/attention.py), the patches
    holding 60% of it outlined, as DINO shows them. -> its path; None, writing
    nothing, when the encoder sows no such attention (a ConvNet)."""
    from ssl_jax.eval import attention, figures  # matplotlib only when figures are asked for
    images = np.stack([source[i]["image"] for i in range(min(count, len(source)))])
    got = attention.cls_attention(encoder, variables, view_cfg, images)
    if got is None:
        return None
    views, maps = got
    os.makedirs(os.path.join(results_dir, "figures"), exist_ok=True)
    path = os.path.join(results_dir, "figures",
                        f"attention{'_random_init' if random_init else ''}.png")
    figures.attention_grid(views, attention.upsample(maps, views.shape[1:3]), path,
                           attention.upsample(attention.mass_mask(maps), views.shape[1:3]),
                           title=f"{method}{' (random init)' if random_init else ''}: the "
                                 "class token's attention in the last block,\nper head "
                                 "(outlined: the patches holding 60% of it)")
    return path
