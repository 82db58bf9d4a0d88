"""The training core of the offline probes (linear.py, mlp.py; lowshot.py through
linear.py), and the input checks every offline evaluator shares.

A probe is any parameter pytree with a loss: minibatch SGD with Nesterov
momentum and a cosine schedule; one jitted call runs a whole epoch as a
`lax.scan` over minibatches of a permutation keyed by `fold_in(key, epoch)`,
so a probe is a deterministic function of its inputs and key. The loss and
logits functions are static arguments of the jitted functions and defined at
module level by their users: probes of the same shapes (repeated evaluations)
reuse one compiled epoch instead of compiling a fresh closure each.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

# loss(params, state, batch, consts) -> (scalar loss, new state): `batch` the
# minibatch's rows of every array of `rows`, `state` what training carries
# besides the parameters (the MLP's BN statistics; None for the linear probe).
LossFn = Callable[..., tuple[jax.Array, object]]


def standardizer(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: (N, D) -> (mean (D,), inv_std (D,)); features constant on x get inv_std 0.

    The threshold is relative to the largest std so that scaling all features
    by a constant does not change which ones count as constant.
    """
    mean = jnp.mean(x, axis=0)
    std = jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=0))  # two-pass: stable in float32
    alive = std > 1e-6 * jnp.max(std)
    return mean, jnp.where(alive, 1.0 / jnp.where(alive, std, 1.0), 0.0)


def _check_split(x: np.ndarray, y: np.ndarray, num_classes: int, name: str) -> None:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{name} features must be (N, D) and labels (N,) with N = len(labels); "
                         f"got features {x.shape} and labels {y.shape}.")
    if not len(x):
        raise ValueError(f"{name} split is empty.")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise ValueError(f"{name} features must be numeric; got dtype {x.dtype}.")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} features contain NaN or Inf (rows "
                         f"{np.flatnonzero(~np.isfinite(x).all(1))[:5].tolist()}...): "
                         "the encoder diverged or the checkpoint is corrupt.")
    # Checked before any cast: float labels would be truncated to int silently.
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} labels must be integers; got dtype {y.dtype}.")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{name} labels must lie in [0, {num_classes}); "
                         f"got [{y.min()}, {y.max()}].")


def check_inputs(train_x, train_y, test_x, test_y, num_classes: int):
    """Validates a train/test pair of features and labels; raises ValueError naming the problem.

    Returns (train_x (N, D), train_y (N,) int32, test_x (M, D), test_y (M,) int32) as numpy.
    Shared by the offline evaluators so that they reject the same inputs the same way.
    """
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    _check_split(train_x, train_y, num_classes, "train")
    _check_split(test_x, test_y, num_classes, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train and test features differ in width: {train_x.shape[1]} vs "
                         f"{test_x.shape[1]}.")
    return train_x, train_y.astype(np.int32), test_x, test_y.astype(np.int32)


def optimizer(lr: float, total_steps: int) -> optax.GradientTransformation:
    return optax.sgd(optax.cosine_decay_schedule(lr, total_steps), momentum=0.9, nesterov=True)


@functools.partial(jax.jit, static_argnames=("loss_fn", "lr", "total_steps", "batch_size"))
def _epoch(params, state, opt_state, key, rows, consts, *, loss_fn: LossFn, lr: float,
           total_steps: int, batch_size: int):
    """One epoch over a permutation of the N rows of every array of `rows` (a pytree)
    -> new (params, state, opt_state)."""
    tx = optimizer(lr, total_steps)
    n = jax.tree.leaves(rows)[0].shape[0]
    steps = n // batch_size  # the N % batch_size rows left out differ from epoch to epoch
    order = jax.random.permutation(key, n)[:steps * batch_size]

    def step(carry, idx):
        params, state, opt_state = carry
        batch = jax.tree.map(lambda a: a[idx], rows)
        grads, state = jax.grad(loss_fn, has_aux=True)(params, state, batch, consts)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), state, opt_state), None

    return jax.lax.scan(step, (params, state, opt_state), order.reshape(steps, batch_size))[0]


def train(loss_fn: LossFn, params, state, views: Sequence, consts, key: jax.Array, *,
          epochs: int, batch_size: int, lr: float):
    """Trains params (and the state the loss carries) for `epochs` epochs from key:
    epoch e on the rows of views[e % len(views)] (each a pytree of device arrays,
    every leaf with the same N rows; one view: plain training), permuted by
    fold_in(key, e), in minibatches of min(batch_size, N). consts: the loss's
    further inputs, the same for every minibatch (e.g. weight decays).
    Returns (params, state)."""
    n = jax.tree.leaves(views[0])[0].shape[0]
    bs = min(batch_size, n)
    hyper = dict(lr=float(lr), total_steps=max(epochs * (n // bs), 1), batch_size=bs)
    opt_state = optimizer(hyper["lr"], hyper["total_steps"]).init(params)
    for e in range(epochs):
        params, state, opt_state = _epoch(params, state, opt_state, jax.random.fold_in(key, e),
                                          views[e % len(views)], consts, loss_fn=loss_fn, **hyper)
    return params, state


@functools.partial(jax.jit, static_argnames="logits_fn")
def _topk_correct(model, x, y, *, logits_fn):
    """-> (..., 2) int32: the number of rows of x (N, D) correct at top-1 and top-5,
    per probe of the logits' leading axes (logits_fn(model, x): (..., N, C))."""
    logits = logits_fn(model, x)
    _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))  # (..., N, k)
    hit = top == y[:, None]
    return jnp.stack([jnp.sum(hit[..., 0], axis=-1), jnp.sum(jnp.any(hit, axis=-1), axis=-1)],
                     -1)


def accuracy(logits_fn, model, x: np.ndarray, y: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """-> (..., 2) float: top-1 and top-5 accuracy in percent of x (N, D), y (N,),
    scored in chunks of rows, per probe of logits_fn(model, x): (..., N, C)."""
    correct = sum(np.asarray(_topk_correct(model, jnp.asarray(x[i:i + chunk], jnp.float32),
                                           jnp.asarray(y[i:i + chunk], jnp.int32),
                                           logits_fn=logits_fn), np.int64)
                  for i in range(0, len(x), chunk))
    return 100.0 * correct / len(x)
