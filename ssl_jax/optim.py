"""Optimisers and learning-rate schedules from the config.

config.optimizer fields: name (sgd | lars | adamw), lr (base rate), lr_batch_scale
(lr is multiplied by batch_size / lr_batch_scale, the linear scaling rule of
SimCLR and MoCo; 0 turns it off), momentum, nesterov, weight_decay, b1, b2,
warmup (in steps, already converted) and schedule (cosine | constant | step);
"step" multiplies the rate by decay_factor at each of the decay boundaries
(optimizer.decay_steps / decay_epochs / decay_examples, converted to steps by
the caller), as RotNet's, Jigsaw's and NPID's papers do.
Weight decay and LARS adaptation skip BN parameters and biases (every array
with fewer than 2 dimensions), as all the papers do.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ssl_jax.errors import UserError

OPTIMIZERS = ("sgd", "lars", "adamw")


def decay_mask(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


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
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps=max(warmup_steps, 1),
        decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)


def make_optimizer(opt_cfg, lr_schedule) -> optax.GradientTransformation:
    name = opt_cfg.name
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(opt_cfg.weight_decay, mask=decay_mask),
            optax.sgd(lr_schedule, momentum=opt_cfg.momentum, nesterov=opt_cfg.nesterov))
    if name == "lars":
        return optax.lars(lr_schedule, weight_decay=opt_cfg.weight_decay,
                          weight_decay_mask=decay_mask, trust_ratio_mask=decay_mask,
                          momentum=opt_cfg.momentum, nesterov=opt_cfg.nesterov)
    if name == "adamw":
        return optax.adamw(lr_schedule, b1=opt_cfg.b1, b2=opt_cfg.b2,
                           weight_decay=opt_cfg.weight_decay, mask=decay_mask)
    raise UserError(f"config.optimizer.name={name!r} is not one of {OPTIMIZERS}.")
