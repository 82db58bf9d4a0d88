r"""Comparison tables and figures from the evaluation records of several runs.

  python -m ssl_jax.eval.report --workdirs runs/simclr,runs/moco,runs/sup \
      [--names SimCLR,MoCo,supervised] [--norandom_init] [--stage block4] --out reports/fmnist

Reads WORKDIR/eval_<name>.json (and eval_<name>_random_init.json), as
`python -m ssl_jax.evaluate` writes them, from every workdir and writes to --out:

  compare.md              one Markdown table, a row per run (and per random-init
                          baseline), a column per evaluator x stage, top-1 %
                          (low-shot: mean±std at k = 1, 8, 64); also printed
  accuracy_per_stage.png  grouped bars: top-1 per stage, a bar per run, a panel
                          per evaluator
  lowshot.png             low-shot top-1 against labels per class k (log2 axis),
                          ± std over seeds, a line per run (if any has low-shot)

Nothing here runs a model: it only reads JSON, so it works on results copied off
a cluster. `write_figures(workdir)` draws the same figures for one run into
WORKDIR/figures/, and `retrieval_grid` draws queries next to their nearest
neighbours. matplotlib is imported inside the drawing functions, so importing
this module stays cheap for the evaluators that call it.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import NamedTuple, Sequence

import numpy as np

# Display order of the evaluators evaluate.py knows; records of any other name
# found in a workdir follow, sorted (a new evaluator shows up without an edit here).
ORDER = ("linear", "knn", "mlp", "lowshot")
TITLES = {"linear": "linear probe", "knn": "kNN (cosine)", "mlp": "MLP probe",
          "lowshot": "low-shot linear (largest k)"}
LOWSHOT_K = (1, 8, 64)  # the table's low-shot columns; the figure shows every k
MISSING = "–"
RANDOM_SUFFIX = "_random_init"


class Row(NamedTuple):
    """One line of the table / one bar colour: a run, or its random-init baseline."""
    label: str
    records: dict  # {evaluator: record as evaluate.py writes it}
    workdir: str
    colour: int  # index into the colour cycle: a run and its baseline share one
    random_init: bool
    info: dict  # {"method", "dataset"} from WORKDIR/config.json when present


# ------------------------------------------------------------------- reading

def load_records(workdir: str) -> tuple[dict, dict, dict]:
    """-> ({"method", "dataset"}, {evaluator: record}, {evaluator: random-init record}).

    Low-shot "per_k" keys come back as ints (JSON stores them as strings)."""
    if not os.path.isdir(workdir):
        raise ValueError(f"{workdir} is not a directory (expected a training workdir).")
    paths = sorted(glob.glob(os.path.join(workdir, "eval_*.json")))
    if not paths:
        raise ValueError(
            f"{workdir} holds no evaluation records (eval_*.json). Run "
            f"`python -m ssl_jax.evaluate --workdir {workdir} --eval linear,knn` first "
            f"(add --random_init for the baseline).")
    trained, random = {}, {}
    for path in paths:
        name = os.path.basename(path)[len("eval_"):-len(".json")]
        with open(path) as f:
            try:
                record = json.load(f)
            except json.JSONDecodeError as e:  # e.g. copied while evaluate was writing it
                raise ValueError(f"{path} is not valid JSON ({e}); re-run its evaluation.") from None
        for stage in record.get("stages", {}).values():
            if "per_k" in stage:
                stage["per_k"] = {int(k): v for k, v in stage["per_k"].items()}
        if name.endswith(RANDOM_SUFFIX):
            random[name[:-len(RANDOM_SUFFIX)]] = record
        else:
            trained[name] = record
    info = {"method": os.path.basename(os.path.normpath(workdir)), "dataset": None}
    config_path = os.path.join(workdir, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
        info.update({k: config[k] for k in ("method", "dataset") if k in config})
    return info, trained, random


def load_rows(workdirs: Sequence[str], names: Sequence[str] | None = None,
              random_init: bool = True) -> list[Row]:
    """A Row per workdir, each followed by "<name> (random init)" when random_init and
    the workdir has eval_*_random_init.json. Names default to config.json's method,
    with the workdir's basename added where two runs share a method."""
    if names is not None and len(names) != len(workdirs):
        raise ValueError(f"--names has {len(names)} entries for {len(workdirs)} workdirs: "
                         f"{list(names)} vs {list(workdirs)}.")
    loaded = [load_records(w) for w in workdirs]
    if names is None:
        methods = [info["method"] for info, _, _ in loaded]
        names = [m if methods.count(m) == 1 else f"{m} ({_short(w, m)})"
                 for m, w in zip(methods, workdirs)]
    rows = []
    for i, (workdir, name, (info, trained, random)) in enumerate(zip(workdirs, names, loaded)):
        if trained:
            rows.append(Row(name, trained, workdir, i, False, info))
        if random and (random_init or not trained):
            rows.append(Row(f"{name} (random init)", random, workdir, i, True, info))
    return rows


def _short(workdir: str, method: str) -> str:
    """The workdir's basename, or its last two parts where the basename is the method
    ("quality/simclr" tells two simclr runs apart, "simclr (simclr)" would not)."""
    parts = os.path.normpath(workdir).split(os.sep)
    return parts[-1] if parts[-1] != method or len(parts) < 2 else "/".join(parts[-2:])


def evaluators(rows: Sequence[Row]) -> list[str]:
    """Evaluator names any row has, known ones in ORDER first."""
    found = {name for row in rows for name in row.records}
    return [e for e in ORDER if e in found] + sorted(found - set(ORDER))


def stages(rows: Sequence[Row], evaluator: str) -> list[str]:
    """Stage names any row has for `evaluator`, shallow to deep.

    Each record lists its stages shallow to deep; the longest list sets the order and
    stages only others have (another encoder's) go after their predecessor there."""
    lists = sorted((list(r.records[evaluator]["stages"]) for r in rows if evaluator in r.records),
                   key=len, reverse=True)
    merged: list[str] = []
    for names in lists:
        for j, name in enumerate(names):
            if name not in merged:
                merged.insert(merged.index(names[j - 1]) + 1 if j else len(merged), name)
    return merged


def _cell(record: dict | None, stage: str, k: int | None = None) -> str:
    value = (record or {}).get("stages", {}).get(stage)
    if value is None:
        return MISSING
    if k is None:
        return f"{value['top1']:.2f}"
    shot = value.get("per_k", {}).get(k)
    return MISSING if shot is None else f"{shot['mean']:.2f}±{shot['std']:.2f}"


def compare_table(rows: Sequence[Row], shots: Sequence[int] = LOWSHOT_K) -> str:
    """-> a Markdown table: a row per Row, a column per evaluator x stage (low-shot:
    per stage x k in shots), top-1 % with two decimals, MISSING where a run lacks it."""
    columns = []  # (header, evaluator, stage, k or None)
    for e in evaluators(rows):
        for s in stages(rows, e):
            if e == "lowshot":
                columns += [(f"lowshot {s} k={k}", e, s, k) for k in shots]
            else:
                columns.append((f"{e} {s}", e, s, None))
    lines = ["| run | " + " | ".join(c[0] for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = [_cell(row.records.get(e), s, k) for _, e, s, k in columns]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _sources(rows: Sequence[Row]) -> str:
    """Where each row's numbers come from: the footnote that makes a table checkable."""
    out = []
    for row in rows:
        steps = sorted({r.get("step") for r in row.records.values()} - {None})
        what = ", ".join(filter(None, [row.info.get("dataset"),
                                       "step " + "/".join(map(str, steps)) if steps else None]))
        out.append(f"- {row.label}: `{row.workdir}`" + (f" ({what})" if what else ""))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------- figures

def _pyplot():
    """pyplot on the Agg backend: files only, no display needed (clusters, CI)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _colour(plt, row: Row):
    return plt.get_cmap("tab10")(row.colour % 10)


def plot_accuracy_per_stage(rows: Sequence[Row], path: str, title: str | None = None) -> None:
    """Grouped bars: a panel per evaluator, a group per stage, a bar per row (top-1 %).
    Random-init rows are hatched in their run's colour; low-shot bars carry ± std."""
    plt = _pyplot()
    from matplotlib.patches import Patch
    evals = evaluators(rows)
    if not evals:
        raise ValueError("no evaluation records to plot.")
    groups = {e: stages(rows, e) for e in evals}
    # Panels stacked, one per evaluator: the same stages line up, and the page stays
    # narrow enough to read however many evaluators there are.
    bars_per_panel = max(len(g) for g in groups.values()) * len(rows)
    fig, axes = plt.subplots(len(evals), 1, figsize=(min(18.0, 3.0 + 0.32 * bars_per_panel),
                                                     0.9 + 3.0 * len(evals)),
                             squeeze=False, layout="constrained")
    for ax, e in zip(axes[:, 0], evals):
        present = [row for row in rows if e in row.records]  # no gaps for unevaluated runs
        width = 0.8 / len(present)
        for i, row in enumerate(present):
            per_stage = row.records[e]["stages"]
            xs = [j - 0.4 + width * (i + 0.5) for j, s in enumerate(groups[e]) if s in per_stage]
            values = [per_stage[s] for s in groups[e] if s in per_stage]
            # A low-shot record's top-1 is the mean at its largest k: show that k's spread.
            err = [v["per_k"][max(v["per_k"])]["std"] for v in values] if e == "lowshot" else None
            colour = _colour(plt, row)
            bars = ax.bar(xs, [v["top1"] for v in values], width, yerr=err, capsize=2,
                          facecolor=(*colour[:3], 0.35) if row.random_init else colour,
                          edgecolor=colour, hatch="///" if row.random_init else None)
            # Runs often differ by a point or two: the printed value shows what bars can't.
            ax.bar_label(bars, fmt="%.1f", fontsize=7, rotation=90, padding=2)
        ax.set_xticks(range(len(groups[e])), groups[e])
        ax.set_ylim(0, 112)
        ax.set_yticks(range(0, 101, 20))
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(TITLES.get(e, e))
        ax.set_ylabel("top-1 accuracy (%)")
    axes[-1, 0].set_xlabel("encoder stage (shallow → deep)")
    handles = [Patch(facecolor=(*_colour(plt, r)[:3], 0.35) if r.random_init else _colour(plt, r),
                     edgecolor=_colour(plt, r), hatch="///" if r.random_init else None,
                     label=r.label) for r in rows]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(rows), 4), fontsize=9)
    fig.suptitle(title or "Top-1 accuracy per encoder stage (frozen encoder, test split)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lowshot(rows: Sequence[Row], path: str, stage: str | None = None,
                 title: str = "Low-shot linear probe") -> bool:
    """Low-shot top-1 against k (log2 axis), error bars ± std over seeds, a line per row
    with a low-shot record at `stage` (default: each record's final stage). The title
    goes on with the stage and "(mean ± std over seeds)".
    -> False, writing nothing, when no row has a low-shot record."""
    lines = []  # (row, stage, {k: {"mean", "std"}})
    records = [(row, row.records["lowshot"]) for row in rows if "lowshot" in row.records]
    for row, record in records:
        s = stage or record["stage"]
        per_k = record["stages"].get(s, {}).get("per_k")
        if per_k:
            lines.append((row, s, per_k))
    if records and not lines:
        have = sorted({s for _, r in records for s in r["stages"]})
        raise ValueError(f"no low-shot record at stage {stage!r}; they have stages {have}.")
    if not lines:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    one_stage = len({s for _, s, _ in lines}) == 1
    for row, s, per_k in lines:
        ks = sorted(per_k)
        ax.errorbar(ks, [per_k[k]["mean"] for k in ks], yerr=[per_k[k]["std"] for k in ks],
                    marker="o", markersize=4, capsize=3, color=_colour(plt, row),
                    linestyle="--" if row.random_init else "-",
                    label=row.label if one_stage else f"{row.label} ({s})")
    ks = sorted({k for _, _, per_k in lines for k in per_k})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("labelled training examples per class (k)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    at = f", stage {lines[0][1]}" if one_stage else ""
    ax.set_title(f"{title}{at} (mean ± std over seeds)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def retrieval_grid(query_images, neighbour_images, path: str, query_labels=None,
                   neighbour_labels=None, cell_inches: float = 1.0) -> None:
    """query_images (Q, H, W, C) uint8, neighbour_images (Q, K, H, W, C) uint8 (C = 1
    or 3), query_labels (Q,), neighbour_labels (Q, K) -> a PNG at `path`: a row per
    query, the query first, then its K neighbours nearest first. With labels, each
    image is captioned with its label and a neighbour whose label differs from its
    query's gets a red frame (the errors a kNN classifier's vote has to outweigh)."""
    queries, neighbours = np.asarray(query_images), np.asarray(neighbour_images)
    if (queries.ndim != 4 or neighbours.ndim != 5 or neighbours.shape[0] != queries.shape[0]
            or neighbours.shape[2:] != queries.shape[1:] or queries.shape[-1] not in (1, 3)):
        raise ValueError(f"need query_images (Q, H, W, C) and neighbour_images (Q, K, H, W, C) "
                         f"with C 1 or 3; got {queries.shape} and {neighbours.shape}.")
    if (query_labels is None) != (neighbour_labels is None):
        raise ValueError("give both query_labels and neighbour_labels, or neither.")
    q, k = neighbours.shape[:2]
    if query_labels is not None:
        query_labels, neighbour_labels = np.asarray(query_labels), np.asarray(neighbour_labels)
        if query_labels.shape != (q,) or neighbour_labels.shape != (q, k):
            raise ValueError(f"need query_labels ({q},) and neighbour_labels ({q}, {k}); got "
                             f"{query_labels.shape} and {neighbour_labels.shape}.")
    plt = _pyplot()
    # A narrow empty column sets the queries apart from their neighbours.
    fig = plt.figure(figsize=(cell_inches * (k + 1.3), cell_inches * q * 1.15 + 0.5))
    grid = fig.add_gridspec(q, k + 2, width_ratios=[1, 0.25] + [1] * k, wspace=0.08,
                            hspace=0.35, left=0.02, right=0.98, bottom=0.04, top=1 - 0.5 / (
                                cell_inches * q * 1.15 + 0.5))
    grey = queries.shape[-1] == 1
    for i in range(q):
        for j in range(k + 1):
            ax = fig.add_subplot(grid[i, 0 if j == 0 else j + 1])
            image = queries[i] if j == 0 else neighbours[i, j - 1]
            ax.imshow(image[..., 0] if grey else image, cmap="gray" if grey else None,
                      vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            wrong = (query_labels is not None and j > 0
                     and neighbour_labels[i, j - 1] != query_labels[i])
            for spine in ax.spines.values():
                spine.set_visible(bool(wrong))
                spine.set_color("red")
                spine.set_linewidth(3)
            if query_labels is not None:
                label = query_labels[i] if j == 0 else neighbour_labels[i, j - 1]
                ax.set_xlabel(str(label), fontsize=7, labelpad=4, color="red" if wrong else "black")
            if i == 0:
                ax.set_title("query" if j == 0 else f"#{j}", fontsize=8)
    fig.suptitle("Nearest neighbours" + (" (red: label differs from the query's)"
                                         if query_labels is not None else ""), fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------- entry points

def write_figures(workdir: str, random_init: bool = True, stage: str | None = None) -> list[str]:
    """The per-stage bar chart and (if the run has low-shot records) the low-shot curve of
    ONE workdir, next to its random-init baseline when evaluated, into WORKDIR/figures/.
    -> the paths written."""
    rows = load_rows([workdir], random_init=random_init)
    out = os.path.join(workdir, "figures")
    os.makedirs(out, exist_ok=True)
    name = rows[0].info["method"]
    paths = [os.path.join(out, "accuracy_per_stage.png")]
    plot_accuracy_per_stage(rows, paths[0], title=f"{name}: top-1 accuracy per encoder stage")
    if plot_lowshot(rows, os.path.join(out, "lowshot.png"), stage,
                    title=f"{name}: low-shot linear probe"):
        paths.append(os.path.join(out, "lowshot.png"))
    return paths


def report(workdirs: Sequence[str], out: str, names: Sequence[str] | None = None,
           random_init: bool = True, stage: str | None = None) -> dict:
    """Writes compare.md, accuracy_per_stage.png and (with low-shot records) lowshot.png
    comparing `workdirs` into `out`. -> {"table": markdown, "paths": [written]}."""
    rows = load_rows(workdirs, names, random_init)
    os.makedirs(out, exist_ok=True)
    table = compare_table(rows)
    paths = [os.path.join(out, "compare.md"), os.path.join(out, "accuracy_per_stage.png")]
    with open(paths[0], "w") as f:
        f.write("Top-1 accuracy (%) of frozen encoders on the test split, per evaluator and "
                f"encoder stage; low-shot: mean±std over seeds at k labelled images per class. "
                f"{MISSING}: not evaluated.\n\n" + table + "\n" + _sources(rows))
    plot_accuracy_per_stage(rows, paths[1])
    if plot_lowshot(rows, os.path.join(out, "lowshot.png"), stage):
        paths.append(os.path.join(out, "lowshot.png"))
    return {"table": table, "paths": paths}


def main(argv):
    del argv
    from absl import flags
    f = flags.FLAGS
    result = report(f.workdirs, f.out, f.names, f.random_init, f.stage)
    print(result["table"])
    print("Wrote " + ", ".join(result["paths"]))


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_list("workdirs", None, "Workdirs evaluated with `python -m ssl_jax.evaluate`.")
    flags.DEFINE_list("names", None, "A row name per workdir (default: config.json's method).")
    flags.DEFINE_bool("random_init", True, "Add a '<name> (random init)' row for each workdir "
                      "with eval_*_random_init.json (--norandom_init: leave them out).")
    flags.DEFINE_string("stage", None, "Stage of the low-shot curves (default: each record's "
                        "final stage).")
    flags.DEFINE_string("out", None, "Directory for compare.md and the figures.")
    flags.mark_flags_as_required(["workdirs", "out"])
    sys.exit(app.run(main))
