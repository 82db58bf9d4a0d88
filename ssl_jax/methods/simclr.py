"""SimCLR (Chen et al. 2020): two augmented views, one encoder + MLP head,
NT-Xent with the negatives of the whole global batch.

config.simclr.temperature; config.aug: the view recipe (views/augment.py);
config.head: SimCLR's projection head, BN on every layer, the output's without a
shift (model_util.projection_head: config.head.hidden_bn=out_bn=True).
BN under jit over the global batch is synchronised across devices, as SimCLR's
TPU implementation does (global_bn=True; it matters: per-device BN lets the model cheat).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import losses, parallel
from ssl_jax.methods import base, network
from ssl_jax.views import augment, pair


def views(rng, images, config) -> dict:
    """images: (B, H, W, C) uint8 -> {"view1", "view2"}: (B, h, w, C) float32; a
    pair.Pair (video positives): view1 from its query frames, view2 from its keys."""
    r1, r2 = jax.random.split(rng)
    cfg = augment_config(config)
    first, second = pair.sources(images)
    return {"view1": augment.batch_views(r1, first, cfg),
            "view2": augment.batch_views(r2, second, cfg)}


def augment_config(config):
    return augment.simclr_view_config(**config.aug.to_dict())


def _net(config) -> network.EncoderHead:
    return network.make_network(config)  # config.head: SimCLR's head (configs/simclr.py)


def init(rng, views, config, spec):
    del spec
    params, batch_stats = network.init(_net(config), rng, views["view1"])
    return params, {"batch_stats": batch_stats}


def loss(params, state, views, batch, rng, config, spec):
    """Returns (loss, (metrics, new_state)); rng: the encoder's stochastic depth (ViT)."""
    del batch, spec
    net = _net(config)
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


METHOD = base.Method(views=views, init=init, loss=loss, takes_pairs=True)
