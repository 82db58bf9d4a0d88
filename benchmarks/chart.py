r"""Bar chart of the ssl_jax-vs-PyTorch speed results.

    python benchmarks/chart.py [--methods simclr,moco,rotnet,pirl] [--results benchmarks/results]
                               [--out benchmarks/results/speed.png]

Reads end_to_end.json, step.json and augment.json (those present; written by
the scripts of the same names) and draws one panel each: images/s per method,
ssl_jax beside the PyTorch peer, the ratio ssl_jax / PyTorch above each pair.
Writes a PNG (matplotlib's Agg backend: no display needed).
"""
from __future__ import annotations

import json
import os

import matplotlib
from absl import app, flags

matplotlib.use("Agg")   # before pyplot: headless machines and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
_RESULTS = flags.DEFINE_string("results", os.path.join(HERE, "results"), "Folder of result JSONs.")
_OUT = flags.DEFINE_string("out", os.path.join(HERE, "results", "speed.png"), "PNG to write.")
_METHODS = flags.DEFINE_list("methods", None, "Methods to draw; default: all in the results.")

# (file, panel title, [(bar label, key in a result row)])
PANELS = [
    ("end_to_end.json", "End to end: real pretraining",
     [("ssl_jax", "ssl_jax"), ("PyTorch (DataLoader, 2 workers)", "torch")]),
    ("step.json", "Model step only (views made beforehand)",
     [("ssl_jax", "ssl_jax"), ("PyTorch", "torch")]),
    ("augment.json", "Views alone",
     [("ssl_jax (jit + vmap)", "ssl_jax"), ("PyTorch, 2 workers", "torch_2_workers"),
      ("PyTorch, 1 process", "torch_main_process")]),
]
COLOURS = ["#1f77b4", "#d62728", "#ff9896"]


def _panel(ax, rows, bars, title):
    methods = [r["method"] for r in rows]
    width = 0.8 / len(bars)
    for j, (label, key) in enumerate(bars):
        values = [r[key]["per_s"] if key in r else 0.0 for r in rows]
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, values, width, label=label, color=COLOURS[j])
    for i, r in enumerate(rows):   # ratio of the first bar to the second, above the pair
        a, b = bars[0][1], bars[1][1]
        if a in r and b in r and r[b]["per_s"]:
            top = max(r[a]["per_s"], r[b]["per_s"])
            ax.annotate(f"ssl_jax {r[a]['per_s'] / r[b]['per_s']:.2f}x", (i, top), ha="center",
                        va="bottom", xytext=(0, 3), textcoords="offset points", fontsize=9)
    ax.set_xticks(range(len(rows)), [f"{m}\nB={r['batch_size']}" for m, r in zip(methods, rows)])
    ax.set_ylabel("source images / s")
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.12)
    # Below the axes: inside, it would cover the bars' ratio labels.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(bars))


def main(argv):
    del argv
    found = []
    for name, title, bars in PANELS:
        path = os.path.join(_RESULTS.value, name)
        if os.path.exists(path):
            with open(path) as f:
                found.append((json.load(f), title, bars))
    if not found:
        raise SystemExit(f"No result JSON in {_RESULTS.value}: run end_to_end.py, step.py or "
                         "augment.py first.")
    fig, axes = plt.subplots(1, len(found), figsize=(5.6 * len(found), 4.8), squeeze=False)
    for ax, (data, title, bars) in zip(axes[0], found):
        rows = [r for r in data["results"] if not _METHODS.value or r["method"] in _METHODS.value]
        _panel(ax, rows, bars, title)
    m = found[0][0].get("machine", {})
    v = m.get("versions", {})
    fig.suptitle(f"ssl_jax vs PyTorch on Fashion-MNIST pretraining — {m.get('cores', '?')} cores "
                 f"{m.get('cpu', '')}, jax {v.get('jax')}, torch {v.get('torch')}, "
                 f"{m.get('date', '')}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    fig.savefig(_OUT.value, dpi=120)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
