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
  invariance.png          invariance per transformation, a bar per run, a panel per
                          K (if any has invariance records); the table's invariance
                          columns hold the same scores

Nothing here runs a model: it only reads JSON, so it works on results copied off
a cluster. `write_figures(workdir)` draws the same figures for one run into
WORKDIR/figures/, and `retrieval_grid` draws queries next to their nearest
neighbours. matplotlib is imported inside the drawing functions (eval/figures.py),
so importing this module stays cheap for the evaluators that call it.
"""
from __future__ import annotations

import glob
import json
import os
from typing import NamedTuple, Sequence

from ssl_jax.errors import UserError
# The figures are drawn in eval/figures.py.
from ssl_jax.eval.figures import plot_accuracy_per_stage, plot_invariance, plot_lowshot

# Display order of the evaluators evaluate.py knows; records of any other name
# found in a workdir follow, sorted (a new evaluator shows up without an edit here).
ORDER = ("linear", "knn", "mlp", "lowshot", "invariance")
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
        raise UserError(f"{workdir} is not a directory: --workdirs takes training workdirs "
                        "(or exports, or --results_dir folders) that `python -m "
                        "ssl_jax.evaluate` wrote eval_*.json into.")
    paths = sorted(glob.glob(os.path.join(workdir, "eval_*.json")))
    if not paths:
        raise UserError(
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
                raise UserError(f"{path} is not valid JSON ({e}); re-run its evaluation.") from None
        for stage in record.get("stages", {}).values():
            if "per_k" in stage:
                stage["per_k"] = {int(k): v for k, v in stage["per_k"].items()}
        if name.endswith(RANDOM_SUFFIX):
            random[name[:-len(RANDOM_SUFFIX)]] = record
        else:
            trained[name] = record
    info = {"method": os.path.basename(os.path.normpath(workdir)), "dataset": None}
    config_path, export_path = (os.path.join(workdir, f) for f in ("config.json", "export.json"))
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
        info.update({k: config[k] for k in ("method", "dataset") if k in config})
    elif os.path.exists(export_path):  # an export evaluated in place: its run's method
        with open(export_path) as f:
            source = json.load(f).get("source", {})
        info.update({k: source[k] for k in ("method", "dataset") if k in source})
    return info, trained, random


def newest_step_only(records: dict) -> dict:
    """{evaluator: record} -> those of the newest step: one run's figures must not mix
    an earlier checkpoint's numbers (an evaluator not rerun since) with the latest."""
    steps = [r.get("step") for r in records.values() if r.get("step") is not None]
    return {e: r for e, r in records.items() if r.get("step") in (None, max(steps, default=None))}


def load_rows(workdirs: Sequence[str], names: Sequence[str] | None = None,
              random_init: bool = True) -> list[Row]:
    """A Row per workdir, each followed by "<name> (random init)" when random_init and
    the workdir has eval_*_random_init.json. Names default to config.json's method,
    with the workdir's basename added where two runs share a method."""
    if not workdirs:
        raise UserError("--workdirs is empty: name the evaluated workdirs to compare, "
                        "--workdirs runs/simclr,runs/moco.")
    if names is not None and len(names) != len(workdirs):
        raise UserError(f"--names has {len(names)} entries for {len(workdirs)} workdirs "
                        f"({', '.join(names)} for {', '.join(workdirs)}): give one name per "
                        "workdir, in the same order, or leave --names out.")
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


def _panels(rows: Sequence[Row]) -> dict[str, list[str]]:
    """{evaluator: its stages} of `rows`' accuracy evaluators, in display order: the
    accuracy bar chart's panels (invariance has its own figure)."""
    return {e: stages(rows, e) for e in evaluators(rows) if e != "invariance"}


def _invariance_columns(rows: Sequence[Row], stage: str) -> list[tuple[str, int]]:
    """[(transformation, K)] any row's invariance record has at `stage`, in its order."""
    seen = {}
    for r in rows:
        scores = r.records.get("invariance", {}).get("stages", {}).get(stage, {})
        for t, per_k in scores.get("scores", {}).items():
            seen.update({(t, int(k)): None for k in per_k})
    return list(seen)


def _cell(record: dict | None, stage: str, k=None) -> str:
    value = (record or {}).get("stages", {}).get(stage)
    if value is None:
        return MISSING
    if isinstance(k, tuple):  # invariance: (transformation, K)
        score = value.get("scores", {}).get(k[0], {}).get(str(k[1]))
        return MISSING if score is None else f"{score:.2f}"
    if k is None:
        return f"{value['top1']:.2f}"
    shot = value.get("per_k", {}).get(k)
    return MISSING if shot is None else f"{shot['mean']:.2f}±{shot['std']:.2f}"


def compare_table(rows: Sequence[Row], shots: Sequence[int] = LOWSHOT_K) -> str:
    """-> a Markdown table: a row per Row, a column per evaluator x stage (low-shot:
    per stage x k in shots; invariance: per stage x transformation x K), top-1 % (an
    invariance score) with two decimals, MISSING where a run lacks it."""
    columns = []  # (header, evaluator, stage, k or None)
    for e in evaluators(rows):
        for s in stages(rows, e):
            if e == "lowshot":
                columns += [(f"lowshot {s} k={k}", e, s, k) for k in shots]
            elif e == "invariance":
                columns += [(f"invariance {s} {t} K={k}", e, s, (t, k))
                            for t, k in _invariance_columns(rows, s)]
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


# ------------------------------------------------------------------- entry points

def write_figures(workdir: str, random_init: bool = True, stage: str | None = None) -> list[str]:
    """The per-stage bar chart and (if the run has such records) the low-shot curve and
    the invariance bars of ONE workdir, next to its random-init baseline when evaluated, into WORKDIR/figures/.
    -> the paths written."""
    rows = [row._replace(records=newest_step_only(row.records))
            for row in load_rows([workdir], random_init=random_init)]
    check_stage(rows, stage)
    out = os.path.join(workdir, "figures")
    os.makedirs(out, exist_ok=True)
    name = rows[0].info["method"]
    paths = []
    if _panels(rows):
        paths.append(os.path.join(out, "accuracy_per_stage.png"))
        plot_accuracy_per_stage(rows, _panels(rows), paths[0],
                                title=f"{name}: top-1 accuracy per encoder stage")
    if plot_lowshot(_having(rows, "lowshot", stage), os.path.join(out, "lowshot.png"), stage,
                    title=f"{name}: low-shot linear probe"):
        paths.append(os.path.join(out, "lowshot.png"))
    if plot_invariance(_having(rows, "invariance", stage), os.path.join(out, "invariance.png"),
                       stage, title=f"{name}: invariance of the top-K neurons"):
        paths.append(os.path.join(out, "invariance.png"))
    return paths


def report(workdirs: Sequence[str], out: str, names: Sequence[str] | None = None,
           random_init: bool = True, stage: str | None = None) -> dict:
    """Writes compare.md, accuracy_per_stage.png and (with low-shot records) lowshot.png
    comparing `workdirs` into `out`. -> {"table": markdown, "paths": [written]}."""
    rows = load_rows(workdirs, names, random_init)
    check_stage(rows, stage)
    os.makedirs(out, exist_ok=True)
    table = compare_table(rows)
    paths = [os.path.join(out, "compare.md"), os.path.join(out, "accuracy_per_stage.png")]
    with open(paths[0], "w") as f:
        f.write("Top-1 accuracy (%) of frozen encoders on the test split, per evaluator and "
                f"encoder stage; low-shot: mean±std over seeds at k labelled images per class. "
                "Invariance: Purushwalkam & Gupta 2020's score of the top-K neurons per "
                f"transformation (higher: more invariant). {MISSING}: not evaluated.\n\n"
                + table + "\n" + _sources(rows))
    if _panels(rows):
        plot_accuracy_per_stage(rows, _panels(rows), paths[1])
    else:  # invariance records only
        paths.pop()
    if plot_lowshot(_having(rows, "lowshot", stage), os.path.join(out, "lowshot.png"), stage):
        paths.append(os.path.join(out, "lowshot.png"))
    if plot_invariance(_having(rows, "invariance", stage), os.path.join(out, "invariance.png"),
                       stage):
        paths.append(os.path.join(out, "invariance.png"))
    return {"table": table, "paths": paths}


def _having(rows: Sequence[Row], evaluator: str, stage: str | None) -> list[Row]:
    """The rows whose `evaluator` record has `stage` (all rows when stage is None): a
    figure of one stage leaves out the runs not evaluated there."""
    return [r for r in rows if stage is None
            or stage in r.records.get(evaluator, {}).get("stages", {})]


def check_stage(rows: Sequence[Row], stage: str | None) -> None:
    """--stage picks the stage of the low-shot curves and invariance bars: a UserError,
    before anything is written, unless some such record has it."""
    if stage is None:
        return
    have = {s for r in rows for e in ("lowshot", "invariance") if e in r.records
            for s in r.records[e]["stages"]}
    if stage not in have:
        raise UserError(f"--stage {stage}: no low-shot or invariance record has that stage"
                        + (f"; they have {', '.join(sorted(have))}." if have else
                           " (there are none: --stage is for their figures)."))


def main(argv):
    del argv
    from absl import flags
    f = flags.FLAGS
    for name, example in (("workdirs", "runs/simclr,runs/moco"), ("out", "reports/fmnist")):
        if not f[name].value:
            raise UserError(f"--{name} is required (e.g. --{name} {example}): --workdirs the "
                            "evaluated runs to compare, --out the folder for compare.md and "
                            "the figures.")
    result = report(f.workdirs, f.out, f.names, f.random_init, f.stage)
    print(result["table"])
    print("Wrote " + ", ".join(result["paths"]))


if __name__ == "__main__":
    from absl import flags

    from ssl_jax import cli
    flags.DEFINE_list("workdirs", None, "Workdirs evaluated with `python -m ssl_jax.evaluate`.")
    flags.DEFINE_list("names", None, "A row name per workdir (default: config.json's method).")
    flags.DEFINE_bool("random_init", True, "Add a '<name> (random init)' row for each workdir "
                      "with eval_*_random_init.json (--norandom_init: leave them out).")
    flags.DEFINE_string("stage", None, "Stage of the low-shot curves and invariance bars "
                        "(default: each record's final stage).")
    flags.DEFINE_string("out", None, "Directory for compare.md and the figures.")
    cli.run(main)
