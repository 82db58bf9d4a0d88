"""TFDS datasets from in-memory numpy arrays, written the way TFDS writes its own.

Small generated datasets (tests, custom data) then go through the very same
array_record + TFDS reading path as the real ones:

    build_from_arrays("tiny", data_dir, {"train": (images, labels)}, num_classes=3)
    src = sources.open_source("tiny", "train", data_dir)

Images are stored as PNG bytes: TFDS encodes numpy images with TensorFlow,
which we do without; PNG bytes give the same files and decode the same way.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
    """image: (H, W, C) uint8, C in {1, 3, 4} -> PNG bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected (H, W, 1|3|4) uint8, got {image.shape} {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def generate_examples(images: np.ndarray, labels: np.ndarray):
    """Yields (i, {"image": PNG bytes, "label": int}) for row i of the arrays."""
    for i in range(len(images)):
        yield i, {"image": encode_png(images[i]), "label": int(labels[i])}


def build_from_arrays(name: str, data_dir: str,
                      splits: Mapping[str, tuple[np.ndarray, np.ndarray]], *,
                      num_classes: int | None = None,
                      class_names: Sequence[str] | None = None,
                      version: str = "1.0.0") -> str:
    """Writes the array_record TFDS dataset `name` under data_dir (if not there yet).

    splits: {split: (images (N, H, W, C) uint8, labels (N,) int)}, one image
      shape for all splits. Record i of a split is row i of its arrays.
    Returns the dataset's directory, data_dir/name/version.
    """
    if (num_classes is None) == (class_names is None):
        raise ValueError("give exactly one of num_classes or class_names")
    shapes = {tuple(images.shape[1:]) for images, _ in splits.values()}
    if len(shapes) != 1:
        raise ValueError(f"all splits need one image shape, got {shapes}")
    for split, (images, labels) in splits.items():
        if len(images) != len(labels):
            raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=shapes.pop()),
        "label": tfds.features.ClassLabel(
            num_classes=num_classes, names=None if class_names is None else list(class_names)),
    })
    dataset_name, dataset_version = name, tfds.core.Version(version)

    # skip_registration: a throwaway class must not claim a name in TFDS's
    # global registry; readers find the dataset from its files.
    class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = dataset_version
        code_path = epath.Path(__file__)  # see fashion_mnist.FashionMnist.code_path

        def _info(self):
            # disable_shuffling keeps record i == row i, so indices mean one thing.
            return tfds.core.DatasetInfo(builder=self, features=features,
                                         supervised_keys=("image", "label"),
                                         disable_shuffling=True)

        def _split_generators(self, dl_manager):
            del dl_manager  # everything is in memory
            return {s: self._generate_examples(*arrays) for s, arrays in splits.items()}

        def _generate_examples(self, images, labels):
            yield from generate_examples(images, labels)

    builder = Builder(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare()
    return str(builder.data_path)
