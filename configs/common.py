"""Pieces shared by every experiment config: argument parsing, dataset presets,
and the fields every run has. Each configs/<method>.py builds on `base()`,
loading this file by path: `common = sibling(__file__, "common")` (configs/
is a folder of files, not a package).
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from ssl_jax import models
from ssl_jax.errors import UserError
from ssl_jax.eval import defaults as eval_defaults

# Per-dataset input facts and the encoder that suits the hardware it is used on.
# mean/std are per channel, on pixel values scaled to [0, 1].
# mlp_hidden: RotNet's MLP probe has min(20 x classes, 2048) hidden units
# (FeatureLearningRotNet architectures/NonLinearClassifier.py): 200 for 10 classes.
DATASETS = {
    "fashion_mnist": dict(crop_size=28, mean=(0.2860,), std=(0.3530,), test_split="test",
                          mlp_hidden=200,
                          # conv: the matmul weight gradient (models/conv.py), ~2x faster on CPUs.
                          model=dict(name="convnet", widths=(32, 64, 128, 256), dtype="float32",
                                     conv="im2col_wgrad")),
    # Synthetic videos of Fashion-MNIST garments on a 64x64 canvas (datasets/videos.py): the
    # garment spans ~30 px. Views of 48 px: a 64 px view costs 1.8x more on a CPU.
    "fashion_mnist_videos": dict(crop_size=48, mean=(0.0627,), std=(0.1924,),
                                 test_split="test", mlp_hidden=200,
                                 model=dict(name="convnet", widths=(32, 64, 128, 256),
                                            dtype="float32", conv="im2col_wgrad")),
    # Real video frames (datasets/video_folders.py: GOT-10k's layout, shorter side 256, sizes
    # vary: decoded onto config.data.canvas); ImageNet's statistics and encoder.
    "got10k_videos": dict(crop_size=224, mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225), test_split="test", mlp_hidden=2048,
                          model=dict(name="resnet50", stem="imagenet", width=1.0,
                                     dtype="bfloat16")),
    "cifar10": dict(crop_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                    test_split="test", mlp_hidden=200,
                    model=dict(name="resnet18", stem="small", width=1.0, dtype="float32")),
    "imagenet2012": dict(crop_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                         test_split="validation", mlp_hidden=2048,
                         model=dict(name="resnet50", stem="imagenet", width=1.0, dtype="bfloat16")),
}


# How a boolean config argument may be spelt (as absl's boolean flags, plus yes/no);
# anything else is refused: `runlocal=on` read as False started the full run.
TRUE, FALSE = ("true", "t", "1", "yes"), ("false", "f", "0", "no")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'dataset=cifar10,runlocal' -> ConfigDict(dataset='cifar10', runlocal=True, ...).

    Only keys given in `defaults` are accepted; values take the default's type. A
    boolean is a bare name (`runlocal`) or name=true|false (also t/f, 1/0, yes/no);
    any other value of any type is a UserError naming the argument.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        if key not in defaults:
            raise UserError(f"Unknown config argument {key!r}; valid: {sorted(defaults)}.")
        default = defaults[key]
        if isinstance(default, bool):
            if not eq or value.lower() in TRUE:
                out[key] = True
            elif value.lower() in FALSE:
                out[key] = False
            else:
                raise UserError(f"Config argument {item!r}: {key} is true or false; write "
                                f"{key} (or {key}=true) to set it, {key}=false to unset it.")
        elif not eq:
            raise UserError(f"Config argument {key!r} needs a value: {key}=VALUE "
                            f"(default {default!r}).")
        elif default is None or isinstance(default, str):
            out[key] = value
        else:
            try:
                out[key] = type(default)(value)
            except ValueError:
                raise UserError(f"Config argument {item!r}: {key} takes a "
                                f"{type(default).__name__} (default {default!r}).") from None
    return ml_collections.ConfigDict(out)


def base(method: str, dataset: str) -> ml_collections.ConfigDict:
    """Fields every run has, with the dataset preset applied."""
    if dataset not in DATASETS:
        raise UserError(f"dataset={dataset!r} has no preset; known: {sorted(DATASETS)} "
                        "(add one to configs/common.py).")
    ds = DATASETS[dataset]
    c = ml_collections.ConfigDict()
    c.method = method
    c.seed = 0
    c.dataset = dataset
    c.data_dir = config_dict.placeholder(str)  # None: TFDS's default, ~/tensorflow_datasets
    c.train_split = "train"
    # worker_count: grain processes decoding per host, or "auto" (data/pipeline.py
    # worker_count: none for in-memory splits and on <= 2 cores, else a core each less
    # one). skip_corrupt: leave unreadable records out. canvas: datasets whose images
    # vary in size (imagenet2012, image folders) are decoded whole onto canvas x canvas
    # (shrunk only if larger) and every view is cropped from that on device
    # (data/decode.py); 512 holds ImageNet's common 500x375 whole. Unused for one-size
    # datasets.
    c.data = dict(worker_count="auto", skip_corrupt=False, canvas=512)
    c.batch_size = 256
    # Gradient accumulation: the loss runs on accumulate_steps micro-batches of
    # batch_size / accumulate_steps images, one optimizer update per step (memory for
    # a large batch on few devices). It must divide the per-device batch. Contrastive
    # losses then see the micro-batch's negatives only: ssl_jax/experiment.py.
    c.accumulate_steps = 1
    # Training length and intervals: set exactly one unit of each.
    for name in ("total", "log_every", "ckpt_every"):
        for unit, typ in (("steps", int), ("epochs", float), ("examples", int)):
            c[f"{name}_{unit}"] = config_dict.placeholder(typ)
    c.log_every_steps = 50
    c.keep_ckpts = 2
    # Stop (checkpoint saved, exit 0) once the run's processes have used this many
    # CPU-minutes, user + system, resumes included (ssl_jax/cpu_budget.py). None: no limit.
    c.cpu_budget_minutes = config_dict.placeholder(float)
    # True: resume the workdir's run under a changed config, for a change that keeps
    # every array of the train state (the length, intervals and learning rate, the batch
    # size, data_dir, evaluation); another method or model is refused (train.check_workdir).
    c.resume_from_different_config = False
    # A non-finite loss or gradient: "raise" (stop, naming the step) or "skip" (count it).
    c.nonfinite = "raise"

    c.model = dict(ds["model"])
    c.head = dict(hidden=512, dim=128, layers=2)
    c.aug = dict(crop_size=(ds["crop_size"],) * 2, mean=ds["mean"], std=ds["std"])
    # decay_bn / decay_bias: whether weight decay (and LARS's trust ratio) also applies
    # to BN's scale and shift / to the other biases; each method's config sets its
    # reference's choice (ssl_jax/optim.py, RECIPES.md).
    c.optimizer = dict(name="sgd", lr=0.1, lr_batch_scale=256, momentum=0.9, nesterov=False,
                       weight_decay=1e-4, decay_bn=False, decay_bias=False,
                       b1=0.9, b2=0.999, schedule="cosine",
                       warmup_steps=config_dict.placeholder(int),
                       warmup_epochs=config_dict.placeholder(float),
                       warmup_examples=config_dict.placeholder(int),
                       # schedule="step": lr x decay_factor at each boundary (one unit).
                       decay_factor=0.1, decay_steps=config_dict.placeholder(tuple),
                       decay_epochs=config_dict.placeholder(tuple),
                       decay_examples=config_dict.placeholder(tuple))
    # Online probes during pretraining (eval/online.py), off by default: a linear
    # head on the frozen features trained alongside, and kNN on the test split
    # every `every_*` (one unit). Never the numbers to report: see c.eval.
    c.online = dict(linear=False, lr=1e-3, knn_train_examples=10000,
                    every_steps=config_dict.placeholder(int),
                    every_epochs=config_dict.placeholder(float),
                    every_examples=config_dict.placeholder(int))
    # Offline evaluation (python -m ssl_jax.evaluate) of the frozen encoder: the
    # evaluators' defaults, one definition (runs stored before a field existed get it too).
    c.eval = eval_defaults(ds["test_split"])
    c.eval.mlp.hidden = ds["mlp_hidden"]
    return c


# Encoders the model=NAME argument builds as ViTs, and their sizes (ssl_jax/models).
VITS = models.VITS


def conv_model(name: str, dataset: str) -> dict:
    """config.model of ConvNet / ResNet / NIN `name` on `dataset`: the dataset's preset when
    it names the same encoder, else NAME's defaults written out (so that config.json shows
    them and --config.model.<field> can change them), with the dataset's dtype and conv; a
    ResNet's stem by the crop: CIFAR's 3x3 "small" stem up to 64 px, else "imagenet"."""
    preset = DATASETS[dataset]["model"]
    if name == preset["name"]:
        return dict(preset)
    fields = {k: preset[k] for k in ("dtype", "conv") if k in preset}
    if name == "nin":
        return dict(name=name, num_blocks=4, width=1.0, **fields)
    if name == "convnet":
        return dict(name=name, widths=(32, 64, 128, 256), **fields)
    if name.startswith("resnet"):
        stem = "small" if DATASETS[dataset]["crop_size"] <= 64 else "imagenet"
        return dict(name=name, stem=stem, width=1.0, **fields)
    return dict(name=name, **fields)  # an unknown name: make_encoder says which exist


def set_model(c: ml_collections.ConfigDict, name: str) -> None:
    """config.model for the config argument model=NAME ("" or the config's own encoder:
    unchanged).

    A ConvNet / ResNet / NIN: `conv_model`. A ViT gets its own fields for the dataset:
    patch 4 on images of <= 32 px (a 7x7 or 8x8 grid), 16 on larger ones (14x14 at 224),
    img_size = the crop (the grid its learned position table is stored for), the dataset's
    dtype; and the optimiser a ViT trains with (`vit_optimizer`): the config calls this
    after its dataset preset, so the ViT's choice wins over a ConvNet's SGD or LARS.
    """
    if not name or name == c.model.name:
        return
    if name not in VITS:
        c.model = conv_model(name, c.dataset)
        return
    crop = tuple(c.aug.crop_size)
    # The size is written out (width, depth, heads: "vit" alone is ViT-S) so that
    # config.json shows it and --config.model.depth=6 can change it.
    size = models.VIT_SIZES.get(name, models.VIT_SIZES["vit_small"])
    c.model = dict(name=name, **size, mlp_ratio=4.0, patch=4 if max(crop) <= 32 else 16,
                   img_size=crop, dtype=DATASETS[c.dataset]["model"]["dtype"],
                   pos_embed="learned", registers=0,
                   layerscale=config_dict.placeholder(float), drop_path=0.0)
    vit_optimizer(c)


def vit_optimizer(c: ml_collections.ConfigDict) -> None:
    """AdamW for a ViT: no ViT recipe trains with SGD or LARS at these batch sizes.

    ImageNet-size crops: MoCo v3's ViT recipe (Chen, Xie & He 2021, moco-v3 CONFIG.md:
    `--optimizer=adamw --lr=1.5e-4 --weight-decay=.1 --warmup-epochs=40`, cosine; its
    torch AdamW(model.parameters()) decays every parameter). Small images (ours, for a
    2-core CPU, not tuned): lr 1e-3 x B/256 (twice DINO's 5e-4 x B/256: a run of a few
    epochs), wd 0.05 (DINO's starting value), with DINO's exclusions (get_params_groups:
    biases and 1-d parameters, i.e. LayerNorm and LayerScale; the position table and
    class token are decayed, as there), warm-up 0.2 epochs; the schedule stays the
    preset's.
    """
    opt = c.optimizer
    if max(c.aug.crop_size) > 32:
        opt.update(name="adamw", lr=1.5e-4, lr_batch_scale=256, weight_decay=0.1, b1=0.9,
                   b2=0.999, schedule="cosine", decay_bn=True, decay_bias=True,
                   decay_steps=None, decay_epochs=None, decay_examples=None)
        set_steps(opt, "warmup", None)
        opt.warmup_epochs = 40.0
    else:
        opt.update(name="adamw", lr=1e-3, lr_batch_scale=256, weight_decay=0.05, b1=0.9,
                   b2=0.999, decay_bn=False, decay_bias=False)
        set_steps(opt, "warmup", None)
        opt.warmup_epochs = 0.2


def moco_v3_vit(c: ml_collections.ConfigDict) -> None:
    """The rest of MoCo v3's ViT-Small recipe on ImageNet (CONFIG.md, 300 epochs): B=1024,
    300 epochs, the fixed 2-D sin-cos position embedding, and the frozen random patch
    projection (Chen, Xie & He 2021, sec. 4.2; CONFIG.md's `--stop-grad-conv1`, vits.py):
    its kernel xavier-uniform as a linear layer's, its bias 0, neither ever trained
    (optimizer.untrained_params: no update, no decay, no Adam moments). The optimiser is
    `vit_optimizer`'s; each method keeps its own loss and head."""
    c.batch_size = 1024
    set_steps(c, "total", None)
    c.total_epochs = 300.0
    c.model.pos_embed = "sincos"
    c.model.patch_init = "xavier"
    c.optimizer.untrained_params = "encoder/patch_embed"


def video_positives(c: ml_collections.ConfigDict, positives: str) -> None:
    """config.video: where a two-view method's positive pair comes from (datasets/videos.py).

    positives: "frame" (two crops of one image, the usual), "temporal" (two frames of
    one video at most max_gap frames apart) or "region" (the object's box cropped in
    both frames, with a random margin of up to `context` of its size a side, resized to
    region_size: None = the frames' side). Purushwalkam & Gupta 2020, section 5.
    max_gap 4 is ours: a third of a 12-frame video, far enough for the viewpoint and
    light to change, close enough that the occluder of a run of frames often differs.
    """
    c.video = dict(positives=positives, max_gap=4, context=0.25,
                   region_size=config_dict.placeholder(int))


def set_steps(node: ml_collections.ConfigDict, name: str, steps: int | None) -> None:
    """node.{name}_steps = steps, and the interval's other units cleared: a preset that
    counts it in epochs (imagenet2012's ckpt_every_epochs) must not keep both."""
    for unit in ("epochs", "examples"):
        node[f"{name}_{unit}"] = None
    node[f"{name}_steps"] = steps


# The CPU budgets a fashion_mnist preset can be sized to (budget=NAME), in CPU-minutes.
BUDGETS = {"10m": 10.0, "30m": 30.0, "2h": 120.0}


def set_budget(c: ml_collections.ConfigDict, name: str, recipes: dict) -> None:
    """budget=NAME: the preset that does best in NAME of CPU time on fashion_mnist.

    recipes: {budget name: {"steps": N, "a.b": value, ...}}, the method config's own:
    the run's length (what fits the budget on the 2-core CPU it was measured on,
    benchmarks/budget.py --calibrate, with tcmalloc as run.sh runs it) and the fields
    that budget's sweeps changed. Sets config.cpu_budget_minutes (the guard: elsewhere a
    slower machine stops at the budget, ssl_jax/cpu_budget.py) and rescales a "step"
    schedule's decay boundaries with the length (they are fractions of the run).
    """
    if not name:
        return
    if name not in BUDGETS:
        raise UserError(f"Config argument budget={name!r}: the budgets are {list(BUDGETS)} "
                        "(CPU time; --config.cpu_budget_minutes=M sets any other).")
    if c.dataset != "fashion_mnist":
        raise UserError(f"budget={name} presets are measured on fashion_mnist only (dataset="
                        f"{c.dataset}); set --config.cpu_budget_minutes and the length instead.")
    if name not in recipes:
        raise UserError(f"{c.method} has no budget={name} preset (it has: {sorted(recipes)}).")
    recipe = dict(recipes[name])
    n = 60000  # Fashion-MNIST's train split
    before = (c.total_epochs if c.get("total_epochs") is not None  # the preset's, in epochs
              else (c.total_examples / n if c.get("total_examples") is not None
                    else c.total_steps * c.batch_size / n))
    for key, value in recipe.items():
        if key != "steps":
            node, _, leaf = key.rpartition(".")
            (c[node] if node else c)[leaf] = value
    steps = recipe["steps"]
    set_steps(c, "total", steps)
    opt = c.optimizer
    if opt.schedule == "step" and opt.get("decay_epochs") is not None:
        # Each boundary at the same fraction of the run as in the preset.
        after = steps * c.batch_size / n
        opt.decay_epochs = tuple(round(e * after / before, 4) for e in opt.decay_epochs)
    c.cpu_budget_minutes = BUDGETS[name]


def runlocal(c: ml_collections.ConfigDict) -> None:
    """Shrinks a run to a minute on a laptop: tiny model, a few dozen steps,
    at least one intermediate checkpoint, evaluation on a subset."""
    c.batch_size = 64
    set_steps(c, "total", 30)
    set_steps(c, "log_every", 10)
    set_steps(c, "ckpt_every", 20)
    # A preset's warm-up is epochs of the full run (imagenet2012: 10): all 30 steps would
    # be warm-up, at a rate near zero. A tenth of the run exercises the schedule instead.
    opt = c.optimizer
    if any(opt.get(f"warmup_{u}") for u in ("steps", "epochs", "examples")):
        set_steps(opt, "warmup", 3)
    if c.model.name == "convnet":
        c.model.widths = (8, 16, 32, 64)
    elif c.model.name in VITS:
        c.model.depth = 2  # the preset's width and heads, 2 of its 12 blocks
    else:
        c.model.width = 0.25
    if "head" in c:  # RotNet and Jigsaw-style classifiers have no projection head
        c.head.hidden, c.head.dim = 64, 32
    c.eval.train_examples = 5000
    c.eval.linear.epochs = 10
    c.eval.mlp.epochs = 5
    c.eval.lowshot.update(shots=(1, 8), seeds=(0, 1), steps=50)
