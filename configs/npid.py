r"""NPID (Wu et al. 2018) — instance discrimination: a memory bank of every
image's embedding, NCE against negatives drawn from it. PIRL without its jigsaw
branch; both run ssl_jax/methods/pirl.py.

  python -m ssl_jax.train --config configs/npid.py:dataset=fashion_mnist --workdir runs/npid
  python -m ssl_jax.evaluate --workdir runs/npid --eval linear,knn

Arguments after the colon: dataset=fashion_mnist|cifar10|imagenet2012, model=NAME,
runlocal. Any field can be overridden: --config.memory.negatives=16384
--config.memory.loss=infonce.

The imagenet2012 and cifar10 presets are the authors' (zhirongw/lemniscate.pytorch
main.py and cifar.py); fashion_mnist is ours, sized for a 2-core CPU. RECIPES.md
lists every setting against the reference.

model=vit_tiny|vit_small|vit_base: a ViT (configs/common.set_model): patch 4 on 28/32 px
data (AdamW, ours), 16 on ImageNet (AdamW, MoCo v3's values, this preset's length:
ours). RECIPES.md, ViT presets.
"""
from ssl_jax.config import sibling

common = sibling(__file__, "common")
# The datasets with the papers' recipes; every other dataset gets ours (Fashion-MNIST's,
# sized for a 2-core CPU), as in the other configs: a preset must set a length.
PAPER_PRESETS = ("imagenet2012", "cifar10")


def memory_base(method: str, arg):
    """What NPID and PIRL share: the bank, the linear head, and the Fashion-MNIST
    preset's budget -> (config, parsed arguments). Each method's config sets its
    own views, optimiser and per-dataset recipe on top."""
    a = common.parse_arg(arg, dataset="fashion_mnist", model="", runlocal=False, budget="")
    c = common.base(method, a.dataset)
    # The bank has one row per training image: as many as the prepared train split has.
    # momentum: the bank's moving average; pad_to: bank rows are a multiple of it,
    # so the bank splits evenly over any power-of-two device count up to 1024.
    # init: "random" rows (the papers) or "encoder" (methods/pirl.warm_start).
    c.memory = dict(pad_to=1024, momentum=0.5, negatives=4096, temperature=0.07, loss="nce",
                    init="random")
    c.head.update(dim=128, layers=1)  # a linear projection to 128-d (with a bias), as both papers
    c.optimizer.update(name="sgd", lr=0.03, lr_batch_scale=256, momentum=0.9, weight_decay=1e-4)

    if a.dataset not in PAPER_PRESETS:
        # Ours, sized for a 2-core CPU: a few epochs in ~10 minutes, cosine. A bank row
        # moves once per epoch, so a larger lr than ImageNet's makes the few count.
        # BN and biases undecayed, as measured (benchmarks/RESULTS.md).
        c.batch_size = 256
        c.total_epochs = 4.0
        c.optimizer.update(lr=0.1, warmup_epochs=0.2, decay_bn=False, decay_bias=False)
        c.ckpt_every_steps = 200
        # Random rows make the first epoch's positives noise: at a few epochs
        # that is most of the run (pirl.warm_start).
        c.memory.init = "encoder"
    return c, a


# budget=10m|30m|2h on fashion_mnist (configs/common.set_budget): the length that fits
# the budget on this 2-core CPU, and what the budget's sweeps changed. Measured (linear
# top-1, final block; benchmarks/RESULTS.md, Quality per CPU-hour):
#   10m: 86.84% in 9.1 CPU-min.
BUDGET = {"10m": dict(steps=1130), "30m": dict(steps=3670), "2h": dict(steps=15080)}


def get_config(arg=None):
    c, a = memory_base("npid", arg)
    # The image view is augment.npid_view_config (methods/pirl.image_view_config):
    # crop (0.2, 1), grayscale 0.2, ColorJitter(0.4, 0.4, 0.4, 0.4) always, flip.
    # SGD(model.parameters(), weight_decay=...): every parameter is decayed.
    if a.dataset in PAPER_PRESETS:
        c.optimizer.update(decay_bn=True, decay_bias=True)
    if a.dataset == "imagenet2012":
        # main.py: B=256, lr 0.03, wd 1e-4, x0.1 at epochs 120 and 160 of 200, K=4096,
        # tau 0.07, m 0.5. BN per GPU (DataParallel) of 32 images: VISSL's replication
        # runs 8 x 32 (npid_8gpu_resnet.yaml).
        c.batch_size = 256
        c.total_epochs = 200.0
        c.optimizer.update(schedule="step", decay_factor=0.1, decay_epochs=(120.0, 160.0))
        c.model.bn_groups = 8
        c.ckpt_every_epochs = 1.0
    elif a.dataset == "cifar10":
        # cifar.py: B=128, lr 0.03 (unscaled), wd 5e-4, x0.1 at 120 and 160 of 200,
        # K=4096, tau 0.1, no flip, jitter before grayscale; one GPU: BN over the batch.
        c.batch_size = 128
        c.total_epochs = 200.0
        c.optimizer.update(lr=0.03, lr_batch_scale=128, weight_decay=5e-4, schedule="step",
                           decay_factor=0.1, decay_epochs=(120.0, 160.0))
        c.memory.temperature = 0.1
        c.aug.update(flip_p=0.0, grayscale_first=False)
        c.ckpt_every_epochs = 10.0

    common.set_model(c, a.model)  # after the preset: a ViT's optimiser wins
    common.set_budget(c, a.budget, BUDGET)
    if a.runlocal:
        common.runlocal(c)
        c.memory.negatives = 1024
    return c
