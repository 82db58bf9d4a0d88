"""Jigsaw (Noroozi & Favaro 2016): solve 3x3 puzzles made from the image.

Each image gives 9 tiles (ssl_jax/views/jigsaw.py), shuffled by one of P fixed
permutations of maximal Hamming distance; the network predicts which:

  tiles (B, 9, t, t, C) -> (B*9, t, t, C), one image's tiles adjacent
    -> shared encoder, final stage globally average-pooled     (B*9, c)
    -> per-tile linear embedding + BN + ReLU                   (B*9, dim)
    -> concatenated in the shuffled order                      (B, 9*dim)
    -> MLP classifier (config.head.layers; 1: linear, VISSL's) (B, P) logits

and is trained with cross-entropy against the permutation's index.

config.jigsaw: num_perms (P), perm_seed, tiles (fields of
jigsaw.tile_view_config; mean and std come from config.aug, which also
describes the whole-image eval view). config.head: dim (per-tile embedding),
hidden, layers (of the classifier).

One encoder pass over all B*9 tiles: BN statistics cover every tile of the
global batch (synchronised under jit), or of each of config.model.bn_groups
groups of whole images (the ImageNet preset: 32 images' 288 tiles, VISSL's
per-GPU batch; the embedding's BN is grouped the same way), and the loss is a
plain mean over the global batch, so loss and gradients are the same on 1 or 8
devices. The tiles of an image are adjacent rows, so reshaping keeps each
device's rows on it.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import errors, losses, models
from ssl_jax.methods import base, network
from ssl_jax.views import jigsaw as puzzle


class JigsawHead(nn.Module):
    """pooled tile features (B*9, c), shuffled order -> permutation logits (B, P) float32."""
    dim: int
    hidden: int
    num_perms: int
    layers: int = 2
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(self.dim, use_bias=False, name="embed")(x.astype(jnp.float32))
        x = nn.relu(models.BatchNorm(groups=self.bn_groups, name="embed_bn")(x, train))
        # The order of a puzzle's tiles along this axis is what the classifier reads.
        x = x.reshape((-1, puzzle.NUM_TILES * self.dim))
        return models.MLPHead(hidden=self.hidden, out=self.num_perms, num_layers=self.layers,
                              bn_groups=self.bn_groups, name="classifier")(x, train)


def _net(config) -> network.EncoderHead:
    h = config.head
    return network.EncoderHead(
        encoder=network.make_encoder(config.model),
        head=JigsawHead(dim=h.dim, hidden=h.hidden, num_perms=config.jigsaw.num_perms,
                        layers=h.layers, bn_groups=config.model.get("bn_groups", 1)),
        stage=network.final_stage(config.model))


def tile_config(config):
    """The tile view config of a run: config.jigsaw.tiles with config.aug's mean/std."""
    return puzzle.tile_view_config(**dict(config.jigsaw.tiles.to_dict(),
                                          mean=tuple(config.aug.mean), std=tuple(config.aug.std)))


def perms(config):
    """(P, 9) int32: the constant permutation table (not a parameter; see jigsaw.permutations)."""
    return puzzle.permutations(config.jigsaw.num_perms, config.jigsaw.perm_seed)


def check(config, spec, mesh) -> None:
    """Raises before compiling on impossible tiles; computes (and caches) the permutations."""
    del spec, mesh
    if config.model.name in models.VITS:
        # Tiles of a third of the crop minus a gap: a 28 px image's are 9 px, not two
        # patches of 4 px; the method and its reference evaluations are ConvNets'.
        raise errors.UserError(f"Jigsaw with model={config.model.name}: its puzzle tiles are "
                               "too small for a ViT's patches; use a ConvNet (the dataset's "
                               "default model, or model=resnet50).")
    puzzle.tile_geometry(tile_config(config))
    perms(config)


def views(rng, images, config) -> dict:
    """images: (B, H, W, C) uint8 -> {"tiles": (B, 9, t, t, C) float32 shuffled,
    "perm_index": (B,) int32}."""
    t, index = puzzle.batch_jigsaw(rng, images, tile_config(config), perms(config))
    return {"tiles": t, "perm_index": index}


def _flat(tiles):
    return tiles.reshape((-1,) + tiles.shape[2:])   # (B, 9, ...) -> (B*9, ...), tiles adjacent


def init(rng, views, config, spec):
    del spec
    tiles = _flat(views["tiles"])
    net = _net(config)
    # A final map with no pixels would pool to NaN: say so instead of training on it.
    final = jax.eval_shape(lambda x: net.encoder.init_with_output(rng, x, train=False)[0],
                           tiles[:1])[net.stage]
    if 0 in final.shape[1:3]:
        raise errors.UserError(
            f"{config.model.name} maps {tiles.shape[1]}x{tiles.shape[2]} px tiles to an empty "
            f"{net.stage} ({final.shape[1]}x{final.shape[2]}): raise config.jigsaw.tiles.tile_size "
            "(or tile_side / crop_size), or use an encoder with fewer downsampling stages.")
    params, batch_stats = network.init(net, rng, tiles)
    return params, {"batch_stats": batch_stats}


def loss(params, state, views, batch, rng, config, spec):
    """Returns (loss, (metrics, new_state)); batch and rng are unused."""
    del batch, rng, spec
    _, logits, batch_stats = network.apply(_net(config), params, state["batch_stats"],
                                           _flat(views["tiles"]), train=True)
    value, acc = losses.classification(logits, views["perm_index"])
    return value, ({"perm_acc": acc}, {"batch_stats": batch_stats})


METHOD = base.Method(views=views, init=init, loss=loss, check=check)
