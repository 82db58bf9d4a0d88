r"""Positives from video (Purushwalkam & Gupta 2020, section 5): MoCo v2 on the same
videos and budget with three kinds of positive pair, scored by a linear probe, kNN
and the invariance measurement.

    python -m ssl_jax.prepare --dataset fashion_mnist_videos
    python -m ssl_jax.prepare --dataset invariance_sets --source fashion_mnist_videos \
        --source_split train --sets_per_class 12
    python benchmarks/video_positives.py [--root runs/video] [--positives frame,temporal,region]
                                         [--seed 0]

For each kind: `python -m ssl_jax.train --config configs/moco_video.py:positives=KIND`
(400 steps of 256 frames), then `python -m ssl_jax.evaluate --eval linear,knn,invariance`
on the final stage; the frame run's encoder at random init too. The probes read the
videos' frames labelled by their garment (fashion_mnist_videos train / test); the
invariance sets are made from the first frame of each train video, on the same
64x64 canvas. Writes benchmarks/results/video_positives.json and prints the
Markdown table RESULTS.md copies. A run already trained is evaluated again, not
retrained (delete its workdir to retrain).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("viewpoint", "occlusion", "illumination", "instance")

_ROOT = flags.DEFINE_string("root", os.path.join(ROOT, "runs", "video"), "Workdirs' parent.")
_POSITIVES = flags.DEFINE_list("positives", ["frame", "temporal", "region"], "Kinds to train.")
_SEED = flags.DEFINE_integer("seed", 0, "config.seed of every run (another seed: other "
                             "workdirs, moco_KIND_seedN, and results file).")
_OUT = flags.DEFINE_string("out", None, "Results file (default: benchmarks/results/"
                           "video_positives.json, video_positives_seedN.json for seed N).")


def _run(cmd: list[str]) -> float:
    t = time.time()
    subprocess.run([sys.executable, "-m"] + cmd, cwd=ROOT, check=True)
    return time.time() - t


def _scores(workdir: str, random_init: bool) -> dict:
    """-> {"linear", "knn": top-1 %, "<split> K=<k>": invariance score} of the final stage."""
    tail = "_random_init" if random_init else ""
    out = {}
    for name in ("linear", "knn"):
        with open(os.path.join(workdir, f"eval_{name}{tail}.json")) as f:
            out[name] = json.load(f)["top1"]
    with open(os.path.join(workdir, f"eval_invariance{tail}.json")) as f:
        record = json.load(f)
    for split, by_k in record["stages"][record["stage"]]["scores"].items():
        for k, score in by_k.items():
            out[f"{split} K={k}"] = score
    return out


def _table(rows: dict[str, dict], ks=("10", "25")) -> str:
    head = ["linear top-1", "kNN top-1"] + [f"{s} K={k}" for s in SPLITS for k in ks]
    keys = ["linear", "knn"] + [f"{s} K={k}" for s in SPLITS for k in ks]
    lines = ["| positives | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for label, scores in rows.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{scores[k]:.2f}" if k in scores else "–" for k in keys) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    results, rows = {}, {}
    for kind in _POSITIVES.value:
        seed = _SEED.value
        workdir = os.path.join(_ROOT.value, f"moco_{kind}" + (f"_seed{seed}" if seed else ""))
        seconds = {}
        if not os.path.exists(os.path.join(workdir, "checkpoints")):
            seconds["train"] = _run(["ssl_jax.train", "--config",
                                     f"configs/moco_video.py:positives={kind}",
                                     f"--config.seed={seed}", "--workdir", workdir])
        evaluations = [False, True] if kind == "frame" else [False]
        for random_init in evaluations:
            seconds["evaluate" + ("_random_init" if random_init else "")] = _run(
                ["ssl_jax.evaluate", "--workdir", workdir, "--eval", "linear,knn,invariance"]
                + (["--random_init"] if random_init else []))
            label = "random init" if random_init else kind
            rows[label] = _scores(workdir, random_init)
        results[kind] = {"workdir": workdir, "seconds": seconds, "scores": rows[kind]}
    results["random init"] = {"scores": rows.get("random init")}
    out = _OUT.value or os.path.join(ROOT, "benchmarks", "results", "video_positives"
                                     + (f"_seed{_SEED.value}" if _SEED.value else "") + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    order = {k: rows[k] for k in ["random init"] + _POSITIVES.value if k in rows}
    print(_table(order))
    print(f"Written to {out}")


if __name__ == "__main__":
    app.run(main)
