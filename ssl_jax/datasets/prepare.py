r"""The offline builders by name, and preparing one: the library under `python -m ssl_jax.prepare`.

    path, built = prepare("fashion_mnist", data_dir)            # what the command does
    builder = make_builder("imagenet2012", data_dir, manual_dir=DIR)

BUILDERS maps each dataset name to its builder (one module per dataset family in
ssl_jax/datasets/), OPTIONS the options each takes beyond data_dir. The
command's flags and what it prints are in ssl_jax/prepare.py.
"""
from __future__ import annotations

import tensorflow_datasets as tfds
from etils import epath

from ssl_jax.data import sources
from ssl_jax.datasets import (cifar, fashion_mnist, image_folder, imagenet, invariance_real,
                              invariance_sets, video_folders, videos)
from ssl_jax.errors import UserError

# dataset -> builder class (or factory) taking data_dir= and the options of OPTIONS.
BUILDERS = {
    "fashion_mnist": fashion_mnist.FashionMnist,
    "imagenet2012": imagenet.Imagenet2012,
    "cifar10": cifar.Cifar10,
    "cifar100": cifar.Cifar100,
    "image_folder": image_folder.ImageFolder,
    "invariance_sets": invariance_sets.InvarianceSets,
    "aloi_invariance": invariance_real.AloiInvariance,
    "got10k_occlusion": invariance_real.Got10kOcclusion,
    "pascal3d_instance": invariance_real.Pascal3dInstance,
    "fashion_mnist_videos": videos.FashionMnistVideos,
    "got10k_videos": video_folders.Got10kVideos,
}
# The options each builder takes, beyond data_dir.
OPTIONS = {
    "fashion_mnist": ("source_dir",),
    "imagenet2012": ("manual_dir", "skip_bad_images"),
    "cifar10": ("manual_dir",),
    "cifar100": ("manual_dir",),
    "image_folder": ("manual_dir", "name", "skip_bad_images"),
    "invariance_sets": ("source", "source_split", "sets_per_class", "set_size", "seed"),
    "aloi_invariance": ("manual_dir", "skip_bad_images", "aloi_objects", "frames_per_set"),
    "got10k_occlusion": ("manual_dir", "skip_bad_images", "frames_per_set", "max_tracks"),
    "pascal3d_instance": ("manual_dir", "skip_bad_images", "frames_per_set"),
    "fashion_mnist_videos": ("videos_per_class", "seed"),
    "got10k_videos": ("manual_dir", "skip_bad_images", "frame_size", "max_tracks"),
}
_FOLDERS = ("source_dir", "manual_dir")  # one option, two names
# Every option some builder takes but the folder: the flags main passes on.
ALL_OPTIONS = tuple(sorted({o for opts in OPTIONS.values() for o in opts} - set(_FOLDERS)))


def _given(value) -> bool:
    """Whether an option was given: None, False and "" are its defaults (0 is a value)."""
    return value is not None and value is not False and value != ""


def make_builder(dataset: str, data_dir: str | None = None, source_dir: str | None = None, *,
                 manual_dir: str | None = None, **options):
    """The builder of `dataset`; source_dir and manual_dir are one option, two names.
    options: any of ALL_OPTIONS (OPTIONS says which builder takes which; None, False
    or "": not given, the builder's default). An option given to a dataset that does
    not take it is a UserError naming the datasets that do."""
    if dataset not in BUILDERS:
        raise UserError(f"--dataset {dataset!r} is not one this command prepares: "
                        f"{', '.join(BUILDERS)}.{_tfds_builds(dataset, data_dir)}")
    unknown = sorted(set(options) - set(ALL_OPTIONS))
    if unknown:
        raise UserError(f"unknown preparation option(s) {unknown}; known: {list(ALL_OPTIONS)}")
    if source_dir and manual_dir and source_dir != manual_dir:
        raise UserError("--source_dir and --manual_dir name one folder: give one of them.")
    folder = manual_dir or source_dir
    given = dict(options, source_dir=folder, manual_dir=folder)
    name = options.get("name")
    if dataset == "image_folder":
        if not name:
            raise UserError("--dataset image_folder needs --name NAME, the dataset's name "
                            "(lowercase letters, digits, underscores).")
        if not folder:
            raise UserError("--dataset image_folder needs --manual_dir, the folder of images.")
    if folder and not set(_FOLDERS) & set(OPTIONS[dataset]):
        takers = " and ".join(d for d, o in OPTIONS.items() if set(_FOLDERS) & set(o))
        raise UserError(f"--manual_dir (--source_dir) is for {takers}, not {dataset}.")
    for option in ALL_OPTIONS:
        if _given(given.get(option)) and option not in OPTIONS[dataset]:
            raise UserError(f"--{option} is for "
                            f"{' and '.join(d for d, o in OPTIONS.items() if option in o)}, "
                            f"not {dataset}.")
    kwargs = {o: given[o] for o in OPTIONS[dataset] if o in given}
    return BUILDERS[dataset](data_dir=data_dir or sources.default_data_dir(), **kwargs)


def _tfds_builds(dataset: str, data_dir: str | None) -> str:
    """For a dataset TFDS defines: a sentence naming TFDS's own command."""
    try:
        tfds.builder_cls(dataset)
    except tfds.core.registered.DatasetNotFoundError:
        return ""
    where = f" --data_dir {data_dir}" if data_dir else ""
    return (f" TFDS's own tool builds it: `tfds build {dataset}{where} "
            "--file_format=array_record`.")


def build(builder) -> tuple[str, bool]:
    """Prepares the builder's dataset unless it is there -> (its folder, whether built now).
    A failure leaves no folder that it made: TFDS makes the data_dir, downloads/extracted
    and the dataset's folder before the builder reads its first file."""
    if builder.is_prepared():
        return str(builder.data_path), False
    root = epath.Path(builder.data_dir_root)
    made = [p for p in (builder.data_path, builder.data_path.parent, root / "downloads" /
                        "extracted", root / "downloads", root) if not p.exists()]  # deepest first
    try:
        builder.download_and_prepare()
    except BaseException:
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return str(builder.data_path), True


def prepare(dataset: str, data_dir: str | None = None, source_dir: str | None = None,
            **options) -> tuple[str, bool]:
    """Builds `dataset` under data_dir unless it is there already.

    options: manual_dir, name, skip_bad_images, source, source_split, sets_per_class,
    set_size, seed, aloi_objects, frames_per_set, max_tracks, videos_per_class,
    frame_size (see make_builder).
    Returns (the dataset's directory, whether it was built now).
    """
    return build(make_builder(dataset, data_dir, source_dir, **options))
