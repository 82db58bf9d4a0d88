r"""A folder of one's own images (the ImageFolder layout) as a TFDS dataset.

    python -m ssl_jax.prepare --dataset image_folder --manual_dir DIR --name NAME

DIR/train/<class>/*.jpg (and optionally DIR/val/ or DIR/validation/ -> split
`validation`, DIR/test/ -> `test`, each with class folders), or DIR/<class>/*.jpg
directly (all of it split `train`). Images may sit in subfolders of a class
folder; files whose names end otherwise than in IMAGE_EXTENSIONS, and hidden
ones, are not read. The dataset NAME, version 1.0.0, has imagenet2012's
features: `image` (JPEG; other formats and CMYK are converted to RGB JPEG at
quality 95, RGB and greyscale JPEGs are kept byte for byte), `label` (a
ClassLabel of the train split's class folder names, sorted), `file_name` (the
path under the split folder, e.g. "cat/0001.jpg"). Records are sorted by
file_name. Every image is decoded once as a check (base.check_images).
EXIF orientation is not applied (TFDS does not either).
"""
from __future__ import annotations

import os
import re

import tensorflow_datasets as tfds
from etils import epath

from ssl_jax.datasets import base
from ssl_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm", ".pbm")
SPLIT_FOLDERS = {"train": ("train",), "validation": ("val", "validation"), "test": ("test",)}
QUALITY = 95  # for re-encoded images: visually lossless at about half the bytes of 100
DATASET_VERSION = "1.0.0"
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def check_dataset_name(name: str | None) -> None:
    """A name of one's own for a TFDS dataset: snake_case, and not one TFDS defines."""
    if not _NAME.fullmatch(name or ""):
        raise UserError(f"--name {name!r} is not a valid TFDS dataset name: use lowercase "
                        "letters, digits and underscores, starting with a letter (e.g. my_images).")
    if name in tfds.list_builders(with_community_datasets=False):
        raise UserError(f"--name {name!r} is a dataset TFDS itself defines: readers would take "
                        "TFDS's definition of it, not this folder's. Choose another name.")


def split_folders(root: str) -> dict[str, str]:
    """{split: folder}: root/train, root/val|validation, root/test if root/train exists;
    else {"train": root}."""
    if not os.path.isdir(root):
        raise UserError(f"--manual_dir {root} is not a folder of images.")
    if not os.path.isdir(os.path.join(root, "train")):
        return {"train": root}
    out = {}
    for split, names in SPLIT_FOLDERS.items():
        found = [n for n in names if os.path.isdir(os.path.join(root, n))]
        if len(found) > 1:
            raise UserError(f"{root} has both {found[0]}/ and {found[1]}/: keep one as the "
                            "validation split.")
        if found:
            out[split] = os.path.join(root, found[0])
    return out


def list_images(folder: str) -> dict[str, list[str]]:
    """{class folder name: [image paths relative to `folder`, sorted]}, classes sorted."""
    classes = sorted(d for d in os.listdir(folder)
                     if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise UserError(f"{folder} holds no class folders: put each class's images in "
                        "a folder of its own, <class>/<image>.")
    out = {}
    for c in classes:
        files = []
        for parent, dirs, names in os.walk(os.path.join(folder, c), followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += [os.path.relpath(os.path.join(parent, n), folder) for n in names
                      if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise UserError(f"Class folder {os.path.join(folder, c)} holds no images "
                            f"(files ending in {', '.join(IMAGE_EXTENSIONS)}): add some or "
                            "remove the folder.")
        out[c] = sorted(files)
    return out


class _ImageFolder(base.StreamingBuilder, skip_registration=True):
    """Base of the builders that ImageFolder() makes, one class per dataset name."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Prepared from a folder of images (ssl_jax image_folder)."}
    code_path = epath.Path(__file__)  # see fashion_mnist.FashionMnist.code_path

    def __init__(self, *, manual_dir: str, skip_bad_images: bool = False, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        self.manual_dir = os.path.abspath(manual_dir)
        # Read (and check) the layout before TFDS asks for the features.
        self.folders = split_folders(self.manual_dir)
        self.images = {s: list_images(f) for s, f in self.folders.items()}
        self.class_names = list(self.images["train"])
        for split, classes in self.images.items():
            unknown = sorted(set(classes) - set(self.class_names))
            if unknown:
                raise UserError(f"{self.folders[split]} has class folder(s) {unknown} that "
                                f"{self.folders['train']} does not: every class needs "
                                "training images.")
        self.skip_bad_images = skip_bad_images
        self.bad_images: list[str] = []
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=f"Images of {self.manual_dir}, by class folder.",
            features=base.features(self.class_names), supervised_keys=("image", "label"),
            disable_shuffling=True)  # record i == the i-th file name in sorted order

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {s: self._examples(s) for s in self.images}

    def _examples(self, split: str):
        folder = self.folders[split]
        files = sorted((f, self.class_names.index(c))
                       for c, fs in self.images[split].items() for f in fs)

        def items():
            for file_name, label in files:
                path = os.path.join(folder, file_name)
                with open(path, "rb") as f:
                    data = f.read()
                yield (path, {"image": data, "label": label, "file_name": file_name})
        yield from base.check_images(
            items(), quality=QUALITY, skip=self.skip_bad_images, bad=self.bad_images,
            fix="Replace or delete the file")


def ImageFolder(*, name: str, manual_dir: str, **kwargs) -> _ImageFolder:  # noqa: N802
    """The builder of dataset `name` from the folder manual_dir; kwargs go to the builder
    (data_dir, skip_bad_images)."""
    check_dataset_name(name)
    dataset_name = name

    # A builder's name is a class attribute; skip_registration keeps it out of
    # TFDS's registry (readers find the dataset from its files).
    class Builder(_ImageFolder, skip_registration=True):
        name = dataset_name

    return Builder(manual_dir=manual_dir, **kwargs)
