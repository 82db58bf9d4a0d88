"""Optimisers and learning-rate schedules from the config.

config.optimizer fields: name (sgd | lars | adamw), lr (base rate), lr_batch_scale
(lr is multiplied by batch_size / lr_batch_scale, the linear scaling rule of
SimCLR and MoCo; 0 turns it off), momentum, nesterov, weight_decay (and what it
applies to: decay_bn, decay_bias), b1, b2,
warmup (in steps, already converted) and schedule (cosine | constant | step);
"step" multiplies the rate by decay_factor at each of the decay boundaries
(optimizer.decay_steps / decay_epochs / decay_examples, converted to steps by
the caller), as RotNet's, Jigsaw's (Goyal et al. 2019) and NPID's reference code do.

Which arrays weight decay (and LARS's trust ratio) applies to is each method's
choice, as its reference code makes it: kernels always; BatchNorm's scale and
bias when optimizer.decay_bn; other biases when optimizer.decay_bias. The
PyTorch references of MoCo, NPID and RotNet decay every parameter
(SGD(model.parameters(), weight_decay=...)); SimCLR's LARS excludes BN and bias
from both decay and adaptation; VISSL's PIRL excludes both, its Jigsaw only BN
(RECIPES.md cites each).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from ssl_jax.errors import UserError

OPTIMIZERS = ("sgd", "lars", "adamw")


def decay_mask(params, decay_bn: bool = False, decay_bias: bool = False):
    """-> a tree of bools shaped like params: the arrays weight decay applies to.

    Arrays of >= 2 dims (Dense and conv kernels) always; those of a norm layer (a
    dict holding a "scale": BatchNorm's scale and bias) when decay_bn; any other
    1-d array (a Dense or conv bias) when decay_bias.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [tuple(getattr(k, "key", k) for k in path) for path, _ in leaves]
    norms = {path[:-1] for path in paths if path[-1] == "scale"}

    def decayed(path, p):
        if p.ndim > 1:
            return True
        return decay_bn if path[:-1] in norms else decay_bias
    return jax.tree_util.tree_unflatten(treedef, [decayed(path, p) for path, (_, p)
                                                  in zip(paths, leaves)])


def learning_rate(opt_cfg, batch_size: int, total_steps: int, warmup_steps: int,
                  decay_steps: tuple[int, ...] = ()):
    """-> step -> learning rate. decay_steps: the "step" schedule's boundaries, in steps."""
    peak = opt_cfg.lr * (batch_size / opt_cfg.lr_batch_scale if opt_cfg.lr_batch_scale else 1.0)
    if decay_steps and opt_cfg.schedule != "step":
        raise UserError(f"config.optimizer.decay_* is set but schedule={opt_cfg.schedule!r}: "
                         "use schedule='step', or unset the decay boundaries.")
    if opt_cfg.schedule in ("constant", "step"):
        constant = optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup_steps, 1)), optax.constant_schedule(peak)],
            [warmup_steps])
        if opt_cfg.schedule == "constant":
            return constant
        if not decay_steps:
            raise UserError("schedule='step' needs config.optimizer.decay_steps, decay_epochs "
                             "or decay_examples, e.g. decay_epochs=(30, 60, 80).")
        bounds, factor = jnp.asarray(sorted(decay_steps)), opt_cfg.decay_factor
        # At step b the rate is already decayed (PyTorch MultiStepLR: epoch 30 runs at
        # the new rate). Counting passed boundaries, unlike a dict of boundaries,
        # keeps two that round to the same step in a short run.
        return lambda step: constant(step) * factor ** jnp.sum(step >= bounds)
    if opt_cfg.schedule != "cosine":
        raise UserError(f"config.optimizer.schedule={opt_cfg.schedule!r}: "
                         "use 'cosine', 'constant' or 'step'.")
    # optax decays over decay_steps - warmup_steps, which must be positive: a 1-step
    # run (or one with no warm-up) still gets a 1-step warm-up and a 1-step decay.
    warmup = max(warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=0.0)


def make_optimizer(opt_cfg, lr_schedule) -> optax.GradientTransformation:
    name = opt_cfg.name
    # .get: a config stored before the fields existed decayed neither (the old rule).
    mask = functools.partial(decay_mask, decay_bn=opt_cfg.get("decay_bn", False),
                             decay_bias=opt_cfg.get("decay_bias", False))
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(opt_cfg.weight_decay, mask=mask),
            optax.sgd(lr_schedule, momentum=opt_cfg.momentum, nesterov=opt_cfg.nesterov))
    if name == "lars":
        return optax.lars(lr_schedule, weight_decay=opt_cfg.weight_decay,
                          weight_decay_mask=mask, trust_ratio_mask=mask,
                          momentum=opt_cfg.momentum, nesterov=opt_cfg.nesterov)
    if name == "adamw":
        return optax.adamw(lr_schedule, b1=opt_cfg.b1, b2=opt_cfg.b2,
                           weight_decay=opt_cfg.weight_decay, mask=mask)
    raise UserError(f"config.optimizer.name={name!r} is not one of {OPTIMIZERS}.")
