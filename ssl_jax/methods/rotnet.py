"""RotNet (Gidaris et al. 2018): predict which of four rotations (0, 90, 180,
270 degrees) an image was given.

Every image of the batch is lightly augmented (no colour ops: colour carries
no rotation cue to remove) and then shown in all four rotations in the same
batch, which the paper found better than one random rotation per image. The
reference code's crops (gidariss/FeatureLearningRotNet dataloader.py): CIFAR-10
a 4-pixel zero-padded random crop + flip (`LIGHT`); ImageNet
RandomSizedCrop(224) + flip (configs/rotnet.py's preset). A linear classifier
on the globally average-pooled final encoder stage predicts the rotation; the
loss is its cross-entropy.

config.aug: the view config (views/augment.py); `view_config` fills in RotNet's
light recipe. BN under jit over the global batch (all 4B rotated images) is
synchronised across devices, so loss and gradients do not depend on the
device count (the reference trains on one GPU: its BN, too, sees all 4B).
"""
from __future__ import annotations

import jax.numpy as jnp

from ssl_jax import errors, losses, models
from ssl_jax.methods import base, network
from ssl_jax.views import augment

NUM_ROTATIONS = 4

# The reference's CIFAR recipe: RandomCrop(32, padding=4) (zero padding) and a
# horizontal flip, nothing else.
LIGHT = dict(crop="padded", crop_pad=4, crop_pad_mode="zero", flip_p=0.5, jitter_p=0.0,
             grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def view_config(config) -> dict:
    """RotNet's light recipe with config.aug's fields on top (crop_size, mean, std, ...)."""
    return dict(LIGHT, **config.aug.to_dict())


def views(rng, images, config) -> dict:
    """images: (B, H, W, C) uint8, H == W ->
    {"image": (4B, h, w, C) float32, "rotation": (4B,) int32 rotation index k
    (k * 90 degrees counter-clockwise)}.

    Rows 4i .. 4i+3 are image i rotated by k = 0, 1, 2, 3: interleaved, not
    concatenated, so each device's rows stay on that device under batch sharding.
    """
    x = augment.batch_views(rng, images, view_config(config))        # (B, h, w, C)
    b, h, w = x.shape[:3]
    if h != w:
        raise errors.UserError(f"RotNet needs square views to rotate them in one batch, got {h}x{w}: "
                         "set config.aug.crop_size to a square size.")
    # Static k: four cheap transposes/reversals of the whole batch, no per-example switch.
    rotated = jnp.stack([jnp.rot90(x, k, axes=(1, 2)) for k in range(NUM_ROTATIONS)], axis=1)
    return {"image": rotated.reshape((b * NUM_ROTATIONS,) + x.shape[1:]),
            "rotation": jnp.tile(jnp.arange(NUM_ROTATIONS, dtype=jnp.int32), b)}


def _net(config) -> network.EncoderHead:
    return network.EncoderHead(encoder=network.make_encoder(config.model),
                               head=models.LinearHead(NUM_ROTATIONS),
                               stage=network.final_stage(config.model))


def init(rng, views, config, spec):
    """-> (params {"encoder", "head"}, state {"batch_stats": {"encoder": ...}})."""
    del spec
    params, batch_stats = network.init(_net(config), rng, views["image"])
    return params, {"batch_stats": batch_stats}


def loss(params, state, views, batch, rng, config, spec):
    """Mean rotation cross-entropy over the 4B rotated images of the global batch.

    Returns (loss, (metrics {"rot_acc"}, new_state)). batch is unused; rng: the
    encoder's stochastic depth (ViT).
    A plain mean under jit is already global: no per-shard function needed.
    """
    del batch, spec
    _, logits, batch_stats = network.apply(_net(config), params, state["batch_stats"],
                                           views["image"], train=True, rng=rng)  # (4B, 4)
    value, acc = losses.classification(logits, views["rotation"])
    return value, ({"rot_acc": acc}, {"batch_stats": batch_stats})


METHOD = base.Method(views=views, init=init, loss=loss)
