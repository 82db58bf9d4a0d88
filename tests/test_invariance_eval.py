"""The invariance evaluator end to end: `evaluate --eval invariance` on a run, its
records and results.md rows, the report's columns and figure, and its errors. The
metric itself: test_invariance.py; the transformation sets: test_invariance_sets.py."""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ssl_jax import config as cfg_lib
from ssl_jax import errors, evaluation
from ssl_jax.data import sources
from ssl_jax.datasets import prepare
from ssl_jax.eval import invariance, report
from tests.test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ["occlusion", "viewpoint", "illumination", "instance"]


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A workdir holding a tiny SimCLR run's config (evaluated at random init: the
    evaluator's plumbing is what is tested), its data in a data_dir of its own with
    tiny_squares_invariance prepared beside it: (workdir, data_dir)."""
    data_dir = str(tmp_path_factory.mktemp("inv_data"))
    shutil.copytree(os.path.join(tiny_data, "tiny_squares"),
                    os.path.join(data_dir, "tiny_squares"))
    # 128 test images, >= 6 a class: sets of 3 images, 2 a class.
    prepare.prepare("invariance_sets", data_dir, source="tiny_squares", sets_per_class=2,
                    set_size=3)
    workdir = str(tmp_path_factory.mktemp("inv_run") / "w")
    os.makedirs(workdir)
    cfg_lib.save(tiny_config("simclr", data_dir), workdir)
    return workdir, data_dir


def _cached(workdir, split, stage):
    """The features evaluate cached for `split` of the sets: (N, D) of `stage`."""
    paths = glob.glob(os.path.join(workdir, "features", f"*tiny_squares_invariance.{split}_*"))
    assert len(paths) == 1, paths
    with np.load(paths[0]) as f:
        return f[f"feat/{stage}"], f["label"]


def test_scores_every_transformation_and_stage_as_the_metric_does(run):
    workdir, data_dir = run
    out = evaluation.evaluate(workdir, ("invariance",), "all", random_init=True)
    r = out["invariance"]
    assert r["stage"] == "block2" and list(r["stages"]) == ["block1", "block2"]
    assert "top1" not in r  # not an accuracy
    for stage, v in r["stages"].items():
        assert list(v["scores"]) == SPLITS and v["dataset"] == "tiny_squares_invariance"
        for split in SPLITS:
            assert v["images"][split] == 10 * 2 * 3 and v["sets"][split] == 10 * 2
            # The record is the metric applied to the split's features, set ids and labels.
            feats, labels = _cached(workdir, split, stage)
            set_id = sources.column("tiny_squares_invariance", split, data_dir, "set_id")
            want = invariance.invariance_scores(feats, set_id, labels, (10, 25))
            assert v["scores"][split] == {str(k): x for k, x in want.items()}
    with open(os.path.join(workdir, "eval_invariance_random_init.json")) as f:
        assert json.load(f)["stages"] == r["stages"]
    with open(os.path.join(workdir, "results.md")) as f:
        text = f.read()
    assert text.startswith("| date | method | dataset | step | evaluator | stage | "
                           "transformation | K | invariance |")
    rows = [line for line in text.splitlines() if "invariance (offline)" in line]
    assert len(rows) == 2 * 4 * 2  # stages x transformations x K
    assert "| simclr (random init) | tiny_squares | 0 | invariance (offline) | block1 | " \
           "occlusion | 10 |" in rows[0]

    # A classification evaluator's rows after it start a table of their own columns.
    evaluation.evaluate(workdir, ("knn",), random_init=True)
    with open(os.path.join(workdir, "results.md")) as f:
        lines = f.read().splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("| date |")]
    assert len(headers) == 2 and lines[headers[1]].endswith("| top-1 | top-5 |")
    assert lines[headers[1] - 1] == "" and "| knn k=20 (offline) | block2 |" in lines[-1]

    # The report: invariance columns beside the accuracy ones, and the grouped bars.
    got = report.report([workdir], os.path.join(workdir, "report"))
    header, _, row = ([c.strip() for c in line.strip("|").split("|")]
                      for line in got["table"].splitlines()[:3])
    assert "knn block2" in header and "invariance block2 occlusion K=10" in header
    assert row[0] == "simclr (random init)"
    assert row[header.index("invariance block2 instance K=25")] == \
        f"{r['stages']['block2']['scores']['instance']['25']:.2f}"
    assert os.path.exists(os.path.join(workdir, "report", "invariance.png"))


def test_command_line_scores_the_transformations_asked_for(run):
    workdir, _ = run
    p = subprocess.run([sys.executable, "-m", "ssl_jax.evaluate", "--workdir", workdir,
                        "--invariance", "occlusion,instance", "--random_init",
                        "--results_dir", os.path.join(workdir, "cli")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("invariance (")]
    assert line and "K=10/25: occlusion " in line[0] and " instance " in line[0], p.stdout
    assert "viewpoint" not in line[0]
    with open(os.path.join(workdir, "cli", "eval_invariance_random_init.json")) as f:
        assert list(json.load(f)["stages"]["block2"]["scores"]) == ["occlusion", "instance"]
    # --invariance with an --eval that leaves it out contradicts itself.
    p = subprocess.run([sys.executable, "-m", "ssl_jax.evaluate", "--workdir", workdir,
                        "--eval", "knn", "--invariance", "occlusion"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "add invariance to --eval" in p.stderr, p.stderr[-2000:]


def test_missing_sets_and_datasets_without_set_ids_are_named(run, tiny_data, tmp_path):
    workdir, data_dir = run
    config = cfg_lib.load(workdir)
    config.data_dir = tiny_data  # no sets prepared there
    other = str(tmp_path / "w")
    os.makedirs(other)
    cfg_lib.save(config, other)
    with pytest.raises(errors.UserError, match=r"transformation sets 'tiny_squares_invariance' "
                       r"are not prepared in .*python -m ssl_jax.prepare --dataset "
                       r"invariance_sets --source tiny_squares"):
        evaluation.evaluate(other, ("invariance",), random_init=True)
    with pytest.raises(errors.UserError, match=r"tiny_squares has no 'set_id' feature.*"
                       r"transformation sets"):
        evaluation.evaluate(workdir, ("invariance",), random_init=True,
                            overrides={"eval.invariance.dataset": "tiny_squares",
                                       "eval.invariance.splits": ("test",)})
    with pytest.raises(errors.UserError, match=r"has no split 'rotation'; its splits: "):
        evaluation.evaluate(workdir, ("invariance",), random_init=True,
                            overrides={"eval.invariance.splits": ("rotation",)})


def test_an_export_scores_as_its_run_does(run, tmp_path, fast_prng, compilation_cache):
    """--exported reads the sets beside the export's dataset, and its numbers are the
    run's: the same features through the same extraction."""
    from ssl_jax import export, train
    _, data_dir = run
    c = tiny_config("simclr", data_dir, total_steps=2, ckpt_every_steps=2)
    workdir, out = str(tmp_path / "w"), str(tmp_path / "exported")
    train.train(c, workdir)
    export.export(workdir, out)
    want = evaluation.evaluate(workdir, ("invariance",), "final")["invariance"]
    got = evaluation.evaluate(exported=out, evals=("invariance",))["invariance"]
    assert got["stages"] == want["stages"] and got["exported"] == os.path.abspath(out)
    assert os.path.exists(os.path.join(out, "eval_invariance.json"))


def test_a_later_evaluation_of_some_transformations_keeps_the_others(run, tmp_path):
    """eval_invariance.json merges by transformation as every record merges by stage:
    `--invariance occlusion` again must not drop viewpoint and instance, which the
    report reads from it."""
    workdir, _ = run
    results = str(tmp_path / "results")

    def scored(*splits):
        return evaluation.evaluate(workdir, ("invariance",), random_init=True,
                                   results_dir=results,
                                   overrides={"eval.invariance.splits": splits})["invariance"]
    first = scored("instance", "occlusion")
    again = scored("occlusion")
    assert list(again["stages"]["block2"]["scores"]) == ["occlusion"]  # what ran
    with open(os.path.join(results, "eval_invariance_random_init.json")) as f:
        kept = json.load(f)["stages"]["block2"]
    # The paper's order, whatever order they were scored in; each from its newest run.
    assert list(kept["scores"]) == list(kept["images"]) == list(kept["sets"]) == [
        "occlusion", "instance"]
    assert kept["scores"]["instance"] == first["stages"]["block2"]["scores"]["instance"]
    assert kept["scores"]["occlusion"] == again["stages"]["block2"]["scores"]["occlusion"]
    table = report.compare_table(report.load_rows([results]))
    assert "invariance block2 instance K=10" in table
    # Sets of another dataset replace the record: their scores are another benchmark's.
    assert invariance.merge({"dataset": "a", "scores": {"instance": {}}, "images": {},
                             "sets": {}},
                            {"dataset": "b", "scores": {"occlusion": {}}, "images": {},
                             "sets": {}})["scores"] == {"occlusion": {}}
