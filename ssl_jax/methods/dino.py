"""DINO (Caron et al. 2021): self-distillation with no labels, with DINOv2's options.

A student (encoder + DINO head) is trained to match, crop for crop, the sharpened and
centred output distribution of a teacher: the same network whose weights are an EMA of
the student's and which receives no gradient. Multi-crop: the teacher sees the G global
crops of each image, the student all G + L; each teacher crop is paired with every
student crop but its own view, and the loss is the mean over those pairs
(distill.dino_loss). Reference: facebookresearch/dino main_dino.py (train_one_epoch,
DINOLoss, DataAugmentationDINO), vision_transformer.py (DINOHead), utils.py.

config.dino:
  out_dim, hidden, bottleneck, head_layers, norm_last_layer   the head (models.heads.DINOHead)
  student_temp (0.1); teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs: the
      teacher temperature, linear from warmup_teacher_temp to teacher_temp over that many
      epochs and constant after, read per epoch (DINOLoss.teacher_temp_schedule[epoch])
  center_momentum (0.9): the centre, an EMA of the teacher's logits over the global batch,
      updated after the loss (DINOLoss.update_center)
  momentum_teacher (0.996): the EMA rate, a per-step cosine up to 1 (momentum_schedule)
  global_crops, local_crops, local_size, global_scale, local_scale: the crops
      (views.multicrop.dino_spec, DINO's per-crop blur and solarisation)
  export: "teacher" (default: what DINO evaluates and releases) or "student": the encoder
      that evaluate, the online probes and export read (Method.encoder_at)
  DINOv2's options (Oquab et al. 2023, facebookresearch/dinov2), each off by default:
  koleo_weight: KoLeo on the student's class embeddings, per global crop, summed
      (dinov2 ssl_meta_arch: koleo_loss_weight 0.1)
  centering: "centering" (DINO's) or "sinkhorn_knopp" (sinkhorn_iterations, 3)
  ibot_weight: iBOT's masked-patch loss (ibot_mask_ratio, ibot_mask_prob): the student's
      global crops masked by block masks (a ViT with model.mask_token), the teacher's
      patch outputs at the masked positions as targets, its own centre (patch_center)
  collapse: the watch's thresholds (`watch`)

The optimiser's DINO parts are generic options of ssl_jax/optim.py, set by configs/dino.py:
the weight-decay cosine (optimizer.weight_decay_end), per-tensor clipping
(optimizer.clip_per_tensor), the last layer frozen for the first epoch
(optimizer.frozen_params="head/last_layer", freeze_epochs=1).

The method state: the student's BN statistics, the teacher (params and BN statistics),
the centre(s) and the optimizer-step count the schedules read, so a resume continues
every schedule exactly. With gradient accumulation (config.accumulate_steps = A) the
teacher still moves once per update (after_step), but the centre, being method state
threaded through the micro-batches, takes A EMA steps of 0.9 per update, each over a
micro-batch: not DINO's one step over the global batch.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import config as cfg_lib
from ssl_jax import distill, models, parallel
from ssl_jax.errors import UserError
from ssl_jax.methods import base, network
from ssl_jax.models.heads import DINOHead
from ssl_jax.views import masking, multicrop

CENTERINGS = ("centering", "sinkhorn_knopp")
EXPORTS = ("teacher", "student")


# ------------------------------------------------------------------ the network

class DinoNet(nn.Module):
    """images (n, H, W, C) -> (features, {"embed": (n, d) the final stage's summary (a
    ViT's class token), "logits": (n, K), and with patches=True "patch_logits": (n, N, K)
    the head on every patch token (iBOT's shared head)}). masks (n, N) bool: a ViT's
    masked patches (the mask token in their place)."""
    encoder: nn.Module
    head: nn.Module
    stage: str

    def __call__(self, x, train: bool, masks=None, patches: bool = False):
        feats = (self.encoder(x, train=train) if masks is None
                 else self.encoder(x, train=train, masks=masks))
        top = feats[self.stage]
        embed = models.summary(top)
        out = {"embed": embed, "logits": self.head(embed)}
        if patches:
            p = top.patches
            p = p.reshape(p.shape[0], -1, p.shape[-1])
            out["patch_logits"] = self.head(p.reshape(-1, p.shape[-1])).reshape(
                p.shape[0], p.shape[1], -1)
        return feats, out


def _net(config, stochastic: bool = True) -> DinoNet:
    """The student's network (stochastic: a ViT's drop path on) or the teacher's (off)."""
    d = config.dino
    head = DINOHead(out=d.out_dim, hidden=d.hidden, bottleneck=d.bottleneck,
                    layers=d.head_layers, norm_last_layer=d.norm_last_layer)
    return DinoNet(encoder=network.make_encoder(config.model, stochastic=stochastic),
                   head=head, stage=network.final_stage(config.model))


def _apply(net, params, batch_stats, x, rng=None, masks=None, patches=False):
    """-> (outputs, new batch_stats), train mode: the teacher too, as DINO's (never
    .eval(): its BN normalises with the batch and keeps its own running averages)."""
    variables = {"params": params, "batch_stats": batch_stats}
    (_, out), updates = net.apply(variables, x, train=True, masks=masks, patches=patches,
                                  mutable=["batch_stats"], rngs=network.rngs(rng))
    return out, updates.get("batch_stats", {})


# ------------------------------------------------------------------ schedules

def lengths(config, spec) -> tuple[int, int]:
    """-> (steps per epoch, total steps), as the setup layer counts them."""
    per_epoch = spec.num_examples // config.batch_size
    total = cfg_lib.steps(config, "total", steps_per_epoch=per_epoch,
                          batch_size=config.batch_size)
    return per_epoch, total


def teacher_temperature(config, epoch):
    """DINOLoss.teacher_temp_schedule[epoch]: np.linspace(warmup_teacher_temp,
    teacher_temp, W)[epoch] for epoch < W, then teacher_temp (W: warmup epochs)."""
    d = config.dino
    w = int(d.warmup_teacher_temp_epochs)
    if w <= 0:
        return jnp.float32(d.teacher_temp)
    ramp = jnp.asarray(np.linspace(d.warmup_teacher_temp, d.teacher_temp, w), jnp.float32)
    return jnp.where(epoch < w, ramp[jnp.minimum(epoch, w - 1)], jnp.float32(d.teacher_temp))


def teacher_momentum(config, step, total: int):
    """The EMA rate after optimizer step `step` (0-based): DINO's momentum_schedule, a
    cosine from momentum_teacher at step 0 to 1 at `total` (utils.cosine_scheduler)."""
    m0 = config.dino.momentum_teacher
    return 1.0 + 0.5 * (m0 - 1.0) * (1.0 + jnp.cos(jnp.pi * step / float(max(total, 1))))


# ------------------------------------------------------------------ the contract

def crop_spec(config):
    d = config.dino
    return multicrop.dino_spec(
        config.aug, global_crops=d.global_crops, local_crops=d.local_crops,
        global_size=tuple(config.aug.crop_size), local_size=d.local_size,
        global_scale=tuple(d.global_scale), local_scale=tuple(d.local_scale))


def check(config, spec, mesh) -> None:
    del spec, mesh
    d = config.dino
    crop_spec(config)  # its own checks: counts, sizes
    if d.global_crops < 2 and d.local_crops < 1:
        raise UserError("DINO needs two crops of each image or more (a teacher crop is never "
                        "paired with its own view): set config.dino.global_crops=2.")
    if d.centering not in CENTERINGS:
        raise UserError(f"config.dino.centering={d.centering!r}: use one of {CENTERINGS}.")
    if d.export not in EXPORTS:
        raise UserError(f"config.dino.export={d.export!r}: use one of {EXPORTS}.")
    if config.get("video") is not None:
        raise UserError("DINO takes crops of one image; config.video (positive pairs from "
                        "videos) is for the two-view methods simclr and moco: remove it.")
    if d.ibot_weight > 0:
        if config.model.name not in models.VITS:
            raise UserError(f"config.dino.ibot_weight={d.ibot_weight} (iBOT's masked patches) "
                            f"needs a ViT (model={config.model.name} has no patch tokens to "
                            "mask): use model=vit_small, or ibot_weight=0.")
        if not config.model.get("mask_token", False):
            raise UserError("config.dino.ibot_weight > 0 masks the student's patches: set "
                            "config.model.mask_token=True (configs/dino.py:ibot does).")


def views(rng, images, config) -> dict:
    """images (B, H, W, C) uint8 (or a canvas.Canvas) -> {"global": (B, G, h, w, C),
    "local": (B, L, hl, wl, C), and with iBOT "masks": (B, G, N) bool}."""
    r_crops, r_masks = jax.random.split(rng)
    out = multicrop.make_views(r_crops, images, crop_spec(config))
    d = config.dino
    if d.ibot_weight > 0:
        b, g, h, w = out["global"].shape[:4]
        grid = (h // config.model.patch, w // config.model.patch)
        m = masking.block_masks(r_masks, b * g, grid, ratio=tuple(d.ibot_mask_ratio),
                                sample_prob=d.ibot_mask_prob)
        out["masks"] = m.reshape(b, g, -1)
    return out


def init(rng, views, config, spec):
    del spec
    net = _net(config)
    x = views["global"][:, 0]
    variables = jax.jit(lambda r, v: net.init(network.init_rngs(r), v, train=True))(rng, x)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    k = config.dino.out_dim
    state = {"batch_stats": batch_stats,
             # The teacher starts as the student (load_state_dict(student.state_dict())).
             "teacher": params, "teacher_batch_stats": batch_stats,
             "center": jnp.zeros((k,), jnp.float32), "step": jnp.zeros((), jnp.int32)}
    if config.dino.ibot_weight > 0:
        state["patch_center"] = jnp.zeros((k,), jnp.float32)
    return params, state


def after_step(params, state, config, spec):
    """The teacher's EMA after the student's update, with optimizer step `step`'s rate
    (train_one_epoch: momentum_schedule[it] after optimizer.step()); the step count moves on."""
    m = teacher_momentum(config, state["step"], lengths(config, spec)[1])
    teacher = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s,
                           state["teacher"], jax.lax.stop_gradient(params))
    return dict(state, teacher=teacher, step=state["step"] + 1)


def _flat(x):
    """(B, n, ...) -> (B * n, ...): image b's n crops in rows b n .. b n + n - 1."""
    return x.reshape((-1,) + x.shape[2:])


def loss(params, state, views, batch, rng, config, spec):
    """Returns (loss, (metrics, new_state)): new_state holds the student's BN statistics,
    the teacher's (its forward is in train mode) and the centres updated after the loss."""
    del batch
    d = config.dino
    ibot = d.ibot_weight > 0
    g = views["global"]
    b, n_global = g.shape[:2]
    per_epoch, _ = lengths(config, spec)
    temp = teacher_temperature(config, state["step"] // max(per_epoch, 1))

    # The teacher: global crops only, no gradient, no drop path.
    t_out, t_stats = _apply(_net(config, stochastic=False), state["teacher"],
                            state["teacher_batch_stats"], _flat(g), patches=ibot)
    t_out = jax.tree.map(jax.lax.stop_gradient, t_out)
    t_logits = t_out["logits"].reshape(b, n_global, -1)

    # The student: one call per resolution group (BN statistics threaded through them),
    # the global crops masked for iBOT.
    student = _net(config)
    # No key: a network without stochastic layers (as network.apply takes it).
    r_global, r_local = jax.random.split(rng) if rng is not None else (None, None)
    masks = _flat(views["masks"]) if ibot else None
    s_global, stats = _apply(student, params, state["batch_stats"], _flat(g), rng=r_global,
                             masks=masks, patches=ibot)
    s_logits = [s_global["logits"].reshape(b, n_global, -1)]
    if "local" in views:
        s_local, stats = _apply(student, params, stats, _flat(views["local"]), rng=r_local)
        s_logits.append(s_local["logits"].reshape(b, views["local"].shape[1], -1))
    s_logits = jnp.concatenate(s_logits, axis=1)                     # (b, G + L, K)

    new_state = dict(state, batch_stats=stats, teacher_batch_stats=t_stats)
    if d.centering == "sinkhorn_knopp":
        probs = parallel.on_shards(
            lambda t, axis_name: distill.sinkhorn_knopp(t, temp, d.sinkhorn_iterations,
                                                        axis_name),
            batch_args=(True,), batch_out=True)(_flat(t_logits))
        value, metrics = parallel.on_shards(
            lambda s, t, c, p, axis_name: distill.dino_loss(
                s, t, c, d.student_temp, temp, axis_name, teacher_probs=p),
            batch_args=(True, True, False, True))(
                s_logits, t_logits, state["center"], probs.reshape(t_logits.shape))
    else:
        value, metrics = parallel.on_shards(
            lambda s, t, c, axis_name: distill.dino_loss(s, t, c, d.student_temp, temp,
                                                         axis_name),
            batch_args=(True, True, False))(s_logits, t_logits, state["center"])
        new_state["center"] = parallel.on_shards(
            lambda t, c, axis_name: distill.update_center(c, t, d.center_momentum, axis_name),
            batch_args=(True, False))(t_logits, state["center"])
    metrics = dict(metrics, dino_loss=value, teacher_temp=temp)

    if d.koleo_weight > 0:
        # DINOv2 (ssl_meta_arch): the weight times the sum over the global crops.
        embed = s_global["embed"].reshape(b, n_global, -1)
        koleo = sum(parallel.on_shards(distill.koleo, batch_args=(True,))(embed[:, i])
                    for i in range(n_global))
        metrics["koleo"] = koleo
        value = value + d.koleo_weight * koleo
    if ibot:
        t_patch, s_patch = t_out["patch_logits"], s_global["patch_logits"]   # (bG, N, K)
        # DINOv2 weighs it by 2 / G (loss_scales x ibot_loss_scale): 1 for its 2 crops; ours
        # is the per-crop mean as well (distill.ibot_patch_loss), times ibot_weight.
        if d.centering == "sinkhorn_knopp":  # the masked patches of the global batch
            n, k = t_patch.shape[0] * t_patch.shape[1], t_patch.shape[-1]
            probs = parallel.on_shards(
                lambda t, m, axis_name: distill.sinkhorn_knopp(
                    t, temp, d.sinkhorn_iterations, axis_name, mask=m),
                batch_args=(True, True), batch_out=True)(t_patch.reshape(n, k),
                                                         masks.reshape(n))
            ibot_value, ibot_metrics = parallel.on_shards(
                lambda s, t, m, c, p, axis_name: distill.ibot_patch_loss(
                    s, t, m, c, d.student_temp, temp, axis_name, teacher_probs=p),
                batch_args=(True, True, True, False, True))(
                    s_patch, t_patch, masks, state["patch_center"], probs.reshape(t_patch.shape))
        else:
            ibot_value, ibot_metrics = parallel.on_shards(
                lambda s, t, m, c, axis_name: distill.ibot_patch_loss(
                    s, t, m, c, d.student_temp, temp, axis_name),
                batch_args=(True, True, True, False))(s_patch, t_patch, masks,
                                                      state["patch_center"])
            new_state["patch_center"] = parallel.on_shards(
                lambda t, m, c, axis_name: distill.update_patch_center(
                    c, t, m, d.center_momentum, axis_name),
                batch_args=(True, True, False))(t_patch, masks, state["patch_center"])
        metrics.update({f"ibot_{k}": v for k, v in ibot_metrics.items()}, ibot=ibot_value)
        value = value + d.ibot_weight * ibot_value
    return value, (metrics, new_state)


def encoder_at(config):
    """The teacher's encoder (DINO evaluates and releases the teacher), or with
    config.dino.export="student" the trained one."""
    if config.dino.export == "student":
        return base.ENCODER_AT
    return (("method_state", "teacher", "encoder"),
            ("method_state", "teacher_batch_stats", "encoder"))


def watch(config, spec):
    """-> f(step, metrics) -> one warning line, once, when the teacher's outputs have sat
    collapsed for `patience` log steps in a row: near-uniform (teacher_entropy above
    `uniform` x ln K, e.g. a loss stuck at ln 65536 = 11.09) or on one prototype (the
    entropy of the batch-averaged teacher distribution below `one` x ln K)."""
    del spec
    c, log_k = config.dino.collapse, math.log(config.dino.out_dim)
    seen = {"run": 0, "first": None, "warned": False}

    def check_step(step, metrics):
        if seen["warned"] or "teacher_entropy" not in metrics:
            return None
        h, hb = float(metrics["teacher_entropy"]), float(metrics["teacher_batch_entropy"])
        kind = ("uniform" if h > c.uniform * log_k else
                "one prototype" if hb < c.one * log_k else None)
        if kind is None:
            seen["run"], seen["first"] = 0, None
            return None
        seen["run"] += 1
        seen["first"] = seen["first"] or step
        if seen["run"] < c.patience:
            return None
        seen["warned"] = True
        what = (f"teacher entropy {h:.2f} nats, {h / log_k:.0%} of ln K = {log_k:.2f} "
                "(every output near uniform)" if kind == "uniform" else
                f"the batch-averaged teacher distribution's entropy {hb:.2f} nats, "
                f"{hb / log_k:.0%} of ln K (every image on the same prototypes)")
        return (f"warning: DINO looks collapsed ({kind}) since step {seen['first']}: {what}, "
                f"KL(teacher || student) {float(metrics['kl']):.3g}. Check the teacher "
                "temperature (config.dino.teacher_temp; above 0.07 is unstable), the "
                "centring (config.dino.centering, center_momentum 0.9) and the learning rate "
                "(config.optimizer.lr, lower); docs/faults.md.")
    return check_step


METHOD = base.Method(views=views, init=init, loss=loss, check=check, after_step=after_step,
                     encoder_at=encoder_at, watch=watch)
