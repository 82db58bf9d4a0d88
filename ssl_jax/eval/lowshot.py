"""Low-shot linear classification (Goyal et al. 2019, as PIRL reports it).

For each k in `shots`, and each seed, k labelled training examples per class
are drawn (without replacement, stratified), a linear probe
(eval/linear.py: standardised features, multinomial logistic regression) is
trained on them alone, and scored on the whole test split. Results are mean and
standard deviation over the seeds for each k: the curve of accuracy against
labels per class that tells a representation useful with little supervision
apart from one that needs many labels.

With so few rows a minibatch is the whole draw, and every probe takes the same
number of full-batch steps (`steps`): a fixed number of updates for every k,
not a fixed number of passes, keeps k=1 from being under-trained.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ssl_jax.errors import UserError
from ssl_jax.eval.linear import train_linear_probe
from ssl_jax.eval.probe import check_inputs

SHOTS = (1, 2, 4, 8, 16, 32, 64)


def sample_per_class(labels: np.ndarray, k: int, num_classes: int, seed: int) -> np.ndarray:
    """-> sorted indices of k rows of each class (all of a class's rows if it has fewer)."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        picked.append(rng.choice(rows, size=min(k, len(rows)), replace=False))
    return np.sort(np.concatenate(picked))


def lowshot(train_x, train_y, test_x, test_y, *, num_classes: int,
            shots: Sequence[int] = SHOTS, seeds: Sequence[int] = (0, 1, 2, 3, 4),
            steps: int = 300, lr: float = 0.1, weight_decay: float = 1e-3) -> dict:
    """train_x (N, D), train_y (N,), test_x (M, D), test_y (M,) ->
    {"per_k": {k: {"mean", "std": top-1 percent over seeds, "top1": [per seed]}},
     "top1", "top5": mean top-1 / top-5 at the largest k (what tables show)}."""
    train_x, train_y, test_x, test_y = check_inputs(train_x, train_y, test_x, test_y, num_classes)
    if not shots or min(shots) < 1 or not seeds:
        raise UserError(f"need shots >= 1 and at least one seed; got {shots}, {seeds}.")
    per_k, top5 = {}, {}
    for k in sorted(shots):
        runs = []
        for seed in seeds:
            rows = sample_per_class(train_y, k, num_classes, seed)
            runs.append(train_linear_probe(train_x[rows], train_y[rows], test_x, test_y,
                                           num_classes=num_classes, epochs=steps,
                                           batch_size=len(rows), lr=lr,
                                           weight_decay=weight_decay, seed=seed))
        top1 = [r["top1"] for r in runs]
        per_k[int(k)] = {"mean": float(np.mean(top1)), "std": float(np.std(top1)), "top1": top1}
        top5[int(k)] = float(np.mean([r["top5"] for r in runs]))
    k_max = max(per_k)
    return {"per_k": per_k, "top1": per_k[k_max]["mean"], "top5": top5[k_max]}


def evaluate(inputs, settings: dict) -> dict[str, dict]:
    """The "lowshot" evaluator (eval/evaluators.py): inputs an evaluators.Inputs,
    settings config.eval.lowshot (its own seeds). -> {stage: {"top1", "top5":
    at the largest k, "per_k": {k: {"mean", "std", "top1"}}}}."""
    out = {}
    for n in inputs.train:
        r = lowshot(inputs.train[n], inputs.train_y, inputs.test[n], inputs.test_y,
                    num_classes=inputs.num_classes, **settings)
        out[n] = {"top1": r["top1"], "top5": r["top5"], "per_k": r["per_k"]}
    return out


def curve(stage_record: dict) -> list[str]:
    """A stage's whole low-shot curve, one printed line: "k=1: 31.50±2.25  k=2: ..."."""
    return ["  ".join(f"k={k}: {v['mean']:.2f}±{v['std']:.2f}"
                      for k, v in stage_record["per_k"].items())]
