r"""CIFAR-10 and CIFAR-100 as TFDS's `cifar10` and `cifar100`, prepared without TensorFlow.

    python -m ssl_jax.prepare --dataset cifar10 --manual_dir DIR [--data_dir D]   # offline
    python -m ssl_jax.prepare --dataset cifar100 [--data_dir D]                   # downloads

DIR holds an archive of https://www.cs.toronto.edu/~kriz/cifar.html in either
format: cifar-10-python.tar.gz (pickled batches) or cifar-10-binary.tar.gz (the
one TFDS downloads); cifar-100-python.tar.gz or cifar-100-binary.tar.gz. Without
--manual_dir, an archive in TFDS's manual folder (<data_dir>/downloads/manual)
is used, else the binary archive is downloaded from TFDS's URL and checked
against the size and sha256 TFDS registers for it.

TFDS's own builder (tensorflow_datasets/image_classification/cifar.py) reads the
archive with TensorFlow; this one writes the dataset it writes: name, version,
description, features (`id` "train_00000", `image` (32, 32, 3), `label`, cifar100
also `coarse_label`), label names read from the archive as TFDS reads them, and
splits (train, test), as array_record. One chosen difference: record i of a
split is example i of the archive's batches, in order (disable_shuffling); TFDS's
order is a hash of the example's key. Everything is read and checked before
anything is written (base.StreamingBuilder).
"""
from __future__ import annotations

import codecs
import dataclasses
import hashlib
import io
import os
import pickle
import socket
import tarfile
import urllib.parse
import zlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.core.download import checksums
from tensorflow_datasets.image_classification import cifar as tfds_cifar

from ssl_jax.datasets import arrays, base
from ssl_jax.errors import UserError

HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
DOWNLOAD_FROM = "https://www.cs.toronto.edu/~kriz/"  # + the binary archive: TFDS's URL
SIZE, RECORD_PIXELS = 32, 32 * 32 * 3  # a record: label byte(s), then R, G, B planes
PROBE_TIMEOUT_S = 10  # TFDS's downloader retries an unreachable host for minutes


@dataclasses.dataclass(frozen=True)
class Layout:
    """One archive format: its file name, its folder inside, split -> batch files in
    order, and where the label names are (binary: a text file per label feature;
    python: one pickled meta file)."""
    archive: str
    folder: str
    splits: dict
    names: dict | str


@dataclasses.dataclass(frozen=True)
class Cifar:
    """A CIFAR dataset: TFDS's builder class, the label features in the binary
    record's byte order with their python keys (batch key, meta key), and its two
    archive formats, the binary (TFDS's) first."""
    tfds_builder: type
    labels: dict
    binary: Layout
    python: Layout


CIFAR = {
    "cifar10": Cifar(
        tfds_cifar.Cifar10, {"label": ("labels", "label_names")},
        Layout("cifar-10-binary.tar.gz", "cifar-10-batches-bin",
               {"train": [f"data_batch_{i}.bin" for i in range(1, 6)],
                "test": ["test_batch.bin"]}, {"label": "batches.meta.txt"}),
        Layout("cifar-10-python.tar.gz", "cifar-10-batches-py",
               {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
               "batches.meta")),
    "cifar100": Cifar(
        tfds_cifar.Cifar100, {"coarse_label": ("coarse_labels", "coarse_label_names"),
                              "label": ("fine_labels", "fine_label_names")},
        Layout("cifar-100-binary.tar.gz", "cifar-100-binary",
               {"train": ["train.bin"], "test": ["test.bin"]},
               {"coarse_label": "coarse_label_names.txt", "label": "fine_label_names.txt"}),
        Layout("cifar-100-python.tar.gz", "cifar-100-python",
               {"train": ["train"], "test": ["test"]}, "meta")),
}

# ------------------------------------------------------------ reading an archive

# What a python-format batch may build when unpickled: numpy arrays and nothing else
# (a pickle from the network could otherwise run any code). The originals are
# Python 2 pickles naming numpy.core; NumPy 2 writes numpy._core.
_RECONSTRUCT, _SCALAR = np.zeros(0).__reduce__()[0], np.uint8(0).__reduce__()[0]
_SAFE = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
         ("_codecs", "encode"): codecs.encode,
         **{(m, "_reconstruct"): _RECONSTRUCT for m in ("numpy.core.multiarray",
                                                         "numpy._core.multiarray")},
         **{(m, "scalar"): _SCALAR for m in ("numpy.core.multiarray", "numpy._core.multiarray")}}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _SAFE:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")
        return _SAFE[module, name]


def _text(v) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


def _unpickle(data: bytes) -> dict:
    # latin1: how NumPy reads Python 2 arrays; keys come back str (or bytes: either).
    return {_text(k): v for k, v in
            _Unpickler(io.BytesIO(data), encoding="latin1").load().items()}


def read_archive(path: str, spec: Cifar, num_classes: dict, fix: str) -> tuple[dict, dict]:
    """Reads a CIFAR archive of either format whole and checks it against
    num_classes ({label feature: classes}).

    Returns ({split: {"image": (N, 32, 32, 3) uint8, <label feature>: (N,) int64}},
    {label feature: [class names]}). Raises UserError naming what is wrong and `fix`.
    """
    name = os.path.basename(path)
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            layout = next((la for la in (spec.binary, spec.python)
                           if f"{la.folder}/{la.splits['train'][0]}" in members), None)
            if layout is None:
                raise UserError(f"{name} is not a CIFAR archive of {spec.binary.archive} or "
                                f"{spec.python.archive}: it has no "
                                f"{spec.binary.folder}/{spec.binary.splits['train'][0]} or "
                                f"{spec.python.folder}/{spec.python.splits['train'][0]}. {fix}.")
            wanted = [f for files in layout.splits.values() for f in files]
            wanted += list(layout.names.values()) if isinstance(layout.names, dict) else [
                layout.names]
            missing = [f for f in wanted if f"{layout.folder}/{f}" not in members]
            if missing:
                raise UserError(f"{name} lacks {', '.join(missing)} in {layout.folder}/. {fix}.")
            raw = {f: tar.extractfile(members[f"{layout.folder}/{f}"]).read() for f in wanted}
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UserError(f"{name} is not a readable tar.gz archive ({type(e).__name__}: {e}). "
                        f"{fix}.") from e
    try:
        read = _read_binary if layout is spec.binary else _read_python
        splits, names = read(raw, layout, spec)
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as e:
        detail = str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"  # ours: said
        raise UserError(f"{name} cannot be read: {detail}. {fix}.") from e
    for feature, classes in names.items():
        n = num_classes[feature]
        if len(classes) != n:
            raise UserError(f"{name} names {len(classes)} classes for {feature}, not {n}. {fix}.")
        for split, data in splits.items():
            if len(data[feature]) and data[feature].max() >= n:
                raise UserError(f"{name}: {split} has {feature} {data[feature].max()}, beyond "
                                f"its {n} classes. {fix}.")
    return splits, names


def _read_binary(raw: dict, layout: Layout, spec: Cifar):
    k = len(spec.labels)
    splits = {}
    for split, files in layout.splits.items():
        parts = []
        for f in files:
            if len(raw[f]) % (k + RECORD_PIXELS):
                raise ValueError(f"{f} has {len(raw[f])} bytes, not whole records of "
                                 f"{k + RECORD_PIXELS}: it is cut short")
            parts.append(np.frombuffer(raw[f], np.uint8).reshape(-1, k + RECORD_PIXELS))
        records = np.concatenate(parts)
        splits[split] = {"image": _images(records[:, k:]),
                         **{feature: records[:, i].astype(np.int64)
                            for i, feature in enumerate(spec.labels)}}
    # TFDS's reading of the names: one a line, blank lines dropped.
    names = {feature: [n for n in raw[f].decode().split("\n") if n]
             for feature, f in layout.names.items()}
    return splits, names


def _read_python(raw: dict, layout: Layout, spec: Cifar):
    splits = {}
    for split, files in layout.splits.items():
        batches = [_unpickle(raw[f]) for f in files]
        data = np.concatenate([np.asarray(b["data"], np.uint8).reshape(-1, RECORD_PIXELS)
                               for b in batches])
        labels = {feature: np.concatenate([np.asarray(b[key], np.int64).reshape(-1)
                                           for b in batches])
                  for feature, (key, _) in spec.labels.items()}
        if any(len(v) != len(data) for v in labels.values()):
            raise ValueError(f"{split}: {len(data)} images but "
                             f"{[len(v) for v in labels.values()]} labels")
        splits[split] = {"image": _images(data), **labels}
    meta = _unpickle(raw[layout.names])
    names = {feature: [_text(n) for n in meta[key]] for feature, (_, key) in spec.labels.items()}
    return splits, names


def _images(rows: np.ndarray) -> np.ndarray:
    """(N, 3072) uint8, each row the R, G, B 32x32 planes -> (N, 32, 32, 3)."""
    return np.ascontiguousarray(rows.reshape(-1, 3, SIZE, SIZE).transpose(0, 2, 3, 1))


# ------------------------------------------------------------ the builder

class _CifarBuilder(base.StreamingBuilder, skip_registration=True):
    """TFDS's cifar10 / cifar100 from an archive of either format; see the module doc."""

    code_path = epath.Path(__file__)  # see fashion_mnist.FashionMnist.code_path

    def __init__(self, *, manual_dir: str | None = None, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self.spec = CIFAR[self.name]
        self.given_dir = manual_dir
        self.manual_dir = manual_dir or os.fspath(self.data_dir_root / "downloads" / "manual")

    def _info(self) -> tfds.core.DatasetInfo:
        theirs = CIFAR[self.name].tfds_builder._info(self)  # TFDS's own declaration
        return tfds.core.DatasetInfo(
            builder=self, description=theirs.description, features=theirs.features,
            supervised_keys=theirs.supervised_keys, homepage=theirs.homepage,
            citation=theirs.citation,
            disable_shuffling=True)  # record i == example i of the archive's batches

    def _split_generators(self, dl_manager):
        path = self._archive(dl_manager)
        features = self.info.features
        splits, names = read_archive(path, self.spec,
                                     {f: features[f].num_classes for f in self.spec.labels},
                                     self._fix(path))
        for feature, classes in names.items():  # as TFDS: from the archive
            features[feature].names = classes
        return {split: self._examples(split, data) for split, data in splits.items()}

    def _examples(self, split: str, data: dict):
        for i in range(len(data["image"])):
            yield {"id": f"{split}_{i:05d}",  # TFDS's: the split, then the index
                   "image": arrays.encode_png(data["image"][i]),
                   **{feature: int(data[feature][i]) for feature in self.spec.labels}}

    def _fix(self, path: str) -> str:
        return (f"Download it again from {HOMEPAGE} into {os.path.dirname(path)}, or the "
                f"other format ({self.spec.python.archive} or {self.spec.binary.archive})")

    def _archive(self, dl_manager) -> str:
        """The archive to read: one in the manual folder, else downloaded."""
        names = (self.spec.binary.archive, self.spec.python.archive)
        found = [os.path.join(self.manual_dir, n) for n in names
                 if os.path.isfile(os.path.join(self.manual_dir, n))]
        if found:
            return found[0]
        if self.given_dir:  # the user chose offline
            raise UserError(f"--manual_dir {self.manual_dir} holds neither {names[0]} nor "
                            f"{names[1]}: download one of them from {HOMEPAGE} into that "
                            "folder.")
        link = DOWNLOAD_FROM + self.spec.binary.archive
        url = urllib.parse.urlparse(link)
        port = url.port or (80 if url.scheme == "http" else 443)
        try:  # fail at once offline, not after the downloader's minutes of retries
            socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as e:
            raise UserError(f"No {names[0]} or {names[1]} in {self.manual_dir} (TFDS's "
                            f"manual folder), and {url.hostname} cannot be reached to download "
                            f"{names[0]} ({e}). Download {names[0]} or {names[1]} from "
                            f"{HOMEPAGE} into {self.manual_dir} (or any folder, given as "
                            "--manual_dir) and run this again.") from e
        path = os.fspath(dl_manager.download(link))
        _check_download(path, link, self.name)
        return path


def _check_download(path: str, url: str, name: str) -> None:
    """The download's size and sha256 against TFDS's registered ones (url_checksums/)."""
    registered = tfds_utils.tfds_path() / "url_checksums" / f"{name}.txt"
    info = checksums.load_url_infos(registered).get(url) if registered.exists() else None
    if info is None:
        return
    digest = hashlib.sha256(epath.Path(path).read_bytes()).hexdigest()
    if (os.path.getsize(path), digest) != (info.size, info.checksum):
        raise UserError(f"The download {path} is not TFDS's {os.path.basename(url)} (size or "
                        f"sha256 differs): delete it and run this again, or download it "
                        f"from {HOMEPAGE} into <data_dir>/downloads/manual.")


class Cifar10(_CifarBuilder, skip_registration=True):
    name = "cifar10"
    VERSION = tfds_cifar.Cifar10.VERSION


class Cifar100(_CifarBuilder, skip_registration=True):
    name = "cifar100"
    VERSION = tfds_cifar.Cifar100.VERSION
