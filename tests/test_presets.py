"""Every preset in configs/ is one the train command accepts: each config file x each
dataset preset of configs/common.py, with and without `runlocal`, loads and passes
every check the train command runs on a config before training (the Experiment:
batch, units, the method's own checks, the model and views traced; no compilation),
on the data facts of that dataset. And the presets' arguments are parsed strictly.
"""
from __future__ import annotations

import os
import re
import shlex

import numpy as np
import pytest

from ssl_jax import config as cfg_lib
from ssl_jax import experiment, parallel
from ssl_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = cfg_lib.load_module(os.path.join(ROOT, "configs", "common.py"))
FILES = cfg_lib.config_files()

# What sources.dataset_info says of each preset's dataset once prepared (train split);
# None sizes: images of varying size, decoded onto the config's canvas.
INFO = {
    "fashion_mnist": (60000, (28, 28, 1), 10),
    "fashion_mnist_videos": (12011, (64, 64, 1), 10),
    "got10k_videos": (9335, (None, None, 3), 563),
    "cifar10": (50000, (32, 32, 3), 10),
    "imagenet2012": (1281167, (None, None, 3), 1000),
}


def _info(dataset):
    n, shape, classes = INFO[dataset]
    return {"num_examples": {"train": n}, "image_shape": shape, "num_classes": classes,
            "class_names": [str(i) for i in range(classes)], "features": ["image", "label"]}


def test_every_dataset_preset_has_its_facts_here():
    assert sorted(INFO) == sorted(COMMON.DATASETS)
    assert "configs/simclr.py" in FILES and "configs/common.py" not in FILES


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh()


@pytest.mark.parametrize("runlocal", ["", ",runlocal"], ids=["full", "runlocal"])
@pytest.mark.parametrize("dataset", sorted(INFO))
@pytest.mark.parametrize("path", FILES)
def test_every_preset_passes_the_train_commands_config_checks(path, dataset, runlocal, mesh):
    config = cfg_lib.load_file(f"{path}:dataset={dataset}{runlocal}")
    assert config.dataset == dataset
    exp = experiment.Experiment(config, experiment.data_spec(config, _info(dataset)), mesh)
    assert exp.total_steps >= 1 and exp.ckpt_every >= 1 and exp.log_every >= 1
    if runlocal:  # a smoke run: short, with a checkpoint before the end, past any warm-up
        assert exp.total_steps == 30 and exp.ckpt_every < exp.total_steps
        warmup = cfg_lib.steps(config.optimizer, "warmup", steps_per_epoch=exp.steps_per_epoch,
                               batch_size=config.batch_size, default=0)
        assert warmup < exp.total_steps // 2, warmup


# ------------------------------------------------------ ViT presets (model=vit_*)

NO_MODEL_ARGUMENT = {"configs/moco_video.py"}  # MoCo's config with video positives
REFUSE_VIT = {"configs/jigsaw.py", "configs/pirl.py"}  # tiles smaller than a ViT reads
VIT_CASES = [("fashion_mnist", "vit_tiny", ",runlocal"), ("fashion_mnist", "vit_tiny", ""),
             ("cifar10", "vit_tiny", ""), ("imagenet2012", "vit_small", "")]


@pytest.mark.parametrize("dataset, model, runlocal", VIT_CASES,
                         ids=["-".join(filter(None, (d, m, r[1:]))) for d, m, r in VIT_CASES])
@pytest.mark.parametrize("path", sorted(set(FILES) - NO_MODEL_ARGUMENT))
def test_every_vit_preset_passes_the_checks_or_is_refused_in_one_line(path, dataset, model,
                                                                      runlocal, mesh):
    config = cfg_lib.load_file(f"{path}:dataset={dataset},model={model}{runlocal}")
    spec = experiment.data_spec(config, _info(dataset))
    if path in REFUSE_VIT:
        with pytest.raises(UserError, match="use a ConvNet") as e:
            experiment.Experiment(config, spec, mesh)
        assert "\n" not in str(e.value)
        return
    m, crop = config.model, config.aug.crop_size
    assert m.name == model and tuple(m.img_size) == tuple(crop)
    assert m.patch == (16 if dataset == "imagenet2012" else 4)
    assert "widths" not in m and "conv" not in m  # no ConvNet field reaches the ViT
    assert config.optimizer.name == "adamw"
    exp = experiment.Experiment(config, spec, mesh)
    if runlocal:  # the smoke run's ViT: 2 blocks of the preset's width
        assert exp.total_steps == 30 and m.depth == 2
    if dataset == "imagenet2012" and path in ("configs/simclr.py", "configs/moco.py"):
        # MoCo v3's ViT-Small recipe (moco-v3 CONFIG.md), RECIPES.md's ViT rows.
        opt = config.optimizer
        assert (config.batch_size, config.total_epochs, m.pos_embed) == (1024, 300.0, "sincos")
        assert (opt.lr, opt.lr_batch_scale, opt.weight_decay, opt.warmup_epochs) == (
            1.5e-4, 256, 0.1, 40.0)
        assert opt.decay_bn and opt.decay_bias and opt.schedule == "cosine"


# ------------------------------------------------------ the presets' arguments

@pytest.mark.parametrize("path", FILES)
@pytest.mark.parametrize("value", ["on", "y", "tru", "2"])
def test_an_unknown_boolean_spelling_is_refused_by_every_config(path, value):
    with pytest.raises(UserError, match=rf"'runlocal={value}': runlocal is true or false"):
        cfg_lib.load_file(f"{path}:runlocal={value}")


@pytest.mark.parametrize("path", FILES)
def test_boolean_spellings_and_a_value_for_every_other_argument(path):
    full = cfg_lib.load_file(f"{path}:runlocal=false")
    for spelling in ("runlocal", "runlocal=true", "runlocal=1", "runlocal=YES"):
        small = cfg_lib.load_file(f"{path}:{spelling}")
        assert small.total_steps == 30 and small.batch_size == 64, spelling
    for spelling in ("runlocal=no", "runlocal=0", "runlocal=False"):
        assert cfg_lib.load_file(f"{path}:{spelling}").to_dict() == full.to_dict(), spelling
    with pytest.raises(UserError, match="'dataset' needs a value: dataset=VALUE"):
        cfg_lib.load_file(f"{path}:dataset")


# ---------------------------------------------------- configs/moco_video.py's commands

def _docstring_command(doc: str, dataset: str) -> dict:
    """The `python -m ssl_jax.prepare --dataset DATASET ...` command of a docstring
    (continuation lines joined) -> {flag: value}."""
    text = re.sub(r"\\\n\s*", "", doc)
    line = next((ln for ln in text.splitlines() if f"prepare --dataset {dataset}" in ln), None)
    assert line is not None, f"no `prepare --dataset {dataset}` command in the docstring"
    words = shlex.split(line.split("#")[0])
    words = words[words.index("--dataset"):]
    return dict(zip(words[::2], words[1::2]))


def test_moco_video_docstring_prepares_invariance_sets_the_videos_can_fill():
    """Its invariance sets command, run on fashion_mnist_videos as prepared by default,
    draws its sets (the default command's 30 sets of 8 a class do not fit the test
    split's 20 videos a class)."""
    from ssl_jax.datasets import invariance_sets, videos

    doc = cfg_lib.file_doc("configs/moco_video.py")
    args = _docstring_command(doc, "invariance_sets")
    assert args["--source"] == "fashion_mnist_videos"
    split = args.get("--source_split") or invariance_sets.default_split(["train", "test"])
    per_class = videos.DEFAULTS["videos_per_class"]
    per_class = per_class if split == "train" else max(1, per_class // 5)
    frames, classes = 12, 10
    labels = np.repeat(np.arange(classes), per_class * frames)
    first = np.tile(np.arange(frames), classes * per_class) == 0  # one frame a video
    sets = invariance_sets.choose_images(
        labels, [str(c) for c in range(classes)],
        int(args.get("--sets_per_class", invariance_sets.DEFAULTS["sets_per_class"])),
        int(args.get("--set_size", invariance_sets.DEFAULTS["set_size"])),
        invariance_sets.DEFAULTS["seed"], "fashion_mnist_videos", first)
    assert len(np.unique(sets)) == sets.size
    for dataset in ("fashion_mnist", "fashion_mnist_videos"):  # what the sets are made from
        assert _docstring_command(doc, dataset)["--dataset"] == dataset


@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar10", "imagenet2012"])
@pytest.mark.parametrize("model", ["convnet", "resnet18", "resnet50", "nin"])
def test_model_argument_builds_any_conv_encoder_on_any_dataset(dataset, model):
    """model=NAME keeps only the dataset encoder's fields the new one takes: `model=resnet18`
    on fashion_mnist was refused (ResNet got the ConvNet's widths), `model=convnet` on
    cifar10 too (ConvNet got the ResNet's stem)."""
    from ssl_jax.methods import network
    config = cfg_lib.load_file(f"configs/simclr.py:dataset={dataset},model={model}")
    assert config.model.name == model
    network.make_encoder(config.model)  # no UserError: every field is one the encoder takes
    if model.startswith("resnet"):
        assert config.model.stem == ("imagenet" if dataset == "imagenet2012" else "small")
