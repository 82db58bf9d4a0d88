"""Optimisers and learning-rate schedules from the config.

config.optimizer fields: name (sgd | lars | adamw), lr (base rate), lr_batch_scale
(lr is multiplied by batch_size / lr_batch_scale, the linear scaling rule of
SimCLR and MoCo; 0 turns it off), momentum, nesterov, weight_decay (and what it
applies to: decay_bn, decay_bias), b1, b2,
warmup (in steps, already converted) and schedule (cosine | constant | step),
end_lr (where the cosine ends, default 0; DINO's min_lr);
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

DINO's optimiser (Caron et al. 2021, main_dino.py) adds three options, each off unless
set, each usable with any optimizer: weight_decay_end (a per-step cosine of the weight
decay from weight_decay to it: `weight_decay_schedule`), clip_per_tensor (each
parameter tensor's gradient clipped to that L2 norm on its own: `clip_per_tensor`), and
frozen_params with freeze_{steps,epochs,examples} (the parameters under that path, e.g.
"head/last_layer", get no update for that many steps: `make_optimizer`'s freeze_steps).

untrained_params (a path prefix, e.g. "encoder/patch_embed"): parameters that keep their
initial values for the whole run, MoCo v3's frozen random patch projection (Chen, Xie &
He 2021, sec. 4.2; moco-v3 vits.py `--stop-grad-conv1`: requires_grad=False). As there
(a torch optimiser skips a parameter without a gradient): no update, no weight decay, and
no optimizer state (no Adam moments, no momentum). frozen_params with freeze_epochs >= the
run's length would also hold them, but keeps their moments and follows the run's length.
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
        0.0, peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=opt_cfg.get("end_lr", 0.0))


def weight_decay_schedule(opt_cfg, total_steps: int):
    """-> the weight decay: optimizer.weight_decay, or with optimizer.weight_decay_end a
    function of the step, the cosine from weight_decay at step 0 to weight_decay_end at
    total_steps without warm-up (DINO's wd_schedule, utils.cosine_scheduler:
    end + (start - end) (1 + cos(pi t / T)) / 2)."""
    start, end = opt_cfg.weight_decay, opt_cfg.get("weight_decay_end")
    if end is None:
        return start
    t = float(max(total_steps, 1))
    return lambda step: end + 0.5 * (start - end) * (1.0 + jnp.cos(jnp.pi * step / t))


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
    """Each parameter tensor's gradient g scaled by min(1, max_norm / (||g|| + 1e-6)) on
    its own (DINO's utils.clip_gradients), not the global norm of them all."""
    def clip(g):
        scale = max_norm / (jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)))) + 1e-6)
        return (g * jnp.minimum(scale, 1.0)).astype(g.dtype)
    return optax.stateless(lambda updates, params: jax.tree.map(clip, updates))


def _skip_first(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """inner, except that the first `steps` updates are zero and leave inner's state as it
    was (its moments and step count), as a torch optimiser skips a parameter whose
    gradient is None (DINO's cancel_gradients_last_layer)."""
    def init(params):
        return {"inner": inner.init(params), "count": jnp.zeros((), jnp.int32)}

    def update(updates, state, params=None):
        new_updates, new_inner = inner.update(updates, state["inner"], params)
        frozen = state["count"] < steps
        pick = lambda old, new: jnp.where(frozen, old, new)
        new_updates = jax.tree.map(lambda u: jnp.where(frozen, jnp.zeros_like(u), u),
                                   new_updates)
        new_inner = jax.tree.map(pick, state["inner"], new_inner)
        return new_updates, {"inner": new_inner, "count": state["count"] + 1}
    return optax.GradientTransformation(init, update)


def frozen_labels(params, prefix: str, field: str = "frozen_params"):
    """-> a tree shaped like params: "frozen" for arrays under the path `prefix` (e.g.
    "head/last_layer"), "free" for the others. Raises when nothing is under it, naming
    config.optimizer.<field>."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    want = tuple(prefix.strip("/").split("/"))
    names = ["frozen" if tuple(str(getattr(k, "key", k)) for k in path)[:len(want)] == want
             else "free" for path, _ in leaves]
    if "frozen" not in names:
        raise UserError(f"config.optimizer.{field}={prefix!r} names no parameters; the "
                        "top-level ones are " + ", ".join(sorted(params)) + ".")
    return jax.tree_util.tree_unflatten(treedef, names)


def make_optimizer(opt_cfg, lr_schedule, total_steps: int = 0,
                   freeze_steps: int = 0) -> optax.GradientTransformation:
    """The optimizer of config.optimizer with rate lr_schedule (step -> lr).

    total_steps: the run's length, for weight_decay_end's schedule. freeze_steps: the
    steps during which optimizer.frozen_params get no update (0: none). The frozen
    parameters have an optimizer of their own whose count starts when they thaw (a
    torch optimiser's per-parameter step: Adam's bias correction restarts) and whose
    schedules read the run's step. optimizer.untrained_params never move and have no
    optimizer state (module docstring).
    """
    wd = weight_decay_schedule(opt_cfg, total_steps)
    tx = _optimizer(opt_cfg, lr_schedule, wd)
    prefix = opt_cfg.get("frozen_params")
    if prefix and freeze_steps > 0:
        shift = lambda f: f if not callable(f) else (lambda step: f(step + freeze_steps))
        thawed = _skip_first(_optimizer(opt_cfg, shift(lr_schedule), shift(wd)), freeze_steps)
        tx = optax.multi_transform({"free": tx, "frozen": thawed},
                                   functools.partial(frozen_labels, prefix=prefix))
    untrained = opt_cfg.get("untrained_params")
    if untrained:
        # set_to_zero is stateless and multi_transform masks the other transforms'
        # state: the untrained arrays get no moments and no decay, only zero updates.
        tx = optax.multi_transform({"free": tx, "frozen": optax.set_to_zero()},
                                   functools.partial(frozen_labels, prefix=untrained,
                                                     field="untrained_params"))
    clip = opt_cfg.get("clip_per_tensor") or 0.0
    return optax.chain(clip_per_tensor(clip), tx) if clip > 0 else tx


def _optimizer(opt_cfg, lr_schedule, weight_decay) -> optax.GradientTransformation:
    name = opt_cfg.name
    # .get: a config stored before the fields existed decayed neither (the old rule).
    mask = functools.partial(decay_mask, decay_bn=opt_cfg.get("decay_bn", False),
                             decay_bias=opt_cfg.get("decay_bias", False))
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay, mask=mask),
            optax.sgd(lr_schedule, momentum=opt_cfg.momentum, nesterov=opt_cfg.nesterov))
    if name == "lars":
        if callable(weight_decay):
            raise UserError("config.optimizer.weight_decay_end (a weight-decay schedule) is "
                            "not supported with LARS: use sgd or adamw, or unset it.")
        return optax.lars(lr_schedule, weight_decay=weight_decay,
                          weight_decay_mask=mask, trust_ratio_mask=mask,
                          momentum=opt_cfg.momentum, nesterov=opt_cfg.nesterov)
    if name == "adamw":
        if callable(weight_decay):  # optax.adamw's own chain, with the decay scheduled
            return optax.chain(optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2),
                               optax.add_decayed_weights(weight_decay, mask),
                               optax.scale_by_learning_rate(lr_schedule))
        return optax.adamw(lr_schedule, b1=opt_cfg.b1, b2=opt_cfg.b2,
                           weight_decay=weight_decay, mask=mask)
    raise UserError(f"config.optimizer.name={name!r} is not one of {OPTIMIZERS}.")
