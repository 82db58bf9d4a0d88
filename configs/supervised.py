r"""Supervised reference — cross-entropy on the labels, same encoders, same loop.

  python -m ssl_jax.train --config configs/supervised.py:dataset=fashion_mnist --workdir runs/sup
  python -m ssl_jax.evaluate --workdir runs/sup --eval linear,knn --stages all

The row above the self-supervised ones in every table. Arguments after the
colon: dataset=fashion_mnist|cifar10|imagenet2012, model=NAME, runlocal.

model=vit_tiny|vit_small|vit_base: a ViT (configs/common.set_model): patch 4 on 28/32 px
data (AdamW, ours), 16 on ImageNet (AdamW, MoCo v3's values, this preset's length:
ours). RECIPES.md, ViT presets.
"""
from ssl_jax.config import sibling

common = sibling(__file__, "common")


# budget=10m|30m|2h on fashion_mnist (configs/common.set_budget): the length that fits
# the budget on this 2-core CPU, and what the budget's sweeps changed. Measured (linear
# top-1, final block; benchmarks/RESULTS.md, Quality per CPU-hour):
#   10m: 91.31% in 9.3 CPU-min.
BUDGET = {"10m": dict(steps=2550), "30m": dict(steps=8020), "2h": dict(steps=32660)}


def get_config(arg=None):
    a = common.parse_arg(arg, dataset="fashion_mnist", model="", runlocal=False, budget="")
    c = common.base("supervised", a.dataset)
    del c["head"]  # a linear classifier over the prepared dataset's classes
    # One view: random resized crop + flip, no colour ops (the standard supervised recipe).
    c.aug.update(crop_scale=(0.08, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)

    if a.dataset == "imagenet2012":
        # Goyal et al. 2017: SGD 0.1 x B/256, momentum 0.9, wd 1e-4, 90 epochs, x0.1 at 30/60/80.
        c.batch_size = 256
        c.total_epochs = 90.0
        c.optimizer.update(name="sgd", lr=0.1, lr_batch_scale=256, momentum=0.9,
                           weight_decay=1e-4, schedule="step", decay_factor=0.1,
                           decay_epochs=(30.0, 60.0, 80.0), warmup_epochs=5.0)
        c.ckpt_every_epochs = 1.0
    elif a.dataset == "cifar10":
        c.batch_size = 128
        c.total_epochs = 200.0
        c.optimizer.update(name="sgd", lr=0.1, lr_batch_scale=128, momentum=0.9,
                           weight_decay=5e-4)
        c.aug.update(crop="padded", crop_pad=4)
        c.ckpt_every_epochs = 10.0
    else:
        # Sized for a 2-core CPU: one view per image, so ~2x SimCLR's images/s.
        c.batch_size = 128
        c.total_epochs = 2.0
        c.optimizer.update(name="adamw", lr=2e-3, lr_batch_scale=0, weight_decay=1e-4,
                           warmup_epochs=0.1)
        c.aug.update(crop_scale=(0.35, 1.0))
        c.ckpt_every_steps = 200

    common.set_model(c, a.model)  # after the preset: a ViT's optimiser wins
    common.set_budget(c, a.budget, BUDGET)
    if a.runlocal:
        common.runlocal(c)
    return c
