"""Fashion-MNIST as a TFDS array_record dataset, built offline from Debian's files.

`apt-get install dataset-fashion-mnist` puts the gzipped IDX files in
/usr/share/datasets/fashion-mnist/. Their bytes differ from the archives whose
checksums TFDS registers, so TFDS's own builder cannot use them; this one
writes the same dataset (name, version, features, splits) without TensorFlow:

    python -m ssl_jax.prepare --dataset fashion_mnist --data_dir DIR

Unlike TFDS's builder it keeps file order: record i of a split is example i
of the IDX files, so a dataset index means the same thing everywhere. Every
file is read and checked before anything is written (base.StreamingBuilder).
"""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ssl_jax.datasets import arrays, base
from ssl_jax.errors import UserError

SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL = "apt-get install dataset-fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {  # split: (images file, labels file)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class IdxError(UserError):
    """An IDX file is missing, truncated or not what its header says."""


def read_idx(path: str, ndim: int) -> np.ndarray:
    """A gzipped IDX file of uint8 values -> (d0, ..., d{ndim-1}) uint8.

    IDX header: two zero bytes, a type byte (0x08 = uint8), the number of
    dims, then each dim as a big-endian uint32; then the values.
    """
    if not os.path.exists(path):
        raise IdxError(f"{path} not found: install it with `{INSTALL}` "
                       "or pass the folder that holds the IDX files as --manual_dir")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # not gzip, or the stream is cut
        raise IdxError(f"{path} is not a readable gzip file ({e}); "
                       f"reinstall it with `{INSTALL} --reinstall`") from e
    head = 4 + 4 * ndim
    if len(raw) < head or raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise IdxError(f"{path}: IDX header {raw[:4].hex()} is not that of a "
                       f"{ndim}-d uint8 array (0000080{ndim})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    size = int(np.prod(dims))
    if len(raw) - head != size:
        raise IdxError(f"{path}: header says {dims} = {size} values, the file has "
                       f"{len(raw) - head}; it is truncated or corrupt")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


def read_split(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """-> images (N, 28, 28, 1) uint8, labels (N,) uint8 of the IDX files of `split`."""
    image_file, label_file = FILES[split]
    images = read_idx(os.path.join(source_dir, image_file), 3)
    labels = read_idx(os.path.join(source_dir, label_file), 1)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise IdxError(f"{source_dir}: {split} images {images.shape} and labels "
                       f"{labels.shape} do not make a Fashion-MNIST split")
    if labels.max(initial=0) >= len(CLASS_NAMES):
        raise IdxError(f"{source_dir}/{label_file}: label {labels.max()} out of range")
    return images[..., None], labels


# skip_registration: TFDS already registers a `fashion_mnist` (which needs
# TensorFlow and the network); readers find ours from its files.
class FashionMnist(base.StreamingBuilder, skip_registration=True):
    """Fashion-MNIST from local IDX files; TFDS's name, version and features."""

    VERSION = tfds.core.Version("3.0.1")
    RELEASE_NOTES = {"3.0.1": "Built offline from the Debian IDX files, in file order."}
    # TFDS 4.9.10 finds this for a builder inside a package through the
    # `importlib_resources` backport, which it installs only on Python < 3.9.
    code_path = epath.Path(__file__)

    def __init__(self, *, source_dir: str | None = None, **kwargs):
        self.source_dir = source_dir or SOURCE_DIR
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=self), not dataset_info_from_configs, which
        # looks for metadata files beside the module.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Zalando's article images: 28x28 grayscale, 10 classes.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            disable_shuffling=True,  # record i == IDX example i
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        # Read and check every file before writing anything.
        data = {split: read_split(self.source_dir, split) for split in FILES}
        return {split: (example for _, example in arrays.generate_examples(*data[split]))
                for split in FILES}
