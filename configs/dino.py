r"""DINO (Caron et al. 2021): self-distillation with no labels, with DINOv2's options.

  python -m ssl_jax.train --config configs/dino.py:dataset=fashion_mnist --workdir runs/dino
  python -m ssl_jax.evaluate --workdir runs/dino --eval linear,knn      # the teacher's numbers

Arguments after the colon: dataset=fashion_mnist|cifar10|imagenet2012; model=NAME (the
preset's encoder otherwise: a ViT on fashion_mnist and imagenet2012, cifar10's ResNet-18;
model=convnet is the 4-block ConvNet, model=resnet50 DINO's ResNet-50 recipe);
local_crops=L; runlocal (a one-minute smoke run); and DINOv2's options, each off unless
named: koleo (KoLeo, weight 0.1), sinkhorn (Sinkhorn-Knopp centring, 3 iterations),
ibot (iBOT's masked-patch loss, weight 1.0, a ViT), registers=R, layerscale=V. E.g.
  python -m ssl_jax.train --config configs/dino.py:dataset=fashion_mnist,model=convnet --workdir runs/dino_conv
  python -m ssl_jax.train --config configs/dino.py:dataset=fashion_mnist,koleo,ibot,registers=4 --workdir runs/dinov2ish
--config.dino.export=student evaluates and exports the student instead of the teacher.

Presets (RECIPES.md, "DINO", has every value with its source):
- imagenet2012: the authors' ViT-S/16 "boosted" run (dino README, "Boosting DINO
  performance", full command; the rest main_dino.py's defaults): 300 epochs, B=1024
  (64 per GPU x 16), teacher temperature 0.04 -> 0.07 over 30 epochs, norm_last_layer
  false, K=65536, AdamW lr 5e-4 x B/256 warmed up 10 epochs then cosine to 1e-6, weight
  decay 0.04 -> 0.4, per-tensor clipping at 3.0, last layer frozen 1 epoch, drop path 0.1,
  2 x 224 px (0.4, 1) + 8 x 96 px (0.05, 0.4) crops. model=resnet50: the README's ResNet-50
  command (SGD, weight decay 1e-4 constant, crops (0.14, 1) / (0.05, 0.14)), lr 0.03.
- cifar10: solo-learn's (scripts/pretrain/cifar/dino.yaml + solo/methods/dino.py
  defaults): ResNet-18, head 2048 -> 256 -> K=4096, teacher EMA 0.9995 -> 1, teacher
  temperature 0.04 -> 0.07 over 50 epochs, LARS lr 0.3 x B/256, wd 1e-6, B=256, 1000
  epochs, two crops, no clipping; model=vit_tiny|vit_small: patch 4, 2 x 32 px + local
  crops of 16 px.
- fashion_mnist: ours, sized for a 2-core CPU (RESULTS.md has its numbers).
"""
import copy

from ml_collections import config_dict

from ssl_jax.config import sibling

common = sibling(__file__, "common")

# The encoder of each preset when model= is not given: DINO's ViT-S/16 on ImageNet,
# solo-learn's ResNet-18 on CIFAR-10, a small ViT on Fashion-MNIST.
DEFAULT_MODEL = {"imagenet2012": "vit_small", "cifar10": "resnet18",
                 "fashion_mnist": "vit_tiny"}


# budget=10m|30m|2h on fashion_mnist (configs/common.set_budget): the length that fits
# the budget on this 2-core CPU, and what the budget's sweeps changed. Measured (linear
# top-1, final block; benchmarks/RESULTS.md, Quality per CPU-hour):
#   10m: 84.90% in 9.9 CPU-min (ConvNet).
BUDGET = {"10m": dict(steps=530), "30m": dict(steps=1680), "2h": dict(steps=6850)}


def get_config(arg=None):
    a = common.parse_arg(arg, dataset="fashion_mnist", model="", runlocal=False, budget="",
                         local_crops=-1, koleo=False, sinkhorn=False, ibot=False,
                         registers=0, layerscale=0.0)
    c = common.base("dino", a.dataset)
    del c.head  # DINO's head is config.dino's
    c.dino = dict(
        # The head (vision_transformer.py DINOHead): 3 layers, GELU, no BN.
        out_dim=65536, hidden=2048, bottleneck=256, head_layers=3, norm_last_layer=True,
        student_temp=0.1, teacher_temp=0.04, warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=0, center_momentum=0.9, momentum_teacher=0.996,
        global_crops=2, local_crops=8, local_size=96, global_scale=(0.4, 1.0),
        local_scale=(0.05, 0.4), export="teacher",
        # DINOv2's options (dinov2/configs/ssl_default_config.yaml), off unless asked for.
        koleo_weight=0.0, centering="centering", sinkhorn_iterations=3,
        ibot_weight=0.0, ibot_mask_ratio=(0.1, 0.5), ibot_mask_prob=0.5,
        # The collapse warning (methods/dino.py watch): teacher entropy above `uniform` x
        # ln K, or its batch average's below `one` x ln K, for `patience` log steps.
        collapse=dict(uniform=0.95, one=0.05, patience=5))
    # main_dino.py's optimiser: AdamW, lr 5e-4 x B/256, 10 warm-up epochs, cosine to 1e-6;
    # weight decay 0.04 -> 0.4 on all but biases and 1-d arrays (get_params_groups);
    # each parameter's gradient clipped at 3.0; the last layer frozen for 1 epoch.
    c.optimizer.update(name="adamw", lr=5e-4, lr_batch_scale=256, weight_decay=0.04,
                       weight_decay_end=0.4, decay_bn=False, decay_bias=False, b1=0.9,
                       b2=0.999, schedule="cosine", end_lr=1e-6, clip_per_tensor=3.0,
                       frozen_params="head/last_layer",
                       freeze_steps=config_dict.placeholder(int),
                       freeze_epochs=config_dict.placeholder(float),
                       freeze_examples=config_dict.placeholder(int))
    c.optimizer.freeze_epochs = 1.0
    c.optimizer.warmup_epochs = 10.0
    # DINO's eval_knn.py: T = 0.07, k in (10, 20, 100, 200), 20 the number it reports.
    c.eval.knn.update(k=20, temperature=0.07, also_k=(10, 100, 200))
    d = c.dino
    model = a.model or DEFAULT_MODEL.get(a.dataset, c.model.name)
    if a.budget and not a.model:
        # The budget presets train the ConvNet: the 4-block ViT takes ~6 CPU-s a step here
        # (85 steps in 10 CPU-min) and learned far less per CPU-minute (benchmarks/
        # RESULTS.md, DINO on Fashion-MNIST: 86.38% linear in 22.7 CPU-min vs 71.95% in 28.4).
        model = "convnet"

    if a.dataset == "imagenet2012":
        c.batch_size = 1024
        c.total_epochs = 300.0
        d.update(teacher_temp=0.07, warmup_teacher_temp_epochs=30, norm_last_layer=False)
        c.ckpt_every_epochs = 1.0
    elif a.dataset == "cifar10":
        c.batch_size = 256
        c.total_epochs = 1000.0
        d.update(out_dim=4096, momentum_teacher=0.9995, teacher_temp=0.07,
                 warmup_teacher_temp_epochs=50, local_crops=0, global_scale=(0.08, 1.0))
        if model not in common.VITS:  # a ViT keeps DINO's AdamW (main_dino.py)
            c.optimizer.update(name="lars", lr=0.3, weight_decay=1e-6, weight_decay_end=None,
                               clip_per_tensor=0.0, end_lr=0.0)
        c.ckpt_every_epochs = 10.0
    else:
        # Ours, for a 2-core CPU: a 4-block ViT-Ti/4 (the SimCLR ViT run's encoder), a
        # smaller head (K=4096 as solo-learn's small-image runs), a teacher that follows
        # faster (0.99: a run of a few hundred steps), lr 1e-3 x B/256 as vit_optimizer's.
        c.batch_size = 128
        c.total_epochs = 2.0
        d.update(out_dim=4096, hidden=1024, momentum_teacher=0.99, local_crops=6,
                 local_size=12)
        c.optimizer.update(lr=1e-3)
        common.set_steps(c.optimizer, "warmup", None)
        c.optimizer.warmup_epochs = 0.2
        common.set_steps(c.optimizer, "freeze", None)
        c.optimizer.freeze_epochs = 0.2
        c.ckpt_every_steps = 200

    if model in common.VITS:
        optimizer = copy.deepcopy(c.optimizer)
        common.set_model(c, model)
        c.optimizer = optimizer  # DINO's AdamW, not set_model's generic ViT one
        c.model.drop_path = 0.1  # the student's (main_dino.py drop_path_rate; the teacher: 0)
        if a.dataset == "fashion_mnist" and not a.model:
            c.model.depth = 4
        if a.dataset == "cifar10":  # 32 px: 4 x 4 patches of 4 px in the local crops
            d.update(local_crops=6, local_size=16, global_scale=(0.4, 1.0),
                     local_scale=(0.05, 0.4))
        c.model.registers = a.registers
        if a.layerscale:
            c.model.layerscale = a.layerscale
    else:
        common.set_model(c, model)
        if a.registers or a.layerscale:
            raise common.UserError("registers= and layerscale= are ViT options: add "
                                   "model=vit_small (or another ViT).")
    if model.startswith("resnet") and a.dataset == "imagenet2012":
        # The README's ResNet-50 command: SGD, wd 1e-4 constant, crops (0.14, 1) / (0.05, 0.14).
        c.optimizer.update(name="sgd", lr=0.03, momentum=0.9, weight_decay=1e-4,
                           weight_decay_end=1e-4)
        d.update(global_scale=(0.14, 1.0), local_scale=(0.05, 0.14))
    if a.local_crops >= 0:
        d.local_crops = a.local_crops
    if a.koleo:
        d.koleo_weight = 0.1  # dinov2 ssl_default_config.yaml dino.koleo_loss_weight
    if a.sinkhorn:
        d.centering = "sinkhorn_knopp"
    if a.ibot:
        d.ibot_weight = 1.0  # ibot.loss_weight; mask ratio (0.1, 0.5), probability 0.5
        c.model.mask_token = True

    common.set_budget(c, a.budget, BUDGET)
    if a.runlocal:
        common.runlocal(c)
        d.update(out_dim=256, hidden=128, bottleneck=64)
        common.set_steps(c.optimizer, "freeze", 3)
    return c
