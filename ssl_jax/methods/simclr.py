"""SimCLR (Chen et al. 2020): two augmented views, one encoder + MLP head,
NT-Xent with the negatives of the whole global batch.

config.simclr.temperature; config.aug: the view recipe (views/augment.py);
config.head: SimCLR's projection head, BN on every layer, the output's without a
shift (model_util.projection_head: config.head.hidden_bn=out_bn=True).
BN under jit over the global batch is synchronised across devices, as SimCLR's
TPU implementation does (global_bn=True; it matters: per-device BN lets the model cheat).

Multi-crop (opt-in, config.multicrop; SwAV, Caron et al. 2020): global_crops crops of
the view size and local_crops smaller ones (local_size, local_scale) of each image, all
with config.aug's recipe; every crop of an image is a positive of every other, the
crops of the other images are the negatives (losses.multicrop_nt_xent). The encoder
runs once per resolution group, so BN normalises the global crops and the local crops
each with their own group's statistics. Without config.multicrop the method is the
two-view SimCLR above, unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import losses, parallel
from ssl_jax.errors import UserError
from ssl_jax.methods import base, network
from ssl_jax.views import augment, multicrop, pair


def views(rng, images, config) -> dict:
    """images: (B, H, W, C) uint8 -> {"view1", "view2"}: (B, h, w, C) float32; a
    pair.Pair (video positives): view1 from its query frames, view2 from its keys.
    With config.multicrop: {"global": (B, G, h, w, C), "local": (B, L, hl, wl, C)}."""
    spec = multicrop_spec(config)
    if spec is not None:
        return multicrop.make_views(rng, images, spec)
    r1, r2 = jax.random.split(rng)
    cfg = augment_config(config)
    first, second = pair.sources(images)
    return {"view1": augment.batch_views(r1, first, cfg),
            "view2": augment.batch_views(r2, second, cfg)}


def augment_config(config):
    return augment.simclr_view_config(**config.aug.to_dict())


def multicrop_spec(config):
    """The resolution groups config.multicrop asks for, or None (two views)."""
    mc = config.get("multicrop")
    if mc is None:
        return None
    return multicrop.uniform_spec(
        augment_config(config), mc.global_crops, mc.local_crops, local_size=mc.local_size,
        global_scale=mc.get("global_scale"), local_scale=mc.local_scale)


def check(config, spec, mesh) -> None:
    del spec, mesh
    crops = multicrop_spec(config)  # its own checks: counts, sizes
    if crops is None:
        return
    if multicrop.crops_per_image(crops) < 2:
        raise UserError("SimCLR with multi-crop needs two crops of each image or more (one "
                        "has no positive): set config.multicrop.global_crops=2.")
    video = config.get("video")
    if video is not None and video.get("positives", "frame") != "frame":
        # Every crop is a positive of every other: crops of one image, not of a pair.
        raise UserError(f"config.video.positives={video.positives!r} brings two images per "
                        "example and multi-crop takes crops of one: use positives=frame, or "
                        "drop local_crops (two views, one from each image).")


def _net(config) -> network.EncoderHead:
    return network.make_network(config)  # config.head: SimCLR's head (configs/simclr.py)


def init(rng, views, config, spec):
    del spec
    x = views["view1"] if "view1" in views else views["global"][:, 0]
    params, batch_stats = network.init(_net(config), rng, x)
    return params, {"batch_stats": batch_stats}


def loss(params, state, views, batch, rng, config, spec):
    """Returns (loss, (metrics, new_state)); rng: the encoder's stochastic depth (ViT)."""
    del batch, spec
    net = _net(config)
    if "view1" not in views:
        return _multicrop_loss(net, params, state, views, config, rng)
    # Both views in one forward pass: BN statistics then cover all 2B images,
    # and the encoder runs once on a larger batch (faster than twice).
    # Interleaved (not concatenated) so each device's rows stay on that device.
    v1, v2 = views["view1"], views["view2"]
    x = jnp.stack([v1, v2], axis=1).reshape((-1,) + v1.shape[1:])
    _, z, batch_stats = network.apply(net, params, state["batch_stats"], x, train=True, rng=rng)
    z = z.reshape((v1.shape[0], 2, -1))
    z1, z2 = z[:, 0], z[:, 1]
    value, metrics = parallel.on_shards(
        lambda a, b, axis_name: losses.nt_xent(a, b, config.simclr.temperature, axis_name),
        batch_args=(True, True))(z1, z2)
    return value, (metrics, {"batch_stats": batch_stats})


def _multicrop_loss(net, params, state, views, config, rng):
    """views: {"global": (B, G, ...), "local": (B, L, ...)}: one forward per group
    (network.embed_crops), then every crop's NT-Xent over the global batch."""
    z, batch_stats = network.embed_crops(net, params, state["batch_stats"], views, rng)
    value, metrics = parallel.on_shards(
        lambda a, axis_name: losses.multicrop_nt_xent(a, config.simclr.temperature, axis_name),
        batch_args=(True,))(z)                                  # z: (B, G + L, D)
    return value, (metrics, {"batch_stats": batch_stats})


METHOD = base.Method(views=views, init=init, loss=loss, check=check, takes_pairs=True)
