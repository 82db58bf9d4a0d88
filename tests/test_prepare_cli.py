"""`python -m ssl_jax.prepare` speaks as the other commands do (ssl_jax/cli.py): a
mistake is one `error:` line and exit status 2; the console holds what it made and
nothing of TFDS's noise; and the hint that train prints for a dataset not prepared
names a command that prepares it (ssl_jax/data/sources.py)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from ssl_jax.data import sources
from ssl_jax.datasets import prepare
from tests.test_cifar import NOISE, make_truth, write_archive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWN = ", ".join(prepare.BUILDERS)


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))


def _finish(p: subprocess.Popen) -> tuple[int, str, str]:
    """-> (status, stdout, stderr), decoded without text mode's universal newlines,
    which would turn a progress bar's \r into \n."""
    stdout, stderr = p.communicate(timeout=300)
    return p.returncode, stdout.decode(), stderr.decode()


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    """name -> (returncode, stdout, stderr) of prepare commands used wrongly, run at once."""
    tmp = tmp_path_factory.mktemp("prepare_cli")
    cases = {
        "no --dataset": ["--data_dir", str(tmp / "a")],
        "unknown --dataset": ["--dataset", "nope", "--data_dir", str(tmp / "b")],
        "a TFDS dataset": ["--dataset", "mnist", "--data_dir", str(tmp / "c")],
        "a wrong --manual_dir": ["--dataset", "fashion_mnist", "--manual_dir",
                                 str(tmp / "nowhere"), "--data_dir", str(tmp / "d")],
        "the old name, no --dataset": ["--data_dir", str(tmp / "e")],
    }
    procs = {name: _start("-m", "ssl_jax.data.prepare" if "old" in name else "ssl_jax.prepare",
                          *args) for name, args in cases.items()}
    return {name: (*_finish(p), args[-1]) for (name, p), args in zip(procs.items(),
                                                                     cases.values())}


@pytest.mark.parametrize("name, says", [
    ("no --dataset", f"error: --dataset is required: one of {KNOWN}."),
    ("the old name, no --dataset", f"error: --dataset is required: one of {KNOWN}."),
    ("unknown --dataset", f"error: --dataset 'nope' is not one this command prepares: {KNOWN}."),
    ("a TFDS dataset", "error: --dataset 'mnist' is not one this command prepares: "
                       f"{KNOWN}. TFDS's own tool builds it: `tfds build mnist --data_dir "),
    ("a wrong --manual_dir", "/nowhere/train-images-idx3-ubyte.gz not found: install it with "
                             "`apt-get install dataset-fashion-mnist` or pass the folder that "
                             "holds the IDX files as --manual_dir"),
])
def test_a_mistake_is_one_error_line_exit_2_and_nothing_written(mistakes, name, says):
    returncode, stdout, stderr, data_dir = mistakes[name]
    assert returncode == 2, stderr
    assert stderr.splitlines() == [stderr.splitlines()[-1]], stderr  # one line, no warnings
    assert says in stderr and stderr.startswith("error: "), stderr
    assert "FATAL" not in stderr and "Traceback" not in stderr and not stdout
    assert not os.path.exists(data_dir)  # no data_dir, downloads/ or dataset folder left


def test_prepare_then_read_keep_tfds_noise_off_the_console(tmp_path):
    """TFDS's "Downloading and preparing ...", its progress bars in a log file, and
    the OpenCV warning of its image decoding stay off the console."""
    write_archive(tmp_path / "manual", "cifar10", "binary", make_truth("cifar10", 2))
    data_dir = str(tmp_path / "tfds")
    code, stdout, stderr = _finish(_start("-m", "ssl_jax.prepare", "--dataset", "cifar10",
                                          "--manual_dir", str(tmp_path / "manual"),
                                          "--data_dir", data_dir))
    assert code == 0 and stdout.startswith("Prepared cifar10 in "), stderr
    assert not [n for n in NOISE if n in stdout + stderr], stdout + stderr
    read = _start("-c", "from ssl_jax.data import sources; "
                  f"print(len(sources.open_source('cifar10', 'train', {data_dir!r})))")
    code, stdout, stderr = _finish(read)
    assert code == 0 and stdout == "10\n" and not stderr, stderr


def test_a_dataset_not_prepared_is_one_line_without_tfds_warnings(tmp_path, caplog):
    with caplog.at_level(logging.INFO), pytest.raises(sources.DatasetNotFoundError):
        sources.open_source("cifar10", "train", str(tmp_path))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    logging.getLogger("absl").warning("Variant folder %s has invalid version %s", "x", "y")
    assert "invalid version" in caplog.text  # TFDS's other warnings stay


def test_the_hint_knows_every_dataset_the_command_makes():
    """sources.PREPARE_ARGS (the pipeline may not import the builders) against their
    registry: every builder named, --manual_dir where the builder takes one."""
    made_as_named = set(prepare.BUILDERS) - {"image_folder", "invariance_sets"}
    assert set(sources.PREPARE_ARGS) == made_as_named
    for name, (args, note) in sources.PREPARE_ARGS.items():
        assert ("--manual_dir" in args + note) == (
            bool({"manual_dir", "source_dir"} & set(prepare.OPTIONS[name]))), name


@pytest.mark.parametrize("dataset, command", [
    ("cifar100", "`python -m ssl_jax.prepare --dataset cifar100 --data_dir D` (offline: add "
                 "--manual_dir DIR, DIR holding cifar-100-python.tar.gz or "
                 "cifar-100-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)."),
    ("imagenet2012", "`python -m ssl_jax.prepare --dataset imagenet2012 --data_dir D "
                     "--manual_dir DIR` (DIR holding ILSVRC2012_img_train.tar and "
                     "ILSVRC2012_img_val.tar"),
    ("got10k_videos", "`python -m ssl_jax.prepare --dataset got10k_videos --data_dir D "
                      "--manual_dir DIR`"),
    ("fashion_mnist_invariance", "`python -m ssl_jax.prepare --dataset invariance_sets "
                                 "--data_dir D --source fashion_mnist`"),
    ("svhn_cropped", "TFDS's own does: `tfds build svhn_cropped --data_dir D "
                     "--file_format=array_record`."),
    ("my_photos", "Neither this project nor TFDS knows a dataset 'my_photos': check the "
                  "name, or, for a folder of your own images, prepare it with `python -m "
                  "ssl_jax.prepare --dataset image_folder --data_dir D --name my_photos "
                  "--manual_dir DIR`."),
])
def test_the_hint_names_the_command_for_each_kind_of_dataset(dataset, command):
    known = dataset != "my_photos"
    assert command in sources.prepare_command(dataset, "D", known_to_tfds=known)
