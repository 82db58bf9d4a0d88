r"""NPID (Wu et al. 2018) — instance discrimination: a memory bank of every
image's embedding, NCE against negatives drawn from it. PIRL without its jigsaw
branch; both run ssl_jax/methods/pirl.py.

  python -m ssl_jax.train --config configs/npid.py:dataset=fashion_mnist --workdir runs/npid
  python -m ssl_jax.evaluate --workdir runs/npid --eval linear,knn

Arguments after the colon: dataset=fashion_mnist|cifar10|imagenet2012, model=NAME,
runlocal. Any field can be overridden: --config.memory.negatives=16384
--config.memory.loss=infonce.
"""
from ssl_jax.config import sibling

common = sibling(__file__, "common")


def memory_base(method: str, arg):
    """The config shared by NPID and PIRL: -> (config, parsed arguments)."""
    a = common.parse_arg(arg, dataset="fashion_mnist", model="", runlocal=False)
    c = common.base(method, a.dataset)
    if a.model:
        c.model.name = a.model
    # The bank has one row per training image: as many as the prepared train split has.
    # momentum: the bank's moving average; pad_to: bank rows are a multiple of it,
    # so the bank splits evenly over any power-of-two device count up to 1024.
    # init: "random" rows (the papers) or "encoder" (methods/pirl.warm_start).
    c.memory = dict(pad_to=1024, momentum=0.5, negatives=4096, temperature=0.07, loss="nce",
                    init="random")
    c.head.update(dim=128, layers=1)  # a linear projection to 128-d, as both papers
    # NPID's view: crop (0.2, 1), colour jitter 0.4, grayscale 0.2, flip; no blur.
    c.aug.update(crop_scale=(0.2, 1.0), blur_p=0.0)
    # SGD, momentum 0.9, wd 1e-4, cosine; lr 0.03 per 256 images (0.12 at PIRL's 1024).
    c.optimizer.update(name="sgd", lr=0.03, lr_batch_scale=256, momentum=0.9, weight_decay=1e-4)

    if a.dataset == "imagenet2012":
        c.batch_size = 256
        c.total_epochs = 200.0
        c.ckpt_every_epochs = 1.0
    elif a.dataset == "cifar10":
        c.batch_size = 256
        c.total_epochs = 200.0
        c.optimizer.update(lr=0.03, weight_decay=5e-4)
        c.ckpt_every_epochs = 10.0
    else:
        # Sized for a 2-core CPU: a few epochs in ~10 minutes. A bank row moves
        # once per epoch, so a larger lr than ImageNet's makes the few count.
        c.batch_size = 256
        c.total_epochs = 4.0
        c.optimizer.update(lr=0.1, warmup_epochs=0.2)
        c.ckpt_every_steps = 200
        # Random rows make the first epoch's positives noise: at a few epochs
        # that is most of the run (pirl.warm_start).
        c.memory.init = "encoder"

    if a.runlocal:
        common.runlocal(c)
        c.memory.negatives = 1024
    return c, a


def get_config(arg=None):
    c, _ = memory_base("npid", arg)
    return c
