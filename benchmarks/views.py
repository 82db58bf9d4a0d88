r"""Poly-View's claim at our scale: at equal compute, how many views per image?

    python benchmarks/views.py [--views 2,4,8] [--seeds 0,1] [--variants geometric,arithmetic]
                               [--steps 300] [--losses ""] [--root runs/views] [--parallel 1]

Every point is `configs/polyview.py:dataset=fashion_mnist,views=M` (ours: K = 256 / M
images of M crops each, so K x M = SimCLR's 2 x 128 encoder passes a step) trained for
--steps steps, the same for every M, through launch/sweep.py (one sweep per M over the
variants and seeds, ROOT/M=<M>/<point>), then linear and kNN evaluated on the frozen
encoder (the demo's protocol). M = 2 is SimCLR exactly (Poly-View at M = 2 is NT-Xent,
tests/test_multiview.py), so it is the baseline and runs one variant. --losses adds, at
--loss_views (default the largest M), the other M-view losses on the same views (e.g.
mv_infonce,mv_dhel,cmc: config.multiview.loss; cmc with graph=full), one seed each.

Writes benchmarks/results/views.json (one row per point: M, K, variant or loss, seed,
linear and kNN top-1) and views.png (linear top-1 against M, a line per
variant, the seeds' mean with both values as points), and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _sweep(config: str, sweeps: list[str], root: str, steps: int, batch: int,
           parallel: int) -> None:
    """One launch/sweep.py run; the length in epochs (the presets count in epochs): steps
    of `batch` images of Fashion-MNIST's 60000."""
    cmd = [sys.executable, os.path.join(ROOT, "launch", "sweep.py"), "--config", config,
           "--root", root, "--eval", "linear,knn", "--parallel", str(parallel)]
    for s in sweeps:
        cmd += ["--sweep", s]
    cmd += ["--", f"--config.total_epochs={steps * batch / 60000}",
            "--config.log_every_steps=50", f"--config.ckpt_every_steps={steps}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def _rows(root: str, m: int, what: dict) -> list[dict]:
    """One row per finished point under root: its eval_linear.json and eval_knn.json."""
    out = []
    for name in sorted(os.listdir(root)):
        point = os.path.join(root, name)
        lin, knn = (os.path.join(point, f"eval_{e}.json") for e in ("linear", "knn"))
        if not (os.path.isdir(point) and os.path.exists(lin) and os.path.exists(knn)):
            continue
        with open(lin) as f:
            linear = json.load(f)
        with open(knn) as f:
            knn_r = json.load(f)
        with open(os.path.join(point, "config.json")) as f:
            cfg = json.load(f)
        out.append(dict(what, views=m, batch=cfg["batch_size"], seed=cfg["seed"],
                        variant=cfg.get("polyview", {}).get("variant", ""),
                        loss=cfg["multiview"]["loss"], linear=linear["top1"],
                        knn=knn_r["top1"], point=name))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--views", default="2,4,8")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default="geometric,arithmetic")
    ap.add_argument("--losses", default="", help="other M-view losses at the largest M")
    ap.add_argument("--loss_views", type=int, default=0, help="M for --losses (default: largest)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--root", default=os.path.join(ROOT, "runs", "views"))
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "views.json"))
    args = ap.parse_args()
    views = [int(v) for v in args.views.split(",")]
    rows = []
    for m in views:
        variants = "geometric" if m == 2 else args.variants  # equal at M = 2
        root = os.path.join(args.root, f"M={m}")
        _sweep(f"configs/polyview.py:dataset=fashion_mnist,views={m}",
               [f"config.polyview.variant={variants}", f"config.seed={args.seeds}"],
               root, args.steps, 256 // m, args.parallel)
        rows += _rows(root, m, {})
    for loss in filter(None, args.losses.split(",")):
        m, root = args.loss_views or max(views), os.path.join(args.root, f"loss={loss}")
        config = (f"configs/cmc.py:dataset=fashion_mnist,views={m},graph=full" if loss == "cmc"
                  else f"configs/polyview.py:dataset=fashion_mnist,views={m}")
        sweeps = [f"config.seed={args.seeds.split(',')[0]}"]
        if loss != "cmc":
            sweeps.append(f"config.multiview.loss={loss}")
        _sweep(config, sweeps, root, args.steps, 256 // m, args.parallel)
        rows += _rows(root, m, {})
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"steps": args.steps, "rows": rows}, f, indent=1)

    print("\n| M | K | loss | variant | seed | linear top-1 | kNN top-1 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['views']} | {r['batch']} | {r['loss']} | {r['variant']} | {r['seed']} | "
              f"{r['linear']:.2f} | {r['knn']:.2f} |")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for variant in args.variants.split(","):
        pts = [r for r in rows if r["loss"] == "polyview"
               and (r["variant"] == variant or r["views"] == 2)]
        ms = sorted({r["views"] for r in pts})
        mean = [sum(r["linear"] for r in pts if r["views"] == m) /
                max(1, len([r for r in pts if r["views"] == m])) for m in ms]
        line, = ax.plot(ms, mean, marker="o", label=f"Poly-View {variant}")
        ax.scatter([r["views"] for r in pts], [r["linear"] for r in pts], s=10,
                   color=line.get_color(), alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(views, [str(v) for v in views])
    ax.set_xlabel("views per image M (K x M = 256 fixed)")
    ax.set_ylabel("linear top-1 (%)")
    ax.set_title(f"Fashion-MNIST, {args.steps} steps, equal compute")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.replace(".json", ".png"), dpi=120)
    print(f"wrote {args.out} and {args.out.replace('.json', '.png')}")


if __name__ == "__main__":
    main()
