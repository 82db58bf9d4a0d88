r"""ImageNet 2012 (ILSVRC2012) as TFDS's `imagenet2012`, prepared offline without TensorFlow.

    python -m ssl_jax.prepare --dataset imagenet2012 --manual_dir DIR [--data_dir D]

DIR holds the archives of https://image-net.org/download-images:
`ILSVRC2012_img_train.tar` (one `<synset>.tar` per class, of `<synset>_<n>.JPEG`),
`ILSVRC2012_img_val.tar` (flat `ILSVRC2012_val_XXXXXXXX.JPEG`) and, if present,
`ILSVRC2012_img_test*.tar` (split `test`, label -1). TFDS's own builder needs
TensorFlow; this one writes the dataset it writes: name, version (read from
TFDS's builder), features (`image` JPEG, `label` of TFDS's labels.txt synsets,
`file_name`), description, splits, array_record. Readers cannot tell them apart,
except in these chosen ways:
- record order: sorted by file name within a split, and kept (disable_shuffling),
  so record i means one image everywhere; TFDS's order is a hash of the name;
- every image is decoded once (PIL, truncated images refused): a zero-byte or
  undecodable image is an error naming it, or with skip_bad_images is left out
  (logged; counted at the end);
- CMYK and non-JPEG images (TFDS: 22 CMYK names, one PNG) are found by content
  and re-encoded as RGB JPEG at TFDS's quality, 100; greyscale JPEGs are kept;
- validation labels: TFDS pairs the sorted val image names with its
  validation_labels.txt (50000 lines). A `validation_labels.txt` in DIR replaces
  it, for a subset of the archive or a test fixture: one synset a line, for the
  val images in sorted name order.

Memory stays bounded: the tars are read member by member (headers first, to
sort), and records go straight to array_record shards of at most 1 GiB, in
order (`base.StreamingBuilder`). TFDS's own writer is not used: it buffers a split
in memory up to 1 GB, then in temporary bucket files written with
`tf.io.gfile`, so without TensorFlow it fails on any split over 1 GB (ImageNet's
train is ~140 GB, val 6.4 GB), and it needs twice the disk. Everything is
written in TFDS's `incomplete.*` folder, renamed into place only when every
split is written: a failure leaves nothing that looks prepared. A killed run
leaves that folder behind: delete it.
"""
from __future__ import annotations

import os
import tarfile
from collections.abc import Callable

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as tfds_imagenet
from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

from ssl_jax.datasets import base
from ssl_jax.errors import UserError

DOWNLOAD = "https://image-net.org/download-images"
TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
TEST_TARS = "ILSVRC2012_img_test*.tar"  # TFDS: ..._test.tar; image-net.org: ..._test_v10102019.tar
VAL_LABELS = "validation_labels.txt"
TFDS_QUALITY = 100  # tfds.core.utils.png_to_jpeg / jpeg_cmyk_to_rgb


def label_names() -> list[str]:
    """The 1000 synsets of TFDS's labels.txt, in its order."""
    return epath.Path(imagenet_common.label_names_file()).read_text().split()


# ------------------------------------------------------------ tars

def _normpath(name: str) -> str | None:
    """A member's name as TFDS records it; None for names TFDS skips (hidden, absolute)."""
    path = os.path.normpath(name)
    if (path.startswith(".") or os.path.isabs(path) or path.endswith("~")
            or os.path.basename(path).startswith(".")):
        return None
    return path


def _files(open_tar: Callable[[], tarfile.TarFile], what: str, fix: str):
    """-> (the open TarFile, [(file name, TarInfo)] of its regular files, sorted by name)."""
    try:
        tar = open_tar()
        members = tar.getmembers()  # headers only: seeks over the data
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{what} is not a readable tar archive ({type(e).__name__}: {e}). "
                        f"{fix}.") from e
    files = [(p, m) for m in members if m.isfile() and (p := _normpath(m.name))]
    return tar, sorted(files, key=lambda f: f[0])


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo, what: str, fix: str) -> bytes:
    try:
        return tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:  # the archive is cut or damaged
        raise UserError(f"{what} cannot be read from its archive ({type(e).__name__}: {e}). "
                        f"{fix}.") from e


class Imagenet2012(base.StreamingBuilder, skip_registration=True):
    """TFDS's imagenet2012 from the manually downloaded ILSVRC2012 tars; see the module doc."""

    name = "imagenet2012"
    VERSION = tfds_imagenet.Builder.VERSION
    RELEASE_NOTES = tfds_imagenet.Builder.RELEASE_NOTES
    MANUAL_DOWNLOAD_INSTRUCTIONS = tfds_imagenet.Builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    code_path = epath.Path(__file__)  # see fashion_mnist.FashionMnist.code_path

    def __init__(self, *, manual_dir: str | None = None, skip_bad_images: bool = False,
                 **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        # TFDS's default manual_dir.
        self.manual_dir = manual_dir or os.fspath(self.data_dir_root / "downloads" / "manual")
        self.skip_bad_images = skip_bad_images
        self.bad_images: list[str] = []  # members left out, with the reason

    def _info(self) -> tfds.core.DatasetInfo:
        meta = tfds_imagenet.Builder.get_metadata()  # TFDS's README.md and CITATIONS.bib
        return tfds.core.DatasetInfo(
            builder=self, description=meta.description, citation=meta.citation,
            features=base.features(label_names()), supervised_keys=("image", "label"),
            homepage="https://image-net.org/",
            disable_shuffling=True,  # record i == the i-th file name in sorted order
        )

    @property
    def _fix(self) -> str:
        return (f"The archive is damaged: download it again from {DOWNLOAD} into "
                f"{self.manual_dir}")

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        d = self.manual_dir
        train, val = os.path.join(d, TRAIN_TAR), os.path.join(d, VAL_TAR)
        missing = [p for p in (train, val) if not os.path.isfile(p)]
        if missing:
            raise UserError(
                f"ImageNet needs {TRAIN_TAR} and {VAL_TAR} in --manual_dir {d}; not found: "
                f"{', '.join(os.path.basename(p) for p in missing)}. Register and download "
                f"them at {DOWNLOAD} (ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar), "
                "then pass the folder that holds them as --manual_dir.")
        tests = sorted(epath.Path(d).glob(TEST_TARS))
        if len(tests) > 1:
            raise UserError(f"More than one test archive in {d}: {[t.name for t in tests]}; "
                            "keep one.")
        # Every listing and label is checked before anything is written.
        names = label_names()
        splits = {"train": self._train(train, names), "validation": self._validation(val, names)}
        if tests:
            tar, files = _files(lambda: tarfile.open(tests[0], "r:"), tests[0].name, self._fix)
            splits["test"] = self._examples(tar, files, tests[0].name, {n: -1 for n, _ in files})
        return splits

    def _train(self, path: str, names: list[str]):
        outer, inner = _files(lambda: tarfile.open(path, "r:"), TRAIN_TAR, self._fix)
        known = set(names)
        for name, _ in inner:
            if not name.endswith(".tar") or name[:-4] not in known:
                raise UserError(f"{TRAIN_TAR} holds {name!r}, which is not <synset>.tar of a "
                                f"synset of TFDS's imagenet2012 labels "
                                f"({imagenet_common.label_names_file()}).")
        return self._train_examples(outer, inner)

    def _train_examples(self, outer, inner):
        def items():
            for name, member in inner:
                what = f"{TRAIN_TAR}/{name}"
                tar, files = _files(lambda m=member: tarfile.open(fileobj=outer.extractfile(m),
                                                                  mode="r:"), what, self._fix)
                for file_name, m in files:
                    yield (f"{what}/{file_name}",
                           {"image": _read(tar, m, f"{what}/{file_name}", self._fix),
                            "label": name[:-4], "file_name": file_name})
        yield from self._checked(items())

    def _validation(self, path: str, names: list[str]):
        tar, files = _files(lambda: tarfile.open(path, "r:"), VAL_TAR, self._fix)
        own = os.path.join(self.manual_dir, VAL_LABELS)
        labels_file = own if os.path.isfile(own) else os.fspath(
            epath.Path(imagenet_common.label_names_file()).parent / VAL_LABELS)
        labels = epath.Path(labels_file).read_text().strip().splitlines()
        if len(labels) != len(files):
            raise UserError(
                f"{VAL_TAR} holds {len(files)} images but {labels_file} has {len(labels)} "
                f"labels. For a part of the archive, put a {VAL_LABELS} in {self.manual_dir}: "
                "one synset a line, for the val images in sorted name order.")
        unknown = sorted(set(labels) - set(names))
        if unknown:
            raise UserError(f"{labels_file} names synsets that are not ImageNet's: "
                            f"{unknown[:5]}")
        return self._examples(tar, files, VAL_TAR, dict(zip((n for n, _ in files), labels)))

    def _examples(self, tar, files, what, labels):
        def items():
            for file_name, m in files:
                yield (f"{what}/{file_name}",
                       {"image": _read(tar, m, f"{what}/{file_name}", self._fix),
                        "label": labels[file_name], "file_name": file_name})
        yield from self._checked(items())

    def _checked(self, items):
        yield from base.check_images(items, quality=TFDS_QUALITY, skip=self.skip_bad_images,
                                bad=self.bad_images, fix=self._fix)

