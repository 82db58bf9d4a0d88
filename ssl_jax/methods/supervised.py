"""Supervised reference: cross-entropy on the dataset's labels, same encoders and loop.

Not self-supervised: it is the row every results table needs above the
self-supervised ones (how far is each pretext from using the labels?). One
view per image (config.aug: random resized crop and flip by default, no colour
ops), a linear classifier on the globally average-pooled final stage.

The loop hands a method the labels only when it asks (`USES_LABELS`), so no
self-supervised method can read them by accident.
"""
from __future__ import annotations

import jax.numpy as jnp

from ssl_jax import augment, losses, models
from ssl_jax.methods import network

USES_LABELS = True


def check(config, global_batch: int) -> None:
    del global_batch
    if config.supervised.num_classes < 2:
        raise ValueError(f"config.supervised.num_classes={config.supervised.num_classes}: "
                         "set it to the dataset's number of classes.")


def views(rng, images, config) -> dict:
    """images (B, H, W, C) uint8 -> {"image": (B, h, w, C) float32}."""
    return {"image": augment.batch_views(rng, images, config.aug)}


def _net(config) -> network.EncoderHead:
    return network.EncoderHead(encoder=network.make_encoder(config.model),
                               head=models.LinearHead(config.supervised.num_classes),
                               stage=network.final_stage(config.model))


def init(rng, views, config):
    """-> (params {"encoder", "head"}, state {"batch_stats": {"encoder": ...}})."""
    params, batch_stats = network.init(_net(config), rng, views["image"])
    return params, {"batch_stats": batch_stats}


def loss(params, state, views, indices, rng, config):
    """Mean cross-entropy of views["label"] (B,) int32 (added by the loop) over the
    global batch -> (loss, ({"train_acc"}, new_state))."""
    del indices, rng
    _, logits, batch_stats = network.apply(_net(config), params, state["batch_stats"],
                                           views["image"], train=True)
    labels = views["label"]
    value = jnp.mean(losses.cross_entropy(logits, labels))
    acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return value, ({"train_acc": acc}, {"batch_stats": batch_stats})
