"""The rough edges of evaluate, eval.report and export.load: a mistake is one `error:`
line (exit 2) that names the fix, written before anything is; a multi-process
evaluation speaks once."""
import os
import subprocess
import sys

import numpy as np
import pytest

from ssl_jax import config as cfg_lib
from ssl_jax import encoders, errors, evaluation
from ssl_jax import process_output
from tests.test_report import record, write_run
from tests.test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A workdir holding a tiny SimCLR config and no checkpoint: evaluated at random
    init (--random_init), which needs no training."""
    workdir = str(tmp_path_factory.mktemp("edges") / "w")
    os.makedirs(workdir)
    cfg_lib.save(tiny_config("simclr", tiny_data), workdir)
    return workdir


def _command(module, *args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


def _one_error(p, *expected):
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    for e in expected:
        assert e in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ evaluate

def test_no_stages_and_no_evaluators_are_refused_before_anything_is_written(run):
    before = sorted(os.listdir(run))
    for kwargs, match in ((dict(stages=[]), r"--stages is empty: give final .*, all, or "
                                            r"stage names such as block2,block4"),
                          (dict(stages=""), "--stages is empty"),
                          (dict(evals=()), r"--eval is empty: name the evaluators to run, of "
                                           r"linear, knn, mlp, lowshot, invariance")):
        with pytest.raises(errors.UserError, match=match):
            evaluation.evaluate(run, **dict(dict(evals=("knn",), random_init=True), **kwargs))
    assert sorted(os.listdir(run)) == before  # no features/, no eval_*.json


def test_an_unknown_evaluator_is_named_plainly_with_the_known_ones(run):
    p = _command("ssl_jax.evaluate", "--workdir", run, "--eval", "linear,lineer")
    line = _one_error(p, "--eval: 'lineer' is not an evaluator (did you mean linear?); the "
                         "evaluators are linear, knn, mlp, lowshot, invariance.")
    assert "['" not in line  # not absl's "--eval=['linear', 'lineer']"


def test_gloo_chatter_is_told_from_what_evaluate_says():
    gloo = [b"[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected "
            b"peer ranks is : 1",
            # Two devices of a process connecting at once: theirs interleave.
            b"[Gloo] Rank [Gloo] Rank 0 is connected to 11 is connected to  peer ranks. "
            b"1Expected number of connected peer ranks is : ", b"1", b" peer ranks. Expected"]
    ours = [b"knn (offline, frozen block2): k=20: top-1 46.09%  top-5 98.44%  [tiny test]",
            b"features: cached (train, /w/features/step2_train_c6675ba5ab46462c.npz)", b""]
    assert [process_output.is_gloo_chatter(line) for line in gloo + ours] == [True] * 4 + [
        False] * 3


def test_two_processes_print_each_line_once_without_gloo(run, tmp_path):
    """launch/local.sh --processes 2 evaluate: process 0 alone prints, and Gloo's
    connection lines stay off the console (both went to stdout twice before)."""
    results = str(tmp_path / "results")
    p = subprocess.run([os.path.join(ROOT, "launch", "local.sh"), "--processes", "2",
                        "--devices_per_process", "1", "evaluate", "--", "--workdir", run,
                        "--eval", "knn", "--random_init", "--results_dir", results],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, SSL_JAX_PYTHON=sys.executable))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "features", "features", "Features of block2 8-d at step 0",
        "knn (offline, frozen, random init block2)"], p.stdout
    assert "Gloo" not in p.stdout + p.stderr
    assert os.path.exists(os.path.join(results, "eval_knn_random_init.json"))


# -------------------------------------------------------------------- report

@pytest.mark.parametrize("args, expected", [
    (["--workdirs", "{tmp}/nowhere"], ["nowhere is not a directory: --workdirs takes"]),
    (["--workdirs", "{tmp}/never_evaluated"], ["never_evaluated holds no evaluation records",
                                               "python -m ssl_jax.evaluate --workdir"]),
    (["--workdirs", "{tmp}/a,{tmp}/a", "--names", "A"], ["--names has 1 entries for 2 "
                                                         "workdirs", "one name per workdir"]),
    (["--workdirs", "{tmp}/a", "--stage", "block9"], ["--stage block9: no low-shot or "
                                                      "invariance record has that stage"]),
    ([], ["--workdirs is required (e.g. --workdirs runs/simclr,runs/moco)"]),
    (["--workdirs", "{tmp}/a", "--out", ""], ["--out is required"]),
], ids=["missing workdir", "no records", "names", "stage", "no workdirs", "no out"])
def test_report_mistakes_are_one_line_and_write_nothing(tmp_path, args, expected):
    write_run(tmp_path / "never_evaluated", "simclr", {})
    write_run(tmp_path / "a", "simclr", {"linear": record({"block4": 80.0})})
    out = tmp_path / "report"
    args = [a.format(tmp=tmp_path) for a in args]
    if "--out" not in args and args:
        args += ["--out", str(out)]
    _one_error(_command("ssl_jax.eval.report", *args, timeout=120), *expected)
    assert not out.exists()


# -------------------------------------------------------------------- export

@pytest.mark.parametrize("images, expected", [
    (np.zeros((2, 28, 28), np.uint8), "got uint8 (2, 28, 28): add the channel axis "
                                      "(images[..., None])."),
    (np.zeros((28, 28, 1), np.uint8), "got uint8 (28, 28, 1): add a batch axis for one image "
                                      "(images[None])."),
    (np.zeros((28, 28), np.uint8), "got uint8 (28, 28): add a batch and a channel axis for "
                                   "one image (images[None, ..., None])."),
    ([[0, 1], [2, 3]], "takes an array of uint8 images (B, 28, 28, 1) like fashion_mnist's; got "
                       "a list: pass np.asarray(images, np.uint8)."),
    (np.zeros((2, 32, 32, 3), np.uint8), "got uint8 (2, 32, 32, 3): images of another dataset "
                                         "than the export's (fashion_mnist): resize them"),
    (np.zeros((2, 28, 28, 1), np.int64), "got int64 (2, 28, 28, 1): pass the raw pixels as "
                                         "uint8 (images.astype(np.uint8))"),
    (np.zeros((2, 28, 28, 1), np.float32), "got float32 (2, 28, 28, 1): pass the raw pixels "
                                           "(e.g. np.uint8(x * 255) for floats in [0, 1])."),
], ids=["no channel axis", "one image", "one image, no channel", "list", "other dataset",
        "ints", "floats"])
def test_features_fn_says_what_is_wrong_with_the_images_and_the_fix(images, expected):
    """export.load's features_fn checks its input (encoders.check_images) with the
    export's input shape and dataset (28x28x1 Fashion-MNIST here)."""
    with pytest.raises(errors.UserError) as e:
        encoders.check_images(images, (28, 28, 1), "fashion_mnist")
    assert expected in str(e.value) and "\n" not in str(e.value)
    encoders.check_images(np.zeros((2, 28, 28, 1), np.uint8), (28, 28, 1), "fashion_mnist")
    encoders.check_images(np.zeros((1, 40, 30, 3), np.uint8), (None, None, 3))  # any size
