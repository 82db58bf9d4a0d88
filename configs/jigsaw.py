r"""Jigsaw (Noroozi & Favaro 2016) — classify which of P permutations shuffled
the 3x3 tiles of an image.

  python -m ssl_jax.train --config configs/jigsaw.py:dataset=fashion_mnist --workdir runs/jigsaw
  python -m ssl_jax.evaluate --workdir runs/jigsaw --eval linear,knn

Arguments after the colon: dataset=fashion_mnist|cifar10|imagenet2012, model=NAME,
runlocal. Any field can be overridden: --config.jigsaw.num_perms=1000
--config.jigsaw.tiles.tile_side=12. config.jigsaw.tiles holds fields of
ssl_jax.views.jigsaw.tile_view_config (the rest take its defaults; mean/std come from
config.aug). config.head: dim = per-tile embedding, hidden/layers = classifier.
The permutation set is computed once per (num_perms, perm_seed), ~2 s per 1000,
and cached in ~/.cache/ssl_jax.
"""
from ssl_jax.config import sibling

common = sibling(__file__, "common")


def get_config(arg=None):
    a = common.parse_arg(arg, dataset="fashion_mnist", model="", runlocal=False)
    c = common.base("jigsaw", a.dataset)
    if a.model:
        c.model.name = a.model
    # Tiles in every preset: a tile is 3/4 of its cell, as the paper's 64 of 85 px.
    # No per-tile flips: a flipped tile breaks the edge continuity the task is about
    # (PIRL, which does not solve the puzzle, flips; see tile_view_config).
    c.jigsaw = dict(num_perms=1000, perm_seed=0,
                    tiles=dict(crop_size=(255, 255), crop_scale=(0.6, 1.0), tile_side=64,
                               tile_size=0, tile_jitter=True, standardize=False, flip_p=0.0,
                               jitter_strength=0.5, jitter_p=0.8, grayscale_p=0.3))

    if a.dataset == "imagenet2012":
        # Goyal et al. 2019 (Scaling and Benchmarking SSL), ResNet-50: P=2000 on
        # ImageNet-1k, SGD lr 0.1 x B/256, wd 1e-4, B=256, 90 epochs; Noroozi's
        # per-tile standardisation and 30% grayscale against low-level shortcuts.
        # Head as Noroozi's fc6 (1024 per tile) -> fc7 4096 -> fc8 P.
        c.jigsaw.num_perms = 2000
        c.jigsaw.tiles.update(standardize=True)
        c.batch_size = 256
        c.total_epochs = 90.0
        c.optimizer.update(name="sgd", lr=0.1, weight_decay=1e-4, warmup_epochs=1.0)
        c.head.update(dim=1024, hidden=4096, layers=2)
        c.ckpt_every_epochs = 1.0
    elif a.dataset == "cifar10":
        # The 32 px image is upsampled to a 96 px grid crop: 32 px cells, 24 px
        # tiles (8 px of jitter) resized back to 32 px, the size the small-stem
        # ResNet-18 sees at evaluation.
        c.jigsaw.tiles.update(crop_size=(96, 96), tile_side=24, tile_size=32)
        c.batch_size = 256
        c.total_epochs = 200.0
        c.optimizer.update(name="sgd", lr=0.1, weight_decay=5e-4, warmup_epochs=5.0)
        c.head.update(dim=128, hidden=1024, layers=2)
        c.ckpt_every_epochs = 10.0
    else:
        # Sized for a 2-core CPU. The 28 px image is upsampled to a 64 px grid crop:
        # 21 px cells, 16 px tiles (5 px of jitter) cut without a second resize; 16 px
        # leaves the 4-block ConvNet a 2x2 final map (its pools: 16 -> 8 -> 4 -> 2).
        # P=100: 60k small, grey images carry fewer cues than ImageNet photos.
        c.jigsaw.num_perms = 100
        c.jigsaw.tiles.update(crop_size=(64, 64), tile_side=16)
        c.batch_size = 128
        c.total_epochs = 2.0
        c.optimizer.update(name="adamw", lr=2e-3, lr_batch_scale=0, weight_decay=1e-4,
                           warmup_epochs=0.2)
        c.head.update(dim=64, hidden=512, layers=2)
        c.ckpt_every_steps = 200

    if a.runlocal:
        common.runlocal(c)
        c.jigsaw.num_perms = min(c.jigsaw.num_perms, 24)
    return c
