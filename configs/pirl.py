r"""PIRL (Misra & van der Maaten 2020) — an image and its shuffled jigsaw tiles
map near the image's memory-bank entry: NCE with the bank's negatives on both.

  python -m ssl_jax.train --config configs/pirl.py:dataset=fashion_mnist --workdir runs/pirl
  python -m ssl_jax.evaluate --workdir runs/pirl --eval linear,knn

Arguments after the colon: dataset=fashion_mnist|cifar10|imagenet2012, model=NAME,
runlocal. Any field can be overridden: --config.pirl.jigsaw_weight=0.75.
Everything but the jigsaw branch is NPID's config (configs/npid.py).
"""
from ssl_jax.config import sibling

npid = sibling(__file__, "npid")


def get_config(arg=None):
    c, a = npid.memory_base("pirl", arg)
    # jigsaw_weight: lambda of the paper; tiles: jigsaw.tile_view_config fields
    # (default: crop (0.6, 1) -> 255, 64 px tiles with jitter, per-tile colour).
    c.pirl = dict(jigsaw_weight=0.5, num_permutations=1000,
                  tiles=dict(mean=c.aug.mean, std=c.aug.std))
    if a.dataset == "imagenet2012":
        # The paper: B = 1024 (32 per GPU), lr 0.12, 800 epochs, K = 32000.
        c.batch_size = 1024
        c.total_epochs = 800.0
        c.memory.negatives = 32000
    elif a.dataset == "cifar10":
        c.memory.negatives = 16000
        c.pirl.tiles.update(crop_size=(48, 48), tile_side=16)
    else:
        # 28x28 crops upsampled to 48x48: 16 px cells and tiles, the smallest
        # the 4-block ConvNet's 2x2 pools reduce to a non-empty map; no jitter room.
        c.pirl.tiles.update(crop_size=(48, 48), tile_side=16)
        if not a.runlocal:
            c.total_epochs = 1.5  # each image costs ~4x NPID's: the 9 tiles hold 2304 px
    return c
