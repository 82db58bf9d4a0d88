"""The figures of eval/report.py (matplotlib, imported only when drawing): accuracy
per stage as grouped bars, the low-shot curve, invariance per transformation as
grouped bars (Purushwalkam & Gupta 2020's figures), and the retrieval grid and a ViT's
attention maps (DINO's figure) of `python -m ssl_jax.evaluate --plot`. Rows are report.Row: a run or its random-init
baseline, with its evaluation records.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TITLES = {"linear": "linear probe", "knn": "kNN (cosine)", "mlp": "MLP probe",
          "lowshot": "low-shot linear (largest k)"}


def panel_title(name: str) -> str:
    """A record's name (eval_<name>.json: evaluator, then _<pool>) -> its panel title:
    "linear_avg2x2" -> "linear probe, avg2x2 pooling"."""
    evaluator, _, pool = name.partition("_")
    base = TITLES.get(evaluator, evaluator) if evaluator in TITLES or not pool else name
    return base + (f", {pool} pooling" if pool and evaluator in TITLES else "")


def _pyplot():
    """pyplot on the Agg backend: files only, no display needed (clusters, CI)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _colour(plt, row):
    return plt.get_cmap("tab10")(row.colour % 10)


def plot_accuracy_per_stage(rows: Sequence, groups: dict[str, list[str]], path: str,
                            title: str | None = None) -> None:
    """Grouped bars: a panel per evaluator of groups {evaluator: stages}, a group per
    stage, a bar per row (top-1 %). Random-init rows are hatched in their run's colour;
    low-shot bars carry ± std."""
    plt = _pyplot()
    from matplotlib.patches import Patch
    evals = list(groups)
    if not evals:
        raise ValueError("no evaluation records to plot.")
    # Panels stacked, one per evaluator: the same stages line up, and the page stays
    # narrow enough to read however many evaluators there are.
    bars_per_panel = max(len(g) for g in groups.values()) * len(rows)
    # At least 6.4 inches: one stage's bars must not clip the title.
    fig, axes = plt.subplots(len(evals), 1, figsize=(min(18.0, max(6.4, 3.0 + 0.32
                                                                       * bars_per_panel)),
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
        ax.set_title(panel_title(e))
        ax.set_ylabel("top-1 accuracy (%)")
    axes[-1, 0].set_xlabel("encoder stage (shallow → deep)")
    handles = [Patch(facecolor=(*_colour(plt, r)[:3], 0.35) if r.random_init else _colour(plt, r),
                     edgecolor=_colour(plt, r), hatch="///" if r.random_init else None,
                     label=r.label) for r in rows]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(rows), 4), fontsize=9)
    fig.suptitle(title or "Top-1 accuracy per encoder stage (frozen encoder, test split)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_invariance(rows: Sequence, path: str, stage: str | None = None,
                    title: str = "Invariance of the top-K neurons") -> bool:
    """Grouped bars, as the paper draws them: a panel per K, a group per transformation,
    a bar per row with an invariance record, at `stage` (default: each record's final
    stage). Random-init rows hatched. -> False, writing nothing, when no row has one."""
    present = [r for r in rows if "invariance" in r.records]
    if not present:
        return False
    plt = _pyplot()
    picked = [r.records["invariance"]["stages"][stage or r.records["invariance"]["stage"]]
              for r in present]
    splits = list(dict.fromkeys(t for v in picked for t in v["scores"]))
    ks = sorted({int(k) for v in picked for t in v["scores"].values() for k in t})
    fig, axes = plt.subplots(len(ks), 1, figsize=(min(16.0, 3.0 + 0.5 * len(splits)
                                                      * len(present)), 0.9 + 3.0 * len(ks)),
                             squeeze=False, layout="constrained")
    width = 0.8 / len(present)
    for ax, k in zip(axes[:, 0], ks):
        for i, (row, v) in enumerate(zip(present, picked)):
            colour = _colour(plt, row)
            xs = [j - 0.4 + width * (i + 0.5) for j, t in enumerate(splits) if t in v["scores"]]
            ys = [v["scores"][t][str(k)] for t in splits if t in v["scores"]]
            bars = ax.bar(xs, ys, width, label=row.label,
                          facecolor=(*colour[:3], 0.35) if row.random_init else colour,
                          edgecolor=colour, hatch="///" if row.random_init else None)
            ax.bar_label(bars, fmt="%.1f", fontsize=7, rotation=90, padding=2)
        ax.set_xticks(range(len(splits)), splits)
        ax.set_ylabel(f"invariance, top-{k} neurons")
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    axes[0, 0].legend(fontsize=8, ncol=min(len(present), 4))
    fig.suptitle(title + (f" ({stage})" if stage else ""))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_lowshot(rows: Sequence, path: str, stage: str | None = None,
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
                   neighbour_labels=None, cell_inches: float = 1.0, class_names=(),
                   title: str = "Nearest neighbours") -> None:
    """query_images (Q, H, W, C) uint8, neighbour_images (Q, K, H, W, C) uint8 (C = 1
    or 3), query_labels (Q,), neighbour_labels (Q, K) -> a PNG at `path`: a row per
    query, the query first, then its K neighbours nearest first. With labels, each
    image is captioned with its label and a neighbour whose label differs from its
    query's gets a red frame (the errors a kNN classifier's vote has to outweigh).
    class_names: captions name the classes (else their numbers)."""
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
                label = int(query_labels[i] if j == 0 else neighbour_labels[i, j - 1])
                name = class_names[label] if label < len(class_names) else str(label)
                ax.set_xlabel(name, fontsize=7, labelpad=4, color="red" if wrong else "black")
            if i == 0:
                ax.set_title("query" if j == 0 else f"#{j}", fontsize=8)
    fig.suptitle(title + (" (red: label differs from the query's)"
                                         if query_labels is not None else ""), fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def attention_grid(views, attention, path: str, masks=None, cell_inches: float = 1.1,
                   title: str = "Class-token attention of the last block") -> None:
    """views (N, h, w, C) float in [0, 1] (C = 1 or 3), attention (N, heads, h, w) (already
    at the view's size), masks None or bool (N, heads, h, w) -> a PNG at `path`: a row
    per image, the image first, then each head's attention map (its own colour scale, as
    DINO shows them), with the outline of its mask when given."""
    views, attention = np.asarray(views), np.asarray(attention)
    if (views.ndim != 4 or attention.ndim != 4 or attention.shape[0] != views.shape[0]
            or attention.shape[2:] != views.shape[1:3] or views.shape[-1] not in (1, 3)):
        raise ValueError(f"need views (N, h, w, C) with C 1 or 3 and attention (N, heads, h, "
                         f"w); got {views.shape} and {attention.shape}.")
    plt = _pyplot()
    n, heads = attention.shape[:2]
    # At least 4 inches wide: a model of few heads must not clip the title.
    fig, axes = plt.subplots(n, heads + 1, squeeze=False, layout="constrained",
                             figsize=(max(4.0, cell_inches * (heads + 1)), cell_inches * n + 0.6))
    grey = views.shape[-1] == 1
    for i in range(n):
        axes[i, 0].imshow(views[i, ..., 0] if grey else views[i], cmap="gray" if grey else None,
                          vmin=0.0, vmax=1.0, interpolation="nearest")
        for h in range(heads):
            ax = axes[i, h + 1]
            ax.imshow(attention[i, h], cmap="viridis", interpolation="nearest")
            if masks is not None and masks[i, h].any() and not masks[i, h].all():
                ax.contour(masks[i, h].astype(float), levels=[0.5], colors="white",
                           linewidths=0.8)
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("image" if j == 0 else f"head {j - 1}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
