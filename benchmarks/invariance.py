r"""Which invariances each method's representation has (Purushwalkam & Gupta 2020):
the invariance score of every encoder of benchmarks/quality.py, on the
transformation sets made from Fashion-MNIST's test split.

    python -m ssl_jax.prepare --dataset invariance_sets --source fashion_mnist
    python benchmarks/invariance.py [--root runs/quality] [--methods ...]
                                    [--per_stage simclr,supervised]

For each method's workdir under --root (trained by benchmarks/quality.py):
`python -m ssl_jax.evaluate --workdir W --eval invariance` on the final stage
(all stages for --per_stage), and the same encoder at random init
(--random_init; a baseline the paper does not show). Writes
benchmarks/results/invariance.json and prints the Markdown tables RESULTS.md
copies: one row per encoder, a column per transformation x K.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("occlusion", "viewpoint", "illumination", "instance")

_ROOT = flags.DEFINE_string("root", os.path.join(ROOT, "runs", "quality"), "Workdirs' parent.")
_METHODS = flags.DEFINE_list("methods", ["supervised", "simclr", "moco", "pirl", "npid",
                                         "rotnet", "jigsaw"], "Workdirs under --root.")
_PER_STAGE = flags.DEFINE_list("per_stage", ["simclr", "supervised"],
                               "Methods scored at every stage too.")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "results",
                                               "invariance.json"), "Results file.")


def _evaluate(workdir: str, random_init: bool, stages: str) -> dict:
    """Runs the invariance evaluator (a subprocess) -> {stage: {split: {K: score}}}."""
    cmd = [sys.executable, "-m", "ssl_jax.evaluate", "--workdir", workdir,
           "--eval", "invariance", "--stages", stages] + (["--random_init"] if random_init else [])
    subprocess.run(cmd, cwd=ROOT, check=True)
    name = "eval_invariance" + ("_random_init" if random_init else "") + ".json"
    with open(os.path.join(workdir, name)) as f:
        record = json.load(f)
    return {stage: v["scores"] for stage, v in record["stages"].items()}


def _table(rows: dict[str, dict], ks=("10", "25")) -> str:
    """{row label: {split: {K: score}}} -> Markdown, a column per split x K."""
    head = [f"{s} K={k}" for s in SPLITS for k in ks]
    lines = ["| encoder | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for label, scores in rows.items():
        cells = [f"{scores[s][k]:.2f}" if s in scores else "–" for s in SPLITS for k in ks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    results = {}
    for method in _METHODS.value:
        workdir = os.path.join(_ROOT.value, method)
        stages = "all" if method in _PER_STAGE.value else "final"
        results[method] = _evaluate(workdir, False, stages)
        results[f"{method} (random init)"] = _evaluate(workdir, True, stages)
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=2)
    final = {label: per_stage[list(per_stage)[-1]] for label, per_stage in results.items()}
    print("Final stage:\n" + _table(final))
    for method in _PER_STAGE.value:
        for label in (method, f"{method} (random init)"):
            print(f"\n{label}, per stage:\n" + _table(results[label]))
    print(f"\nWrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
