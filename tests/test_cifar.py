"""CIFAR-10 and CIFAR-100 prepared offline from the official archives, in both formats
(ssl_jax/datasets/cifar.py), as TFDS's cifar10 / cifar100; then trained on and evaluated.

The archives are made here in the layout of https://www.cs.toronto.edu/~kriz/cifar.html:
python: <folder>/data_batch_1..5, test_batch (cifar100: train, test), pickled dicts of
`data` (N, 3072) uint8 (R, G, B planes, row-major), `labels` (cifar100 `fine_labels`,
`coarse_labels`), `filenames`, `batch_label`, and a pickled `batches.meta` (`meta`);
binary: <folder>/data_batch_1..5.bin, test_batch.bin (train.bin, test.bin), records of
1 label byte (cifar100: coarse, then fine) then 3072 pixel bytes, and the label names
one a line in batches.meta.txt (coarse_label_names.txt, fine_label_names.txt)."""
from __future__ import annotations

import functools
import http.server
import io
import os
import pickle
import re
import socket
import subprocess
import sys
import tarfile
import threading
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import cifar as tfds_cifar

from ssl_jax.data import sources
from ssl_jax.datasets import cifar, prepare
from ssl_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()
CLASSES = {"cifar10": {"label": 10}, "cifar100": {"coarse_label": 20, "label": 100}}
# What the console must never show (README: "kept off the console").
NOISE = ("OpenCV is not installed", "Variant folder", "Downloading and preparing",
         "downloaded and prepared", "\x1b[A", "\r")


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_truth(dataset: str, per_file: int, seed: int = 0) -> dict:
    """-> {"files": {split: [(rows (n, 3072) uint8, {feature: (n,) int64})]},
    "names": {feature: [class names]}}: what an archive holds, file by file."""
    rng = np.random.default_rng(seed)
    spec = cifar.CIFAR[dataset]
    files = {split: [(rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                      {f: rng.integers(0, n, per_file) for f, n in CLASSES[dataset].items()})
                     for _ in batches] for split, batches in spec.binary.splits.items()}
    names = ({"label": CIFAR10_NAMES} if dataset == "cifar10" else
             {f: [f"{f}_{i}" for i in range(n)] for f, n in CLASSES[dataset].items()})
    return {"files": files, "names": names}


def write_archive(folder, dataset: str, fmt: str, truth: dict) -> str:
    """Writes the `fmt` ("python" or "binary") archive of `truth` into folder -> its path."""
    spec = cifar.CIFAR[dataset]
    layout = spec.python if fmt == "python" else spec.binary
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, layout.archive)
    with tarfile.open(path, "w:gz") as tar:
        for split, batches in truth["files"].items():
            for name, (rows, labels) in zip(layout.splits[split], batches):
                if fmt == "binary":  # label byte(s) in spec.labels' order, then pixels
                    record = np.concatenate([np.stack([labels[f] for f in spec.labels], 1)
                                             .astype(np.uint8), rows], 1)
                    data = record.tobytes()
                else:  # the Python 2 pickles' keys, as pickle.load(encoding="bytes") sees them
                    batch = {b"batch_label": f"{split} batch".encode(), b"data": rows,
                             b"filenames": [f"img_{i}.png".encode() for i in range(len(rows))]}
                    batch.update({key.encode(): labels[f].tolist()
                                  for f, (key, _) in spec.labels.items()})
                    data = pickle.dumps(batch, protocol=2)
                _member(tar, f"{layout.folder}/{name}", data)
        if fmt == "binary":
            for f, name in layout.names.items():
                _member(tar, f"{layout.folder}/{name}",
                        ("\n".join(truth["names"][f]) + "\n\n").encode())
        else:
            meta = {key.encode(): [n.encode() for n in truth["names"][f]]
                    for f, (_, key) in spec.labels.items()}
            _member(tar, f"{layout.folder}/{layout.names}", pickle.dumps(meta, protocol=2))
        _member(tar, f"{layout.folder}/readme.html", b"<html></html>")
    return path


def expected(truth: dict, split: str) -> tuple[np.ndarray, dict]:
    """-> (images (N, 32, 32, 3) uint8, {feature: (N,)}) of a split, files in order."""
    batches = truth["files"][split]
    rows = np.concatenate([r for r, _ in batches])
    labels = {f: np.concatenate([lab[f] for _, lab in batches]) for f in batches[0][1]}
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Each dataset's archives in both formats, of the same examples, each prepared:
    {(dataset, fmt): (data_dir, dataset folder, truth)}."""
    root = tmp_path_factory.mktemp("cifar")
    out = {}
    for dataset, per_file in (("cifar10", 3), ("cifar100", 7)):
        truth = make_truth(dataset, per_file)
        for fmt in ("python", "binary"):
            manual = root / f"{dataset}_{fmt}"
            write_archive(manual, dataset, fmt, truth)
            data_dir = str(root / f"tfds_{dataset}_{fmt}")
            path, built = prepare.prepare(dataset, data_dir, manual_dir=str(manual))
            assert built
            out[dataset, fmt] = (data_dir, path, truth)
    return out


# ------------------------------------------------- the same dataset as TFDS's

@pytest.mark.parametrize("dataset, tfds_builder", [("cifar10", tfds_cifar.Cifar10),
                                                   ("cifar100", tfds_cifar.Cifar100)])
def test_same_name_version_features_as_tfds_builder(prepared, tmp_path, dataset, tfds_builder):
    data_dir, path, truth = prepared[dataset, "binary"]
    theirs = tfds_builder(data_dir=str(tmp_path)).info  # declared, not prepared
    ours = tfds.builder_from_directory(path).info
    assert path == os.path.join(data_dir, dataset, str(tfds_builder.VERSION))
    assert (ours.name, str(ours.version)) == (theirs.name, str(theirs.version))
    for feature, names in truth["names"].items():  # TFDS too reads them from the archive
        theirs.features[feature].names = names
    assert ours.features.to_json() == theirs.features.to_json()
    assert set(ours.features) == {"id", "image", *CLASSES[dataset]}
    assert ours.features["image"].shape == (32, 32, 3)
    assert (ours.description, ours.citation, ours.homepage) == (
        theirs.description, theirs.citation, theirs.homepage)
    assert tuple(ours.supervised_keys) == tuple(theirs.supervised_keys) == ("image", "label")
    assert ours.file_format.value == "array_record"
    # A reader asking for the name gets TFDS's registered builder: it finds the files.
    registered = tfds.builder(dataset, data_dir=data_dir)
    assert type(registered) is tfds_builder and registered.is_prepared()
    n = {split: len(expected(truth, split)[0]) for split in ("train", "test")}
    assert {s: v.num_examples for s, v in registered.info.splits.items()} == n
    info = sources.dataset_info(dataset, data_dir)
    assert info["class_names"] == truth["names"]["label"]


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("fmt", ["python", "binary"])
def test_records_are_the_archive_in_order(prepared, dataset, fmt):
    data_dir, _, truth = prepared[dataset, fmt]
    for split in ("train", "test"):
        images, labels = expected(truth, split)
        src = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
        records = src.__getitems__(list(range(len(src))))
        assert [r["id"].decode() for r in records] == [f"{split}_{i:05d}"
                                                       for i in range(len(images))]
        np.testing.assert_array_equal(np.stack([r["image"] for r in records]), images)
        for feature, values in labels.items():
            np.testing.assert_array_equal([r[feature] for r in records], values)
        batch = sources.read_batch(sources.open_source(dataset, split, data_dir),
                                   np.arange(len(images)))
        np.testing.assert_array_equal(batch["image"], images)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_the_binary_archive_reads_as_tfds_reads_it(prepared, tmp_path, monkeypatch, dataset):
    """TFDS's own reading code (cifar._load_data, with open() for tf.io.gfile)
    gives the labels and images that were prepared."""
    data_dir, _, truth = prepared[dataset, "binary"]
    layout = cifar.CIFAR[dataset].binary
    with tarfile.open(write_archive(tmp_path, dataset, "binary", truth)) as tar:
        tar.extractall(tmp_path, filter="data")
    gfile = types.SimpleNamespace(GFile=open)
    monkeypatch.setattr(tfds_cifar, "tf", types.SimpleNamespace(io=types.SimpleNamespace(
        gfile=gfile)))
    keys = list(cifar.CIFAR[dataset].labels)
    for split, files in layout.splits.items():
        theirs = [(labels, image) for f in files for labels, image in tfds_cifar._load_data(
            os.path.join(tmp_path, layout.folder, f), len(keys))]
        src = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
        ours = src.__getitems__(list(range(len(src))))
        assert len(theirs) == len(ours)
        for (labels, image), record in zip(theirs, ours):
            np.testing.assert_array_equal(image, record["image"])
            assert [int(v) for v in labels] == [int(record[k]) for k in keys]


# ------------------------------------------------- errors, and nothing written

def _pickle_that_runs_code(folder):
    """A python archive whose batch would call os.system when unpickled."""
    truth = make_truth("cifar10", 2)
    path = write_archive(folder, "cifar10", "python", truth)

    class Evil:
        def __reduce__(self):
            return os.system, ("true",)
    rewrite(path, "cifar-10-batches-py/data_batch_1", pickle.dumps(
        {b"data": truth["files"]["train"][0][0], b"labels": [0, 1], b"x": Evil()}, protocol=2))


def rewrite(path: str, member: str, data: bytes) -> None:
    """Replaces one member of a tar.gz archive."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w:gz") as tar:
        for name, old in members:
            _member(tar, name, data if name == member else old)


def _cut_short(folder):
    path = write_archive(folder, "cifar10", "binary", make_truth("cifar10", 2))
    with tarfile.open(path) as tar:
        data = tar.extractfile("cifar-10-batches-bin/test_batch.bin").read()
    rewrite(path, "cifar-10-batches-bin/test_batch.bin", data[:-10])


def _truncated(folder):
    path = write_archive(folder, "cifar10", "python", make_truth("cifar10", 2))
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _label_beyond(folder):
    truth = make_truth("cifar10", 2)
    truth["files"]["test"][0][1]["label"][1] = 12
    write_archive(folder, "cifar10", "binary", truth)


def _other_archive(folder):
    path = write_archive(folder, "cifar100", "python", make_truth("cifar100", 2))
    os.rename(path, os.path.join(folder, "cifar-10-python.tar.gz"))


def _missing_batch(folder):
    path = write_archive(folder, "cifar10", "binary", make_truth("cifar10", 2))
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            if not name.endswith("data_batch_3.bin"):
                _member(tar, name, data)


@pytest.mark.parametrize("damage, message", [
    (lambda folder: os.makedirs(folder), r"--manual_dir .*/manual holds neither "
     r"cifar-10-binary\.tar\.gz nor cifar-10-python\.tar\.gz: download one of them from "
     r"https://www\.cs\.toronto\.edu/~kriz/cifar\.html into that folder"),
    (_truncated, r"cifar-10-python\.tar\.gz is not a readable tar\.gz archive .* Download "
                 r"it again from https://www\.cs\.toronto\.edu/~kriz/cifar\.html"),
    (_cut_short, r"cifar-10-binary\.tar\.gz cannot be read: test_batch\.bin has 6136 bytes, "
                 r"not whole records of 3073: it is cut short"),
    (_pickle_that_runs_code, r"posix\.system is not part of a CIFAR batch"),
    (_label_beyond, r"test has label 12, beyond its 10 classes"),
    (_other_archive, r"cifar-10-python\.tar\.gz is not a CIFAR archive of "
                     r"cifar-10-binary\.tar\.gz or cifar-10-python\.tar\.gz"),
    (_missing_batch, r"cifar-10-binary\.tar\.gz lacks data_batch_3\.bin in "
                     r"cifar-10-batches-bin/"),
])
def test_a_bad_archive_is_named_and_nothing_is_written(tmp_path, damage, message):
    damage(str(tmp_path / "manual"))
    data_dir = tmp_path / "tfds"
    with pytest.raises(UserError, match=message):
        prepare.prepare("cifar10", str(data_dir), manual_dir=str(tmp_path / "manual"))
    assert not data_dir.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_without_an_archive_names_it_and_where_it_goes(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "DOWNLOAD_FROM", f"http://127.0.0.1:{_free_port()}/")  # closed
    data_dir = tmp_path / "tfds"
    manual = data_dir / "downloads" / "manual"
    with pytest.raises(UserError, match=(
            rf"No cifar-100-binary\.tar\.gz or cifar-100-python\.tar\.gz in {manual} .*"
            r"127\.0\.0\.1 cannot be reached .*Download cifar-100-binary\.tar\.gz or "
            r"cifar-100-python\.tar\.gz from https://www\.cs\.toronto\.edu/~kriz/cifar\.html "
            rf"into {manual} \(or any folder, given as --manual_dir\)")):
        prepare.prepare("cifar100", str(data_dir))
    assert not data_dir.exists()
    # Put there, it is found without --manual_dir.
    truth = make_truth("cifar100", 2)
    write_archive(manual, "cifar100", "python", truth)
    assert prepare.prepare("cifar100", str(data_dir))[1]
    assert sources.dataset_info("cifar100", str(data_dir))["num_examples"] == {
        "train": 2, "test": 2}


def test_without_an_archive_it_downloads_the_binary_one(tmp_path, monkeypatch):
    """TFDS's download manager fetches DOWNLOAD_FROM + cifar-10-binary.tar.gz (TFDS's
    URL): here from a local server."""
    truth = make_truth("cifar10", 2)
    write_archive(tmp_path / "site", "cifar10", "binary", truth)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(tmp_path / "site"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(cifar, "DOWNLOAD_FROM", f"http://127.0.0.1:{server.server_port}/")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    try:
        path, built = prepare.prepare("cifar10", str(tmp_path / "tfds"))
    finally:
        server.shutdown()
    assert built
    src = sources.open_source("cifar10", "train", str(tmp_path / "tfds"))
    np.testing.assert_array_equal(src.image, expected(truth, "train")[0])


def test_a_download_that_is_not_tfds_archive_is_refused(tmp_path):
    path = write_archive(tmp_path, "cifar10", "binary", make_truth("cifar10", 2))
    with pytest.raises(UserError, match=r"is not TFDS's cifar-10-binary\.tar\.gz \(size or "
                                        r"sha256 differs\): delete it"):
        cifar._check_download(path, "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                              "cifar10")


# ------------------------------------------------- the commands, end to end

def run_command(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `python argv`; stdout and stderr decoded without text mode, whose universal
    newlines would turn a progress bar's \r into \n."""
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True,
                         timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT,
                                                   JAX_PLATFORMS="cpu"))
    out.stdout, out.stderr = out.stdout.decode(), out.stderr.decode()
    return out


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_command(["-m", *args])


def _quiet(out: subprocess.CompletedProcess) -> None:
    console = out.stdout + out.stderr
    assert not [n for n in NOISE if n in console], console


def test_train_names_the_prepare_command_that_then_makes_what_train_and_evaluate_read(
        tmp_path):
    truth = make_truth("cifar10", 12)
    write_archive(tmp_path / "manual", "cifar10", "python", truth)
    data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "run")
    # The smallest run of the preset: runlocal's checkpoint interval given in steps
    # (configs/common.py's runlocal leaves the cifar10 preset's ckpt_every_epochs set).
    # What is pinned is the data's path (the named command prepares what train and
    # evaluate read, quietly), not the encoder: a two-block ConvNet instead of the
    # preset's ResNet-18, whose train and feature programs took most of this test's
    # CPU time to compile (every preset's config checks: test_presets.py).
    train = ("ssl_jax.train", "--config", "configs/simclr.py:dataset=cifar10,model=convnet,"
             "runlocal", f"--config.data_dir={data_dir}", "--workdir", workdir,
             "--config.total_steps=2", "--config.batch_size=16", "--config.ckpt_every_steps=2",
             "--config.model.widths=(4,8)",
             "--config.head.hidden=16", "--config.head.dim=8")
    missing = _run(*train)
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.splitlines()[-1].startswith("error: Dataset 'cifar10' is not prepared")
    _quiet(missing)
    assert len(missing.stderr.splitlines()) == 1, missing.stderr  # one line, no warnings
    command = re.search(r"`python -m (ssl_jax\.prepare [^`]*)`", missing.stderr).group(1)
    assert "--manual_dir DIR" in missing.stderr  # what to add offline
    made = _run(*command.split(), "--manual_dir", str(tmp_path / "manual"))
    assert made.returncode == 0, made.stderr
    assert f"Prepared cifar10 in {data_dir}/cifar10/3.0.2 in " in made.stdout
    assert "(train: 60, test: 12)." in made.stdout
    _quiet(made)
    trained = _run(*train)
    assert trained.returncode == 0, trained.stderr
    assert "Done: 2 steps" in trained.stdout
    _quiet(trained)
    evaluated = _run("ssl_jax.evaluate", "--workdir", workdir, "--eval", "linear")
    assert evaluated.returncode == 0, evaluated.stderr
    assert re.search(r"linear \(offline, frozen block2\): top-1 [\d.]+%.*\[cifar10 test\]",
                     evaluated.stdout), evaluated.stdout
    _quiet(evaluated)
