"""Offline linear probe: multinomial logistic regression on frozen features.

Features are standardised with the train split's mean and standard deviation
first: pooled features of different stages and methods differ in scale by
orders of magnitude, and standardising lets one learning rate fit them all
(and makes the probe invariant to a feature's scale).

Training (eval/probe.py, shared with the MLP probe) is minibatch SGD with
Nesterov momentum and a cosine schedule from zero weights, on the mean
cross-entropy plus an L2 penalty on the weights (`0.5 * wd * |W|^2`, the bias
is not decayed). One jitted call runs a whole epoch as a `lax.scan` over
minibatches of a per-epoch permutation; the permutation keys come from
`fold_in(key(seed), epoch)`, so a probe is a deterministic function of its
inputs and seed. Every requested stage's probe
trains in the same run on the same minibatches (VISSL's evaluation of all
layers at once): one epoch loop, one compile, the same answers as one run per
stage. The record carries the objective reached, to compare with a converged
solver's: the defaults (30 epochs, batch 256, lr 0.3) end within 0.2% of the
L-BFGS optimum on the demo's 256-d features; batch 1024 / lr 0.1 stopped 5%
above it, 0.6 points of test top-1 lower. On 2 CPU cores a 60000 x 256 probe
with the default sweep takes ~11 s.

Weight-decay sweep (the default, WEIGHT_DECAYS): every value is trained at
once (the weights carry a leading sweep axis, the features are shared), on a
random 90% of train, scored on the other 10%, and each stage's best value is
then retrained on all of train. The test split is never looked at until the
end. Fashion-MNIST raw pixels (784-d) pick wd 1e-3 and reach 84.7% test top-1,
what a tuned logistic regression reaches (84.1%).

Optional light augmentation: `train_views`, features of augmented copies of
the train split (features.light_augment), one per epoch in turn; the centre
view still sets the standardisation and scores the sweep.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_jax.errors import UserError
from ssl_jax.eval import probe
from ssl_jax.eval.probe import check_inputs, standardizer  # noqa: F401  (evaluators use them)

VAL_FRACTION = 0.1  # held out of train for the weight-decay sweep
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)  # the default sweep


def _logits(params, x):
    """x: (B, D) -> (S, B, C) logits of each of the S probes of a sweep."""
    return jnp.einsum("bd,sdc->sbc", x, params["w"]) + params["b"][:, None, :]


def _objective(params, x, y, wds):
    """(S,): each probe's mean cross-entropy + 0.5 * wd * |W|^2 on x (B, D), y (B,) int32,
    wds (S,): the convex objective the probe minimises."""
    logits = _logits(params, x)
    # Labels broadcast explicitly: optax does not promise to broadcast (1, B) against (S, B, C).
    ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         jnp.broadcast_to(y, logits.shape[:2]))
    return jnp.mean(ce, axis=1) + 0.5 * wds * jnp.sum(jnp.square(params["w"]), axis=(1, 2))


def _loss(params, state, batch, wds):
    """Sum of every stage's and every sweep value's objective, and the (absent) state.
    params, wds: {stage: probe params}, {stage: (S,)}; batch: ({stage: (B, D_stage)}, y (B,))."""
    xs, y = batch
    # The probes share no parameters, so the sum's gradient is each probe's own.
    return sum(jnp.sum(_objective(params[k], xs[k], y, wds[k])) for k in params), state


@jax.jit
def _standardize(x, mean, inv_std):
    return (x.astype(jnp.float32) - mean) * inv_std


def _fit(xs: dict[str, np.ndarray], y: np.ndarray, wds: dict[str, Sequence[float]], *,
         num_classes: int, epochs: int, batch_size: int, lr: float, seed: int,
         standardize: bool, views: Sequence[dict[str, np.ndarray]] = ()) -> dict:
    """Trains every stage's probes at once, one per weight decay of wds[stage], on
    xs {stage: (N, D)}, y (N,) -- or, when `views` (augmented copies of xs, row
    for row) are given, epoch e on views[e % len(views)]; xs then still sets the
    standardisation, as test features look like them.

    Returns {stage: {"w": (S, D, C), "b": (S, C), "mean": (D,), "inv_std": (D,)}} as jax
    arrays; a probe's input is (x - mean) * inv_std.
    """
    params, norm = {}, {}
    xs = {k: jnp.asarray(x, jnp.float32) for k, x in xs.items()}  # one host-to-device copy
    for k, x in xs.items():
        d = x.shape[1]
        norm[k] = (jax.jit(standardizer)(x) if standardize else (jnp.zeros(d), jnp.ones(d)))
        params[k] = {"w": jnp.zeros((len(wds[k]), d, num_classes)),
                     "b": jnp.zeros((len(wds[k]), num_classes))}
    sources = list(views) or [xs]
    # One device copy per view, standardised once (not once per epoch).
    yj = jnp.asarray(y, jnp.int32)
    sources = [({k: _standardize(v[k], *norm[k]) for k in xs}, yj) for v in sources]
    wdj = {k: jnp.asarray(w, jnp.float32) for k, w in wds.items()}
    params, _ = probe.train(_loss, params, None, sources, wdj, jax.random.key(seed),
                            epochs=epochs, batch_size=batch_size, lr=lr)
    return {k: dict(params[k], mean=norm[k][0], inv_std=norm[k][1]) for k in xs}


def _scored_logits(params, x):
    """x: (N, D) raw features -> (S, N, C): params carry the standardisation."""
    return _logits(params, (x - params["mean"]) * params["inv_std"])


def accuracy(params, x: np.ndarray, y: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """-> (S, 2) float: top-1 and top-5 accuracy in percent of each probe of `params`."""
    return probe.accuracy(_scored_logits, params, x, y, chunk)


@jax.jit
def _objective_of(params, x, y, wds):
    return _objective(params, _standardize(x, params["mean"], params["inv_std"]), y, wds)


def _check_views(views, train_x: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Augmented train views must match the centre view's stages and shapes, row for row."""
    views = [{k: np.asarray(v[k]) if k in v else None for k in train_x} for v in views]
    for i, v in enumerate(views):
        for k, x in v.items():
            if x is None or x.shape != train_x[k].shape:
                raise ValueError(f"train_views[{i}][{k!r}] must have the train features' shape "
                                 f"{train_x[k].shape}; got {None if x is None else x.shape}.")
            if not np.isfinite(x).all():
                raise ValueError(f"train_views[{i}][{k!r}] contains NaN or Inf.")
    return views


def train_linear_probes(train_feats: dict[str, np.ndarray], train_y: np.ndarray,
                        test_feats: dict[str, np.ndarray], test_y: np.ndarray, *,
                        num_classes: int, epochs: int = 30, batch_size: int = 256,
                        lr: float = 0.3,
                        weight_decay: float | Sequence[float] = WEIGHT_DECAYS,
                        seed: int = 0, standardize: bool = True,
                        train_views: Sequence[dict[str, np.ndarray]] = ()) -> dict[str, dict]:
    """Fits a linear classifier on each stage's frozen train features and scores it on test.

    All stages' probes train together in one run, on the same minibatches
    (VISSL's evaluation of every layer at once); each is what a probe of its
    stage alone would be.
    train_feats: {stage: (N, D_stage)} float, train_y: (N,) int in [0, num_classes);
    test_feats: {stage: (M, D_stage)}, test_y: (M,).
    weight_decay: one value, or a sequence; each stage picks its own on a held-out 10% of train.
    train_views: augmented copies of train_feats ({stage: (N, D_stage)}, the same rows):
    epoch e then fits on train_views[e % len(train_views)]; train_feats (the centre view)
    still set the standardisation, the held-out scores and train_top1.
    Returns {stage: {"top1", "top5": test accuracy in percent, "train_top1", "objective": the
    regularised train loss reached (compare with a converged solver's), "weight_decay": the
    value used, "sweep": {wd: held-out top-1} (only when sweeping over > 1 value), "params":
    {"w": (D, C), "b": (C,), "mean": (D,), "inv_std": (D,)} numpy; logits =
    ((x - mean) * inv_std) @ w + b}}.
    """
    if not train_feats:
        raise ValueError("train_feats is empty: no stage to probe.")
    missing = sorted(set(train_feats) ^ set(test_feats))
    if missing:
        raise ValueError(f"stages {missing} are in only one of train_feats and test_feats.")
    checked = {k: check_inputs(train_feats[k], train_y, test_feats[k], test_y, num_classes)
               for k in train_feats}
    xtr, xte = {k: c[0] for k, c in checked.items()}, {k: c[2] for k, c in checked.items()}
    ytr, yte = next(iter(checked.values()))[1], next(iter(checked.values()))[3]
    views = _check_views(train_views, xtr)
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise UserError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, "
                         f"{batch_size}, {lr}.")
    wds = [float(w) for w in np.atleast_1d(weight_decay)]
    if not wds or not all(np.isfinite(w) and w >= 0 for w in wds):
        raise UserError(f"weight_decay must be >= 0 (or a non-empty sequence of such); "
                         f"got {weight_decay!r}.")
    fit = dict(num_classes=num_classes, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
               standardize=standardize)
    best, sweep = {k: wds[0] for k in xtr}, {}
    if len(wds) > 1:
        if len(ytr) < 2:
            raise ValueError("a weight-decay sweep needs >= 2 train examples to hold one out.")
        order = np.random.default_rng(seed).permutation(len(ytr))
        n_val = max(1, int(round(VAL_FRACTION * len(ytr))))
        val, rows = np.sort(order[:n_val]), np.sort(order[n_val:])
        params = _fit({k: x[rows] for k, x in xtr.items()}, ytr[rows], {k: wds for k in xtr},
                      views=[{k: x[rows] for k, x in v.items()} for v in views], **fit)
        for k in xtr:
            val_top1 = accuracy(params[k], xtr[k][val], ytr[val])[:, 0]
            sweep[k] = {wd: float(a) for wd, a in zip(wds, val_top1)}
            best[k] = wds[int(np.argmax(val_top1))]  # ties go to the first listed
    params = _fit(xtr, ytr, {k: [best[k]] for k in xtr}, views=views, **fit)
    out = {}
    for k, p in params.items():
        test_acc = accuracy(p, xte[k], yte)[0]
        objective = _objective_of(p, jnp.asarray(xtr[k]), jnp.asarray(ytr), jnp.asarray([best[k]]))
        out[k] = dict(top1=float(test_acc[0]), top5=float(test_acc[1]),
                      train_top1=float(accuracy(p, xtr[k], ytr)[0, 0]),
                      objective=float(objective[0]), weight_decay=best[k],
                      params={n: np.asarray(p[n][0] if n in ("w", "b") else p[n])
                              for n in ("w", "b", "mean", "inv_std")})
        if k in sweep:
            out[k]["sweep"] = sweep[k]
    return out


def train_linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                       test_y: np.ndarray, *, train_views: Sequence[np.ndarray] = (),
                       **kwargs) -> dict:
    """train_linear_probes for one set of features: train_x (N, D), test_x (M, D),
    train_views: augmented copies of train_x, (N, D) each. Returns that stage's record."""
    return train_linear_probes({"x": train_x}, train_y, {"x": test_x}, test_y,
                               train_views=[{"x": v} for v in train_views], **kwargs)["x"]


def evaluate(inputs, settings: dict) -> dict[str, dict]:
    """The "linear" evaluator (eval/evaluators.py): inputs an evaluators.Inputs,
    settings config.eval.linear. Every stage's probe trains in one run, on the
    augmented train views that settings["augment"] asks for (none by default).
    -> {stage: {"top1", "top5", "train_top1", "objective", "weight_decay"}}."""
    settings = dict(settings)
    views = inputs.train_views(settings.pop("augment"))
    out = train_linear_probes(inputs.train, inputs.train_y, inputs.test, inputs.test_y,
                              num_classes=inputs.num_classes, seed=inputs.seed,
                              train_views=views, **settings)
    return {n: {k: r[k] for k in ("top1", "top5", "train_top1", "objective", "weight_decay")}
            for n, r in out.items()}
