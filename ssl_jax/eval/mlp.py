"""Non-linear probe on frozen features: the RotNet paper's classifier (Gidaris et al. 2018).

Three fully-connected layers, `D -> H -> H -> C` with H hidden units
(config.eval.mlp.hidden: 200 for the 10-class presets, 2048 for ImageNet's 1000,
the reference's min(20 x classes, 2048); RECIPES.md),
each hidden layer followed by batch normalisation and ReLU, as the paper's
non-linear classifier on frozen conv-block features (its CIFAR-10 table
reports this probe next to the linear one). Our conv-block features arrive
globally average-pooled (eval/features.py), so the first layer sees (N, D).

Training is eval/linear.py's (eval/probe.py): standardised inputs, minibatch
SGD with Nesterov momentum and a cosine schedule, an L2 penalty on the weight
matrices (not biases, not BN), one jitted `lax.scan` per epoch over a
permutation keyed by `fold_in(key, epoch)`: a deterministic function of inputs
and seed.
BN uses batch statistics in training and running averages (momentum 0.9) at test.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_jax.errors import UserError
from ssl_jax.eval import probe
from ssl_jax.eval.probe import check_inputs, standardizer

BN_MOMENTUM, BN_EPS = 0.9, 1e-5


def init(key: jax.Array, dim: int, hidden: int, num_classes: int) -> tuple[dict, dict]:
    """-> (params, batch_stats) for D=dim -> hidden -> hidden -> num_classes.

    Weights He-normal (ReLU follows), biases zero, BN scale 1 and shift 0.
    """
    sizes = [dim, hidden, hidden, num_classes]
    keys = jax.random.split(key, 3)
    params = {f"w{i}": jax.random.normal(keys[i], (sizes[i], sizes[i + 1])) *
              jnp.sqrt(2.0 / sizes[i]) for i in range(3)}
    params.update({f"b{i}": jnp.zeros(sizes[i + 1]) for i in range(3)})
    params.update({f"scale{i}": jnp.ones(hidden) for i in range(2)})
    params.update({f"shift{i}": jnp.zeros(hidden) for i in range(2)})
    stats = {f"{s}{i}": (jnp.zeros if s == "mean" else jnp.ones)(hidden)
             for i in range(2) for s in ("mean", "var")}
    return params, stats


def apply(params: dict, stats: dict, x: jax.Array, train: bool) -> tuple[jax.Array, dict]:
    """x: (B, D) standardised -> (logits (B, C), new batch_stats; unchanged unless train)."""
    new = dict(stats)
    for i in range(2):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if train:
            mean, var = jnp.mean(x, 0), jnp.var(x, 0)
            new[f"mean{i}"] = BN_MOMENTUM * stats[f"mean{i}"] + (1 - BN_MOMENTUM) * mean
            new[f"var{i}"] = BN_MOMENTUM * stats[f"var{i}"] + (1 - BN_MOMENTUM) * var
        else:
            mean, var = stats[f"mean{i}"], stats[f"var{i}"]
        x = (x - mean) * jax.lax.rsqrt(var + BN_EPS) * params[f"scale{i}"] + params[f"shift{i}"]
        x = jax.nn.relu(x)
    return x @ params["w2"] + params["b2"], new


def _loss(params, stats, batch, wd):
    """-> (mean cross-entropy + 0.5 * wd * |W|^2 of batch (x (B, D), y (B,)), new batch_stats)."""
    x, y = batch
    logits, new_stats = apply(params, stats, x, train=True)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    l2 = 0.5 * wd * sum(jnp.sum(jnp.square(params[f"w{i}"])) for i in range(3))
    return ce + l2, new_stats


def _eval_logits(model, x):
    """model: (params, batch_stats); x: (N, D) standardised -> (N, C), BN in eval mode."""
    return apply(*model, x, train=False)[0]


def train_mlp_probe(train_x, train_y, test_x, test_y, *, num_classes: int, hidden: int = 200,
                    epochs: int = 30, batch_size: int = 256, lr: float = 0.1,
                    weight_decay: float = 5e-4, seed: int = 0) -> dict:
    """Fits the 3-layer BN-MLP on frozen train features and scores it on test.

    train_x: (N, D), train_y: (N,) int in [0, num_classes); test_x: (M, D), test_y: (M,).
    Returns {"top1", "top5": test accuracy in percent, "train_top1"}.
    Raises ValueError on malformed input (linear.check_inputs) or settings.
    """
    train_x, train_y, test_x, test_y = check_inputs(train_x, train_y, test_x, test_y, num_classes)
    if epochs < 1 or batch_size < 2 or hidden < 1 or not lr > 0 or not weight_decay >= 0:
        raise UserError(f"need epochs >= 1, batch_size >= 2 (BN needs a batch), hidden >= 1, "
                         f"lr > 0, weight_decay >= 0; got {epochs}, {batch_size}, {hidden}, "
                         f"{lr}, {weight_decay}.")
    x = jnp.asarray(train_x, jnp.float32)
    mean, inv_std = jax.jit(standardizer)(x)
    x = (x - mean) * inv_std
    xte = (jnp.asarray(test_x, jnp.float32) - mean) * inv_std
    init_key, key = jax.random.split(jax.random.key(seed))
    params, stats = init(init_key, x.shape[1], hidden, num_classes)
    y, wd = jnp.asarray(train_y), jnp.float32(weight_decay)
    model = probe.train(_loss, params, stats, [(x, y)], wd, key, epochs=epochs,
                        batch_size=batch_size, lr=lr)
    test_acc = probe.accuracy(_eval_logits, model, np.asarray(xte), test_y)
    return {"top1": float(test_acc[0]), "top5": float(test_acc[1]),
            "train_top1": float(probe.accuracy(_eval_logits, model, np.asarray(x), train_y)[0])}


def evaluate(inputs, settings: dict) -> dict[str, dict]:
    """The "mlp" evaluator (eval/evaluators.py): inputs an evaluators.Inputs,
    settings config.eval.mlp. -> {stage: {"top1", "top5"}}, one probe per stage."""
    out = {}
    for n in inputs.train:
        r = train_mlp_probe(inputs.train[n], inputs.train_y, inputs.test[n], inputs.test_y,
                            num_classes=inputs.num_classes, seed=inputs.seed, **settings)
        out[n] = {"top1": float(r["top1"]), "top5": float(r["top5"])}
    return out
