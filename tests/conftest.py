"""Shared pytest fixtures, and the test session's JAX settings."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile

import numpy as np
import pytest

# ------------------------------------------------------------- the session

# Compiling, not running, is most of a tiny test's time (the suite is ~40 CPU-minutes
# of XLA:CPU compiles on 2 cores). Two session-wide settings, made before any test
# module imports jax and inherited by every subprocess (xdist workers, `python -m
# ssl_jax.train` runs):
# - one persistent compilation cache for the whole run, so a program compiled by one
#   test (a resume, a second process, the same tiny probe) is loaded by the next;
# - the non-partitionable threefry (see fast_prng), which compiles random draws ~10x
#   faster. Tests that pin the default mode ask for it (default_prng).
# The runner's own JAX_* variables win.
_MADE_CACHE = None


def pytest_configure(config):
    global _MADE_CACHE
    if hasattr(config, "workerinput"):  # an xdist worker: the controller set them
        return
    os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _MADE_CACHE = tempfile.mkdtemp(prefix="ssl_jax_tests_xla_cache_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _MADE_CACHE
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_unconfigure(config):
    if _MADE_CACHE is not None:
        shutil.rmtree(_MADE_CACHE, ignore_errors=True)


# Longest first, so that two workers (run.sh: pytest -n 2 --dist loadfile) do not
# end with one of them alone on a long module. Ranked by CPU seconds of each module
# run alone (user + sys, cold compilation cache, 2 cores shared with other work, so
# +-30%), measured:
# multihost 193, video_train 97, faults 88, accumulate 73, canvas 71, presets 62,
# multicrop 57, sweep 55, rotnet 54, jigsaw 53, vit 51, models 49, train 45, eval 42,
# lowering 41, pirl 41, data 37, methods 35, cifar 28, vit_probes 23.
_HEAVY_MODULES = ("test_multihost", "test_dino", "test_video_train", "test_faults",
                  "test_accumulate", "test_canvas", "test_presets", "test_polyview",
                  "test_multicrop", "test_sweep", "test_rotnet", "test_jigsaw", "test_vit",
                  "test_models", "test_train", "test_eval", "test_lowering", "test_pirl",
                  "test_data", "test_methods", "test_multiview", "test_distill", "test_cifar",
                  "test_vit_probes")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        return _HEAVY_MODULES.index(name) if name in _HEAVY_MODULES else len(_HEAVY_MODULES)
    items.sort(key=rank)  # stable: tests keep their order inside a module

# ---------------------------------------------------------------------- data

FASHION_MNIST_SOURCE = "/usr/share/datasets/fashion-mnist"


def write_idx(path, array: np.ndarray) -> None:
    """Writes `array` (uint8) as a gzipped IDX file."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.fixture
def fake_idx_dir(tmp_path):
    """A directory of small random Fashion-MNIST-format IDX files.

    Returns (dir, {split: (images (N, 28, 28) uint8, labels (N,) uint8)}),
    40 train and 12 test examples.
    """
    from ssl_jax.datasets import fashion_mnist

    rng = np.random.default_rng(0)
    src = tmp_path / "idx"
    src.mkdir()
    data = {}
    for split, n in (("train", 40), ("test", 12)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        image_file, label_file = fashion_mnist.FILES[split]
        write_idx(src / image_file, images)
        write_idx(src / label_file, labels)
        data[split] = (images, labels)
    return str(src), data


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory) -> str:
    """A data_dir holding fashion_mnist built from the real Debian files (once per session)."""
    if not os.path.isdir(FASHION_MNIST_SOURCE):
        pytest.skip(f"{FASHION_MNIST_SOURCE} is absent: apt-get install dataset-fashion-mnist")
    from ssl_jax.datasets import prepare

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    prepare.prepare("fashion_mnist", data_dir, FASHION_MNIST_SOURCE)
    return data_dir


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small generated TFDS dataset `tiny_rgb` (RGB 6x6 images, 5 classes).

    Returns (data_dir, {split: (images (N, 6, 6, 3) uint8, labels (N,) int64)});
    96 train and 37 test examples. Pixel (0, 0, 0) of image i is i % 256, so
    records can be told apart.
    """
    from ssl_jax.datasets import arrays

    rng = np.random.default_rng(1)
    data = {}
    for split, n in (("train", 96), ("test", 37)):
        images = rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
        images[:, 0, 0, 0] = np.arange(n) % 256
        data[split] = (images, rng.integers(0, 5, n))
    data_dir = str(tmp_path_factory.mktemp("tiny"))
    arrays.build_from_arrays("tiny_rgb", data_dir, data, num_classes=5)
    return data_dir, data


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A TFDS dataset `tiny_squares` (256 train, 128 test, 28x28x1, 10 classes whose
    images differ in where a bright square sits) for tiny end-to-end runs: its data_dir."""
    rng = np.random.default_rng(0)

    def make(n):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
        for i, y in enumerate(labels):
            r, c = divmod(int(y), 5)
            images[i, 4 + 12 * r:12 + 12 * r, 1 + 5 * c:6 + 5 * c] = 250
        return images, labels
    from ssl_jax.datasets import arrays

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    arrays.build_from_arrays("tiny_squares", data_dir, {"train": make(256), "test": make(128)},
                             num_classes=10)
    return data_dir


# ---------------------------------------------------------------------- jit


@pytest.fixture
def default_prng():
    """JAX's default (partitionable) threefry for one test: the mode users run in,
    which the session otherwise replaces with the faster-compiling one."""
    import jax

    with jax.threefry_partitionable(True):
        yield


@pytest.fixture(scope="module")
def fast_prng():
    """Non-partitionable threefry for a test module. This JAX's default
    (partitionable) threefry makes XLA:CPU compile random draws ~10x slower (one
    jitted uniform: 11.7 s vs 0.8 s on 2 cores), and network inits are mostly
    random draws. The random values differ between the modes; a test using this
    must compare runs that all use it (8-device subprocesses included)."""
    import jax

    with jax.threefry_partitionable(False):
        yield


@pytest.fixture
def compilation_cache():
    """The session's persistent compilation cache folder (see pytest_configure):
    repeated train() calls (train, crash, resume) load the programs compiled
    first; subprocesses are pointed at it too."""
    import jax

    return jax.config.jax_compilation_cache_dir


@pytest.fixture(scope="module")
def module_compilation_cache():
    """compilation_cache, for module-scoped fixtures."""
    import jax

    return jax.config.jax_compilation_cache_dir
