r"""Representation quality of every method at the same budget, on real Fashion-MNIST.

    python benchmarks/quality.py [--methods rotnet,jigsaw,pirl,npid,moco,simclr,supervised]
                                 [--epochs 1] [--root runs/quality] [--phase all|train|eval]

For each method: pretrain with its Fashion-MNIST config
(`python -m ssl_jax.train --config configs/<method>.py:dataset=fashion_mnist`)
for --epochs epochs of the 60000 training images (the same budget for all; the
rest of each recipe is its config's), then evaluate every encoder stage, frozen:
linear probe, weighted kNN (k=200, tau=0.07) and the RotNet paper's non-linear
probe (`mlp`). `supervised` (cross-entropy on the labels) is the reference row. The random-initialised encoder of each distinct architecture is
evaluated the same way (BN statistics measured on train): the baseline every
method must beat. Step decays of the "step" schedule are rescaled to the budget
(the paper's 30/60/80 % of the run).

Each phase is resumable: a method whose workdir already holds its final
checkpoint is not retrained, and an evaluation already written is not rerun.
Writes benchmarks/results/quality.json and prints a Markdown table (stages as
columns) that RESULTS.md copies.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_METHODS = flags.DEFINE_list("methods", ["rotnet", "jigsaw", "pirl", "npid", "moco", "simclr",
                                         "supervised"], "Methods (configs/<name>.py).")
_EPOCHS = flags.DEFINE_float("epochs", 1.0, "Pretraining epochs, the same for every method.")
_ROOT = flags.DEFINE_string("root", os.path.join(ROOT, "runs", "quality"), "Workdirs' parent.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir; default TFDS's.")
_PHASE = flags.DEFINE_enum("phase", "all", ["all", "train", "eval"], "What to run.")
_EVALS = flags.DEFINE_list("evals", ["linear", "knn", "mlp"], "Evaluators.")
_REEVAL = flags.DEFINE_list("reeval", [], "Evaluators to run again even where their results "
                            "exist (after a change of protocol; the features are cached).")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "results", "quality.json"),
                           "Results file.")


def _train(method: str, workdir: str, epochs: float, data_dir: str | None) -> float:
    """Pretrains one method (a subprocess: its own JAX runtime and log) -> seconds."""
    cmd = [sys.executable, "-m", "ssl_jax.train",
           "--config", f"configs/{method}.py:dataset=fashion_mnist", "--workdir", workdir,
           f"--config.total_epochs={epochs}"]
    if method == "rotnet":  # its step decays are absolute epochs: keep them at 30/60/80 %
        cmd.append("--config.optimizer.decay_epochs="
                   f"({0.3 * epochs},{0.6 * epochs},{0.8 * epochs})")
    if data_dir:
        cmd.append(f"--config.data_dir={data_dir}")
    t0 = time.time()
    with open(os.path.join(workdir, "train.out"), "a") as log:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.time() - t0


def _done_training(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, "train_done.json"))


def _arch_key(workdir: str) -> str:
    """Runs whose encoder and eval view agree share one random-init baseline."""
    with open(os.path.join(workdir, "config.json")) as f:
        c = json.load(f)
    return json.dumps({"model": c["model"], "crop": c["aug"]["crop_size"],
                       "mean": c["aug"]["mean"], "std": c["aug"]["std"]}, sort_keys=True)


def _protocol(evals) -> dict:
    """--config.eval.* overrides that put every run on today's evaluator settings
    (ssl_jax.eval.defaults), whatever version stored its config: one protocol per table."""
    from ssl_jax import eval as eval_lib

    def flat(prefix, d):
        for k, v in d.items():
            yield from flat(f"{prefix}.{k}", v) if isinstance(v, dict) else [(f"{prefix}.{k}", v)]
    defaults = eval_lib.defaults().to_dict()
    return {k: v for e in evals for k, v in flat(f"eval.{e}", defaults[e])}


def _evaluate(workdir: str, evals, random_init: bool) -> dict:
    from ssl_jax import evaluation  # here: the training subprocesses need no JAX in this one
    suffix = "_random_init" if random_init else ""
    todo = [e for e in evals if e in _REEVAL.value
            or not os.path.exists(os.path.join(workdir, f"eval_{e}{suffix}.json"))]
    if todo:
        evaluation.evaluate(workdir, tuple(todo), stages="all", random_init=random_init,
                          overrides=_protocol(todo))
    out = {}
    for e in evals:
        with open(os.path.join(workdir, f"eval_{e}{suffix}.json")) as f:
            r = json.load(f)
        out[e] = {s: round(v["top1"], 2) for s, v in r["stages"].items()}
    return out


def _table(results: dict, evals) -> str:
    stages = sorted({s for r in results.values() for e in evals for s in r["eval"].get(e, {})})
    lines = ["| method | eval | " + " | ".join(stages) + " | train min |",
             "|---|---|" + "---:|" * (len(stages) + 1)]
    for name, r in results.items():
        for e in evals:
            row = r["eval"].get(e, {})
            cells = [f"{row[s]:.2f}" if s in row else "" for s in stages]
            minutes = f"{r['train_s'] / 60:.1f}" if r.get("train_s") else ""
            lines.append(f"| {name} | {e} | " + " | ".join(cells) + f" | {minutes} |")
    return "\n".join(lines)


def main(argv):
    del argv
    os.makedirs(_ROOT.value, exist_ok=True)
    results = {}
    if os.path.exists(_OUT.value):
        with open(_OUT.value) as f:
            results = json.load(f).get("results", {})
    workdirs = {m: os.path.join(_ROOT.value, m) for m in _METHODS.value}
    if _PHASE.value in ("all", "train"):
        for m, wd in workdirs.items():
            os.makedirs(wd, exist_ok=True)
            if _done_training(wd):
                continue
            print(f"== train {m} ({_EPOCHS.value} epochs) -> {wd}", flush=True)
            seconds = _train(m, wd, _EPOCHS.value, _DATA_DIR.value)
            with open(os.path.join(wd, "train_done.json"), "w") as f:
                json.dump({"seconds": round(seconds, 1), "epochs": _EPOCHS.value}, f)
            print(f"   {seconds / 60:.1f} min", flush=True)
    if _PHASE.value in ("all", "eval"):
        baselines = {}
        for m, wd in workdirs.items():
            if not _done_training(wd):
                print(f"== {m}: not trained, skipped", flush=True)
                continue
            with open(os.path.join(wd, "train_done.json")) as f:
                train_s = json.load(f)["seconds"]
            print(f"== evaluate {m}", flush=True)
            results[m] = {"epochs": _EPOCHS.value, "train_s": train_s,
                          "eval": _evaluate(wd, _EVALS.value, False)}
            baselines.setdefault(_arch_key(wd), (m, wd))
        for i, (m, wd) in enumerate(baselines.values()):
            name = "random init" + (f" ({m}'s encoder)" if len(baselines) > 1 else "")
            print(f"== evaluate {name}", flush=True)
            results[name] = {"epochs": 0.0, "train_s": 0.0,
                             "eval": _evaluate(wd, _EVALS.value, True)}
        os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "epochs": _EPOCHS.value,
                       "results": results}, f, indent=2)
        print(_table(results, _EVALS.value))


if __name__ == "__main__":
    app.run(main)
