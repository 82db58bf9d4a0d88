r"""Contrastive Multiview Coding (Tian, Krishnan & Isola 2019) over M augmented views of
every image: CMC's two-view loss summed over a core view or a full graph of view pairs,
in-batch softmax (ssl_jax/methods/polyview.py, ssl_jax/multiview.py cmc).

  python -m ssl_jax.train --config configs/cmc.py:dataset=fashion_mnist --workdir runs/cmc
  python -m ssl_jax.evaluate --workdir runs/cmc --eval linear,knn
  python -m ssl_jax.train --config configs/cmc.py:dataset=fashion_mnist,runlocal --workdir W3
  python -m ssl_jax.train --config configs/cmc.py:dataset=fashion_mnist,runlocal,graph=full,views=3 --workdir W4

Arguments after the colon: dataset=fashion_mnist|cifar10|imagenet2012, model=NAME,
runlocal, objective=softmax|nce (also --config.cmc.objective), views=M (M augmented crops of each image, M >= 2; on fashion_mnist also the
batch K = 256 / M and the length, SimCLR's preset's compute; --config.views.count=M
changes M alone), graph=core|full (also --config.cmc.graph: view 0 against each other
view, M - 1 pairs, or every pair, M (M - 1) / 2), local_crops=L, local_size=S.

views=channels: the paper's views, the L and ab channels of Lab of one crop, each through
its own encoder of half the width (HobbitLong/CMC models/resnet.py ResNetV1, dataset.py
RGB2Lab), one head each; model=cmc_lab over the preset's encoder (or model=NAME's), the
authors' view (crop and flip, no colour distortion), probes reading the halves'
concatenation (block4 / stage4) or either half (--stages l_stage4,ab_stage4):
  python -m ssl_jax.train --config configs/cmc.py:dataset=imagenet2012,views=channels --workdir runs/cmc_lab
  python -m ssl_jax.evaluate --workdir runs/cmc_lab --eval linear --stages stage4,l_stage4,ab_stage4
A dataset that is not RGB (fashion_mnist) refuses views=channels in one line saying why.

objective=nce: the authors' NCE with a memory bank per view instead of the in-batch
softmax (NCEAverage / NCECriterion; train_CMC.py without --softmax): K = config.cmc.nce_k
negatives from the banks (16384, --nce_k; ours 4096 on fashion_mnist, 1024 runlocal),
bank momentum config.cmc.nce_momentum = 0.5 (--nce_m), Z fixed after the first batch:
  python -m ssl_jax.train --config configs/cmc.py:dataset=imagenet2012,views=channels,objective=nce --workdir runs/cmc_nce
Otherwise the views are augmented crops through one encoder. The rest of imagenet2012 is
the authors' train_CMC.py and README ResNet-50 command with --softmax (an in-batch
softmax stands for their softmax over a memory bank's 16384 negatives). fashion_mnist is
ours (SimCLR's preset's optimiser and compute) with CMC's loss, temperature and head.
RECIPES.md, CMC, lists every value with its source.
"""
from ssl_jax.config import sibling
from ssl_jax.errors import UserError
from ssl_jax.methods.polyview import channels_refusal

common = sibling(__file__, "common")
polyview = sibling(__file__, "polyview")


def get_config(arg=None):
    a = common.parse_arg(arg, dataset="fashion_mnist", model="", runlocal=False, views="",
                         graph="core", objective="softmax", local_crops=0, local_size=0)
    channels = a.views == "channels"
    if channels:
        _check_channels(a)
        a.views = ""  # M is the two channel groups; the rest of the arguments as for crops
    c = polyview.get_config(f"dataset={a.dataset},model={a.model}")
    c.method = "cmc"
    del c.polyview
    if a.graph not in ("core", "full"):
        raise UserError(f"Config argument graph={a.graph!r}: CMC's graphs are core (view 0 "
                        "against each other view) and full (every pair).")
    if a.objective not in ("softmax", "nce"):
        raise UserError(f"Config argument objective={a.objective!r}: CMC's objectives are "
                        "softmax (in-batch) and nce (memory banks).")
    # objective=nce (train_CMC.py, NCEAverage): nce_k negatives (--nce_k 16384), bank
    # momentum --nce_m 0.5; pad_to: bank rows a multiple of it (NPID's, configs/npid.py).
    c.cmc = dict(graph=a.graph, objective=a.objective, nce_k=16384, nce_momentum=0.5,
                 pad_to=1024)
    if a.dataset == "fashion_mnist":
        c.cmc.nce_k = 4096  # ours: NPID's K on its 60,000 rows, as configs/npid.py
    # The method's own, every preset (train_CMC.py): nce_t 0.07; the head one linear
    # layer to feat_dim 128, L2-normalised in the loss (models/resnet.py: fc, Normalize).
    c.multiview.update(loss="cmc", temperature=0.07)
    c.head.update(layers=1, dim=128, hidden_bn=False, out_bn=False)

    if a.dataset == "imagenet2012":
        # train_CMC.py's defaults and the README's ResNet-50 command (--batch_size 128);
        # two views, as the paper's L and ab.
        # Crops of (0.08, 1): train_CMC.py sets crop_low 0.08 for a ResNet on ImageNet
        # (0.2 is AlexNet's), SimCLR's already.
        polyview.set_views(c, 2)
        if a.model not in common.VITS:  # a ViT keeps MoCo v3's recipe (configs/simclr.py)
            c.batch_size = 128
            c.total_epochs = 240.0
            c.optimizer.update(name="sgd", lr=0.03, lr_batch_scale=0, momentum=0.9,
                               nesterov=False, weight_decay=1e-4, decay_bn=True,
                               decay_bias=True, schedule="step", decay_factor=0.1)
            common.set_steps(c.optimizer, "warmup", None)
            common.set_steps(c.optimizer, "decay", None)
            c.optimizer.decay_epochs = (120.0, 160.0, 200.0)
    polyview.apply_args(c, a)
    if a.runlocal:
        common.runlocal(c)
        c.cmc.nce_k = 1024  # as configs/npid.py's runlocal
    if channels:  # after runlocal: it shrinks the encoder that the split model wraps
        set_channel_views(c)
    return c


def _check_channels(a) -> None:
    """views=channels on an RGB dataset and a convolutional encoder, no local crops."""
    n = len(common.DATASETS[a.dataset]["mean"]) if a.dataset in common.DATASETS else None
    if n is not None and n != 3:
        raise UserError(channels_refusal(n, a.dataset))
    if a.model in common.VITS:
        raise UserError(f"views=channels with model={a.model}: the L and ab halves are built "
                        "for the ConvNet, ResNets and NIN (their widths halve).")
    if a.local_crops:
        raise UserError("views=channels takes one crop of each image (its L and ab are the "
                        "two views): drop local_crops.")


def set_channel_views(c) -> None:
    """CMC's channel views: config.model = cmc_lab over the config's encoder (its fields at
    full width; each half is built at half: models/split.py), undoing config.aug's
    normalisation; views.kind = channels (M = 2: L and ab); the authors' view, crop and
    flip only (train_CMC.py get_train_loader: RandomResizedCrop, RandomHorizontalFlip,
    RGB2Lab; no colour distortion, which would blur the very colour statistics ab holds)."""
    inner = c.model.to_dict()
    c.model = dict(name="cmc_lab", encoder=inner.pop("name"), **inner,
                   mean=tuple(c.aug.mean), std=tuple(c.aug.std))
    c.views.update(kind="channels", count=2, local_crops=0)
    c.aug.update(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
