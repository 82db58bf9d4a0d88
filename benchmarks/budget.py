r"""Quality per CPU-hour: every method's budget preset, trained to its CPU budget, probed.

    python benchmarks/budget.py [--methods simclr,moco,...] [--budgets 10m,30m] [--seeds 0]
                                [--root runs/budget] [--parallel 1]
    python benchmarks/budget.py --calibrate [--methods ...]   # the steps each budget fits
    python benchmarks/budget.py --table                        # table + figure from ROOT only

A point is `configs/<method>.py:dataset=fashion_mnist,budget=<B>` (configs/common.py
set_budget: the method's recipe for that budget, its length what fits on this machine,
config.cpu_budget_minutes = B as the guard) run through launch/sweep.py (one sweep per
method and budget over --seeds, in ROOT/<method>/<budget>/config.seed=<S>), then
evaluated as `./run.sh demo` evaluates: frozen encoder, the converged linear probe (its
weight decay chosen on a held-out 10% of train) at every stage, and kNN; the headline
is the final stage, as the demo's.

CPU time is what each run counted itself (ssl_jax/cpu_budget.py: user + system of its
processes, compilation included, evaluation not), read from WORKDIR/cpu_seconds.json.
Runs inherit this script's allocator: tcmalloc when installed (launch/malloc.sh), as
run.sh and launch/local.sh run the trainer; SSL_JAX_MALLOC=system for glibc's.

--calibrate runs each method's 10m preset for --calibrate_steps steps and prints the
CPU seconds per step and the fixed cost (start, compilation, a warm start, counted up
to the first log step), then the steps each budget fits with a --margin of slack: the
numbers configs/<method>.py's BUDGET holds. Writes benchmarks/results/budget.json (or budget_calibration.json) and
budget.png: linear top-1 against CPU-hours, a line per method, random init and raw
pixels as references; prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
METHODS = "simclr,moco,npid,pirl,rotnet,jigsaw,supervised,dino,polyview"
MINUTES = {"10m": 10.0, "30m": 30.0, "2h": 120.0}  # configs/common.BUDGETS
# References measured with the same probe (benchmarks/RESULTS.md, "The linear probe"):
# the 4-block ConvNet at random init (BN statistics from train) and raw pixels.
RANDOM_INIT, RAW_PIXELS = 83.95, 84.72
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def _environment() -> dict:
    env = dict(os.environ)
    if env.get("SSL_JAX_MALLOC", "tcmalloc") != "system" and not env.get("LD_PRELOAD") \
            and os.path.exists(TCMALLOC):
        env.update(LD_PRELOAD=TCMALLOC, TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=str(2 ** 40))
    return env


def _metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"train/cpu_minutes"' in line]


def calibrate(args) -> None:
    rows = []
    n, every = args.calibrate_steps, max(1, args.calibrate_steps // 6)
    for m in args.methods.split(","):
        workdir = os.path.join(args.root, "calibrate", m)
        cmd = [sys.executable, "-m", "ssl_jax.train", "--config",
               f"configs/{m}.py:dataset=fashion_mnist,budget=10m", "--workdir", workdir,
               f"--config.total_steps={n}", f"--config.log_every_steps={every}",
               f"--config.ckpt_every_steps={n}"]
        if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            os.makedirs(workdir, exist_ok=True)
            print("+", " ".join(cmd), flush=True)
            with open(os.path.join(workdir, "train.out"), "w") as out:
                subprocess.run(cmd, cwd=ROOT, env=_environment(), check=True, stdout=out,
                               stderr=subprocess.STDOUT)
        logged = _metrics(workdir)
        (s0, c0), (s1, c1) = [(r["step"], 60 * r["train/cpu_minutes"]) for r in
                              (logged[0], logged[-1])]
        rate = (c1 - c0) / (s1 - s0)  # after the first log step, which paid compilation
        fixed = c0  # start, compilation, warm start and the first log step's steps: an
        # overestimate by those steps, and robust to a rate that drifts with the load
        fits = {b: int((args.margin * 60 * mins - fixed) / rate) // 10 * 10
                for b, mins in MINUTES.items()}
        rows.append(dict(method=m, cpu_s_per_step=round(rate, 4), fixed_cpu_s=round(fixed, 1),
                         steps=fits))
        print(f"{m}: {rate:.3f} CPU-s/step, fixed {fixed:.0f} CPU-s -> {fits}", flush=True)
    _write(args.out.replace(".json", "_calibration.json"),
           {"margin": args.margin, "steps": n, "rows": rows})
    print("\n| method | CPU-s / step | fixed CPU-s | " + " | ".join(MINUTES) + " |")
    print("|---|---:|---:|" + "---:|" * len(MINUTES))
    for r in rows:
        print(f"| {r['method']} | {r['cpu_s_per_step']:.3f} | {r['fixed_cpu_s']:.0f} | "
              + " | ".join(str(r["steps"][b]) for b in MINUTES) + " |")


def train_and_probe(args) -> None:
    for m in args.methods.split(","):
        for b in args.budgets.split(","):
            cmd = [sys.executable, os.path.join(ROOT, "launch", "sweep.py"), "--config",
                   f"configs/{m}.py:dataset=fashion_mnist,budget={b}",
                   "--root", os.path.join(args.root, m, b), "--sweep", f"config.seed={args.seeds}",
                   "--eval", "linear,knn", "--eval_flags", "--stages all",
                   "--parallel", str(args.parallel)]
            print("+", " ".join(cmd), flush=True)
            rc = subprocess.run(cmd, cwd=ROOT, env=_environment()).returncode
            if rc:
                print(f"{m} {b}: the sweep exited {rc}; its points are left out", flush=True)


def _read(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def rows(root: str) -> list[dict]:
    """One row per evaluated point under ROOT/<method>/<budget>/<point>."""
    out = []
    for m in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for b in MINUTES:
            parent = os.path.join(root, m, b)
            for point in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
                w = os.path.join(parent, point)
                lin, knn = _read(os.path.join(w, "eval_linear.json")), _read(
                    os.path.join(w, "eval_knn.json"))
                cpu, cfg = _read(os.path.join(w, "cpu_seconds.json")), _read(
                    os.path.join(w, "config.json"))
                if not (lin and knn and cpu and cfg):
                    continue
                step = max(int(s) for s in cpu)
                k20 = knn["stages"][knn["stage"]].get("also", {})  # knn.further_k
                out.append(dict(
                    method=m, budget=b, seed=cfg["seed"], steps=step,
                    planned_steps=cfg["total_steps"], cpu_min=cpu[str(step)] / 60,
                    linear=lin["top1"], stage=lin["stage"],
                    linear_stages={s: v["top1"] for s, v in lin["stages"].items()},
                    knn=knn["top1"], knn_k20=(k20.get("k=20") or {}).get("top1"),
                    point=w))
    return out


def table(rs: list[dict], out: str) -> None:
    _write(out, {"random_init": RANDOM_INIT, "raw_pixels": RAW_PIXELS, "rows": rs})
    print("\n| method | budget | seed | steps (of planned) | CPU-min | linear (final stage) "
          "| linear, every stage | kNN k=200 |\n|---|---|---|---|---:|---:|---|---:|")
    for r in sorted(rs, key=lambda r: (MINUTES[r["budget"]], -r["linear"])):
        every = " / ".join(f"{v:.2f}" for v in r["linear_stages"].values())
        print(f"| {r['method']} | {'2 CPU-hours' if r['budget'] == '2h' else r['budget']} | "
              f"{r['seed']} | {r['steps']} ({r['planned_steps']}) | {r['cpu_min']:.1f} | "
              f"{r['linear']:.2f} | {every} | {r['knn']:.2f} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in sorted({r["method"] for r in rs}):
        pts = sorted((r["cpu_min"] / 60, r["linear"]) for r in rs if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.axhline(RANDOM_INIT, color="gray", ls="--", lw=1, label="random init")
    ax.axhline(RAW_PIXELS, color="black", ls=":", lw=1, label="raw pixels")
    ax.set_xscale("log")
    ax.set_xlabel("training CPU-hours (user + system, 2-core AMD EPYC)")
    ax.set_ylabel("linear top-1 (%), Fashion-MNIST test")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out.replace(".json", ".png"), dpi=120)
    print(f"wrote {out} and {out.replace('.json', '.png')}")


def _write(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--budgets", default="10m,30m", help="of 10m, 30m, 2h")
    ap.add_argument("--seeds", default="0", help="config.seed values, comma-separated")
    ap.add_argument("--root", default=os.path.join(ROOT, "runs", "budget"))
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--calibrate_steps", type=int, default=120)
    ap.add_argument("--margin", type=float, default=0.93,
                    help="--calibrate: the share of the budget the steps may use")
    ap.add_argument("--table", action="store_true", help="only the table and figure")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "budget.json"))
    args = ap.parse_args()
    for b in args.budgets.split(","):
        if b not in MINUTES:
            ap.error(f"--budgets: {b!r} is not one of {list(MINUTES)}")
    if args.calibrate:
        return calibrate(args)
    if not args.table:
        train_and_probe(args)
    table(rows(args.root), args.out)


if __name__ == "__main__":
    main()
