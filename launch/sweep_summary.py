"""A sweep's state and summary, read from its workdirs alone (launch/sweep.py).

Per point, ROOT/<name>/sweep_point.json holds what the sweep recorded (values,
command, exit statuses, total steps); the rest comes from what train and
evaluate write: the newest checkpoint step (orbax's step folders under
checkpoints/), metrics.jsonl and eval_<name>.json. ROOT/summary.md and
ROOT/summary.json have one row per point: its swept values, status (done,
interrupted, failed, pending), step, final train loss, online probe accuracy
(when logged), offline top-1 per evaluator, images/s.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics

POINT_FILE = "sweep_point.json"
ONLINE = ("online_linear/top1", "online_knn/top1")


# ------------------------------------------------------------------ a workdir

def read_point(workdir: str) -> dict:
    try:
        with open(os.path.join(workdir, POINT_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_point(workdir: str, state: dict) -> None:
    path = os.path.join(workdir, POINT_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, indent=2)
    os.replace(path + ".tmp", path)


def latest_step(workdir: str) -> int | None:
    """The newest complete checkpoint's step, or None (ssl_jax/checkpoint.py)."""
    from ssl_jax import checkpoint  # jax and orbax: only once a workdir is looked at
    steps = checkpoint.complete_steps(workdir)
    return steps[-1] if steps else None


def total_steps(config) -> int | None:
    """The run's length in steps, as train computes it (ssl_jax/experiment.py), from
    the prepared dataset's metadata; None when that cannot be read here."""
    try:
        from ssl_jax import config as cfg_lib
        from ssl_jax.data import sources
        info = sources.dataset_info(config.dataset, config.data_dir)
        n = info["num_examples"].get(config.train_split)
        if n is None:
            return None
        return cfg_lib.steps(config, "total", steps_per_epoch=n // config.batch_size,
                             batch_size=config.batch_size)
    except Exception:  # noqa: BLE001  (no dataset here, a sliced split, ...): unknown
        return None


def stored_total(workdir: str) -> int | None:
    try:
        from ssl_jax import config as cfg_lib
        return total_steps(cfg_lib.load(workdir))
    except Exception:  # noqa: BLE001
        return None


def is_finished(workdir: str, state: dict) -> bool:
    latest = latest_step(workdir)
    if latest is None:
        return False
    total = state.get("total_steps") or stored_total(workdir)
    if total is None:  # unknown length: trust train's last exit status
        return state.get("train_rc") == 0
    return latest >= total


def eval_record(workdir: str, name: str) -> dict | None:
    try:
        with open(os.path.join(workdir, f"eval_{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def evals_to_do(workdir: str, names) -> list[str]:
    """The evaluators without a result for the newest checkpoint."""
    latest = latest_step(workdir)
    return [n for n in names
            if (r := eval_record(workdir, n)) is None or r.get("step") != latest]


def read_metrics(workdir: str) -> dict:
    """metrics.jsonl -> {"train/loss": last, "images_per_sec": median of the
    logged rates (0 = not yet measured is left out), online top-1s: last, and
    every other key's last value}."""
    last, rates = {}, []
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    d = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                last.update(d)
                r = d.get("train/images_per_sec")
                if r:
                    rates.append(r)
    except OSError:
        pass
    last.pop("step", None)
    if rates:
        last["images_per_sec"] = statistics.median(rates)
    return last


def status(workdir: str, state: dict) -> str:
    rc = state.get("train_rc")
    if is_finished(workdir, state):
        return "failed" if state.get("eval_rc") not in (None, 0) else "done"
    if rc is not None and rc not in (0, 75) and rc > 0:
        return "failed"
    if latest_step(workdir) is not None or rc is not None:
        return "interrupted"
    return "pending"


# -------------------------------------------------------------------- a sweep

def points(root: str) -> tuple[list[dict], list[str], list[str], str | None]:
    """-> ([{name, values}], swept keys, evaluators, metric) from ROOT/sweep.json,
    else from the workdirs' sweep_point.json files."""
    try:
        with open(os.path.join(root, "sweep.json")) as f:
            s = json.load(f)
        return s["points"], s["keys"], s.get("eval", []), s.get("metric")
    except (OSError, ValueError, KeyError):
        pass
    pts = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        state = read_point(os.path.join(root, name))
        if state:
            pts.append(dict(name=name, values=state.get("values", {})))
    keys = list(dict.fromkeys(k for p in pts for k in p["values"]))
    evals = sorted({f[5:-5] for p in pts for f in os.listdir(os.path.join(root, p["name"]))
                    if re.fullmatch(r"eval_[a-z0-9]+\.json", f)})
    return pts, keys, evals, None


def row(root: str, point: dict, evals) -> dict:
    wd = os.path.join(root, point["name"])
    state = read_point(wd)
    m = read_metrics(wd)
    r = dict(name=point["name"], workdir=wd, values=point["values"], status=status(wd, state),
             step=latest_step(wd),
             total_steps=state.get("total_steps") or point.get("total_steps") or stored_total(wd),
             train_seconds=state.get("train_seconds_total"))
    r["train/loss"] = m.get("train/loss")
    r["images_per_sec"] = m.get("images_per_sec")
    for k in ONLINE:
        r[k] = m.get(k)
    for n in evals:
        rec = eval_record(wd, n)
        r[f"eval/{n}"] = rec.get("top1") if rec else None
    r["metrics"] = m
    return r


def default_metric(rows, evals) -> str:
    if evals:
        return f"eval/{evals[0]}"
    for k in ONLINE:
        if any(r.get(k) is not None for r in rows):
            return k
    return "train/loss"


def metric_key(metric: str, evals) -> str:
    if metric in evals or metric in ("linear", "knn", "mlp", "lowshot"):
        return f"eval/{metric}"
    return metric


def value(r: dict, key: str):
    v = r.get(key, r["metrics"].get(key))
    return v if isinstance(v, (int, float)) and not math.isnan(v) else None


def sort_rows(rows, key: str):
    lower = "loss" in key  # losses ascending, accuracies and rates descending
    have = [r for r in rows if value(r, key) is not None]
    have.sort(key=lambda r: value(r, key) if lower else -value(r, key))
    return have + [r for r in rows if value(r, key) is None]


def _fmt(v, digits=2):
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(rows, keys, evals, key) -> str:
    online = [k for k in ONLINE if any(r.get(k) is not None for r in rows)]
    cols = ([(k, lambda r, k=k: r["values"].get(k, "–")) for k in keys]
            + [("status", lambda r: r["status"]),
               ("step", lambda r: f"{_fmt(r['step'])}/{_fmt(r['total_steps'])}"),
               ("final loss", lambda r: _fmt(r["train/loss"], 4))]
            + [(f"{k.split('/')[0]} top-1 %", lambda r, k=k: _fmt(r[k])) for k in online]
            + [(f"{n} top-1 %", lambda r, n=n: _fmt(r[f"eval/{n}"])) for n in evals]
            + [("img/s", lambda r: _fmt(r["images_per_sec"], 0))])
    known = {"train/loss", "images_per_sec", *ONLINE, *(f"eval/{n}" for n in evals)}
    if key not in known:
        cols.append((key, lambda r: _fmt(value(r, key), 4)))
    lines = ["| " + " | ".join(c for c, _ in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(f(r)) for _, f in cols) + " |" for r in rows]
    order = "ascending" if "loss" in key else "descending"
    return "\n".join(lines) + f"\n\nSorted by {key} ({order}).\n"


def plot_metric(root: str, rows, keys, key) -> list[str]:
    """ROOT/sweep_<key>.png: the metric against each swept key's values, one
    line per combination of the other keys' values."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return None
    paths = []
    for k in keys:
        others = [o for o in keys if o != k]
        xs_all = [r["values"].get(k) for r in rows]
        numeric = all(num(x) is not None for x in xs_all)
        cats = sorted(set(map(str, xs_all)))
        fig, ax = plt.subplots(figsize=(5, 3.5))
        groups = {}
        for r in rows:
            if value(r, key) is not None:
                groups.setdefault(tuple(r["values"].get(o) for o in others), []).append(r)
        for g, rs in sorted(groups.items(), key=lambda x: str(x[0])):
            xy = sorted(((num(r["values"][k]) if numeric else cats.index(str(r["values"][k])),
                          value(r, key)) for r in rs))
            label = ",".join(f"{o}={v}" for o, v in zip(others, g)) or None
            ax.plot([x for x, _ in xy], [y for _, y in xy], "o-", label=label)
        if numeric and all(num(x) > 0 for x in xs_all) and \
                max(map(num, xs_all)) / min(map(num, xs_all)) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(cats)), cats)
        ax.set_xlabel(k)
        ax.set_ylabel(key)
        if others and groups:
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(root, f"sweep_{re.sub(r'[^A-Za-z0-9._=-]+', '_', k)}.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def write(root: str, metric: str | None = None, plot: bool = False) -> tuple[list[dict], str]:
    """Builds the rows, writes ROOT/summary.md and ROOT/summary.json (and the
    plots) -> (rows sorted by the metric, the metric's key)."""
    pts, keys, evals, stored_metric = points(root)
    rows = [row(root, p, evals) for p in pts]
    key = metric_key(metric or stored_metric or default_metric(rows, evals), evals)
    rows = sort_rows(rows, key)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write(f"# Sweep: {root}\n\n" + markdown(rows, keys, evals, key))
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump(dict(root=root, metric=key, keys=keys, eval=evals,
                       rows=[{k: v for k, v in r.items() if k != "metrics"} for r in rows]),
                  f, indent=2)
    if plot and rows:
        plot_metric(root, rows, keys, key)
    return rows, key
