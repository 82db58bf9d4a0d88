"""Supervised reference: cross-entropy on the dataset's labels, same encoders and loop.

Not self-supervised: it is the row every results table needs above the
self-supervised ones (how far is each pretext from using the labels?). One
view per image (config.aug: random resized crop and flip by default, no colour
ops), a linear classifier on the globally average-pooled final stage.

The loop hands a method the labels only when it asks (`uses_labels`), so no
self-supervised method can read them by accident. The number of classes comes
from the prepared dataset (spec.num_classes), not from the config.
"""
from __future__ import annotations

from ssl_jax import errors, losses, models
from ssl_jax.methods import base, network
from ssl_jax.views import augment

def check(config, spec, mesh) -> None:
    del mesh
    if not spec.num_classes or spec.num_classes < 2:
        raise errors.UserError(
            f"The supervised reference needs labels, and {config.dataset} has "
            f"{'no label feature with a class count' if not spec.num_classes else 'one class'}: "
            "train it on a labelled dataset.")


def views(rng, images, config) -> dict:
    """images (B, H, W, C) uint8 -> {"image": (B, h, w, C) float32}."""
    return {"image": augment.batch_views(rng, images, config.aug)}


def _net(config, spec) -> network.EncoderHead:
    return network.EncoderHead(encoder=network.make_encoder(config.model),
                               head=models.LinearHead(spec.num_classes),
                               stage=network.final_stage(config.model))


def init(rng, views, config, spec):
    """-> (params {"encoder", "head"}, state {"batch_stats": {"encoder": ...}})."""
    params, batch_stats = network.init(_net(config, spec), rng, views["image"])
    return params, {"batch_stats": batch_stats}


def loss(params, state, views, batch, rng, config, spec):
    """Mean cross-entropy of batch["label"] (B,) int32 over the global batch
    -> (loss, ({"train_acc"}, new_state))."""
    _, logits, batch_stats = network.apply(_net(config, spec), params, state["batch_stats"],
                                           views["image"], train=True, rng=rng)
    value, acc = losses.classification(logits, batch["label"])
    return value, ({"train_acc": acc}, {"batch_stats": batch_stats})


METHOD = base.Method(views=views, init=init, loss=loss, check=check, uses_labels=True)
