"""One tiny end-to-end run per method: train, checkpoint, resume, evaluate."""
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from ssl_jax import evaluation, train
from ssl_jax import config as cfg_lib
from ssl_jax.errors import UserError

CONFIGS = ("moco", "simclr")  # trained end to end here; tiny_config takes any configs/<method>.py


# Every comparison here is between runs in this process: conftest.py's faster PRNG mode is safe.
pytestmark = pytest.mark.usefixtures("fast_prng")

def tiny_config(method, data_dir, **overrides):
    c = cfg_lib.load_file(f"configs/{method}.py:dataset=fashion_mnist,runlocal")
    c.dataset, c.data_dir = "tiny_squares", data_dir
    c.batch_size, c.total_steps, c.ckpt_every_steps, c.log_every_steps = 32, 6, 3, 3
    # Two tiny blocks and XLA's own convolution: compiling is most of a tiny run's
    # time, and this compiles in half the time of four blocks with the im2col conv.
    c.model.widths, c.model.conv = (4, 8), "xla"
    c.head.hidden, c.head.dim = 16, 8
    c.eval.batch_size, c.eval.linear.epochs = 64, 5
    c.eval.knn.k = 20
    if method == "moco":
        c.moco.queue_size, c.moco.bn_groups = 64, 4
    for k, v in overrides.items():
        c[k] = v
    return c


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state["params"]))]


def train_crash_resume(config, tmp_path, crash_after: int = 3):
    """Trains config to its end, then simulates a crash after the step-`crash_after`
    checkpoint (the later checkpoints removed) and re-runs the same command;
    asserts both runs end with bitwise-equal states, every leaf of them: parameters,
    optimizer moments, BN statistics, and the method's state (MoCo's queue and key
    encoder, a memory bank) -- same data order, same RNG streams. Returns (full
    state, resumed state) as numpy, and the workdir."""
    workdir = str(tmp_path / "w")
    full = jax.device_get(train.train(config, workdir))
    assert int(full["step"]) == config.total_steps
    ckpts = os.path.join(workdir, "checkpoints")
    for step in os.listdir(ckpts):
        if step.isdigit() and int(step) > crash_after:
            shutil.rmtree(os.path.join(ckpts, step))
    resumed = jax.device_get(train.train(config, workdir))
    assert int(resumed["step"]) == config.total_steps
    flat = [{jax.tree_util.keystr(p): np.asarray(x)
             for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
            for state in (full, resumed)]
    assert flat[0].keys() == flat[1].keys()
    for k in flat[0]:
        np.testing.assert_array_equal(flat[0][k], flat[1][k], err_msg=k)
    return full, resumed, workdir


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_train_resume_evaluate(method, tiny_data, tmp_path, capsys, monkeypatch):
    config = tiny_config(method, tiny_data)
    if method == "moco":  # the online probes ride along on one method's run
        config.online.update(linear=True, every_steps=3, knn_train_examples=128)
    full, resumed, workdir = train_crash_resume(config, tmp_path)
    # Training moves the parameters: every leaf differs between steps 3 and 6.
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    at3 = manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    moved = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(at3["state"]["params"]), _leaves(resumed))]
    assert len(moved) == len(_leaves(resumed)) and all(moved), moved
    if method == "moco":
        printed = capsys.readouterr().out
        assert printed.count("online_knn/top1") == 3  # steps 3, 6; the resumed run: 6
        assert "online_linear/top1" in printed
        # How long saves blocked training is said only when it matters (train.log has it).
        assert "blocked training" not in printed and "Checkpointing" not in printed
        with open(os.path.join(workdir, "train.log")) as f:
            assert re.search(r"Checkpoint saves \(\d\) blocked training for \d", f.read())
        w = resumed["online"]["params"]["w"]
        np.testing.assert_array_equal(w, full["online"]["params"]["w"])  # resumed exactly
        assert np.abs(w).sum() > 0

    results = evaluation.evaluate(workdir, ("linear", "knn"), stages="all")
    for name in ("linear", "knn"):
        r = results[name]
        assert sorted(r["stages"]) == ["block1", "block2"]
        assert r["stage"] == "block2" and r["top1"] == r["stages"]["block2"]["top1"]
        for s in r["stages"].values():
            assert 0.0 <= s["top1"] <= s["top5"] <= 100.0
        # 10 classes, chance 10% (what a swapped split or labels would score); 6 steps
        # leave the final stage at 35-60% here.
        assert r["top1"] > 25.0
        assert r["step"] == 6
        with open(os.path.join(workdir, f"eval_{name}.json")) as f:
            assert json.load(f)["top1"] == r["top1"]
    with open(os.path.join(workdir, "results.md")) as f:  # the table people read
        rows = f.read().splitlines()
    assert rows[0].startswith("| date | method |") and len(rows) == 2 + 2 * 2
    assert f"| {method} | tiny_squares | 6 | knn k=20 (offline) | block1 |" in rows[-2]
    with pytest.raises(ValueError, match=r"block9 is not a stage of this convnet; its stages "
                       r"are block1, block2 \(also 'final'"):
        evaluation.evaluate(workdir, ("knn",), stages=["block9"])
    # 'final' names the deepest stage inside a list too (--stages final,block1).
    both = evaluation.evaluate(workdir, ("knn",), stages=["final", "block1"])["knn"]
    assert list(both["stages"]) == ["block1", "block2"]
    assert both["stages"] == results["knn"]["stages"]
    # A later evaluation of the final stage alone keeps the other stages' record.
    assert list(evaluation.evaluate(workdir, ("knn",))["knn"]["stages"]) == ["block2"]
    with open(os.path.join(workdir, "eval_knn.json")) as f:
        assert json.load(f)["stages"] == results["knn"]["stages"]
    if method == "moco":  # an export of a method with two encoders: the query encoder's
        from ssl_jax import export
        out = str(tmp_path / "exported")
        export.export(workdir, out)
        flat = np.load(os.path.join(out, "params.npz"))
        want = {"params": resumed["params"]["encoder"],
                "batch_stats": resumed["method_state"]["batch_stats"]["encoder"]}
        want = {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
                for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
        assert sorted(flat.files) == sorted(want)
        for k in want:  # every array, bitwise
            np.testing.assert_array_equal(flat[k], want[k], err_msg=k)
    if method == "simclr":  # the random-init baseline reads the same workdir, writes its own file
        base = evaluation.evaluate(workdir, ("knn",), random_init=True)["knn"]
        assert base["step"] == 0 and base["random_init"]
        with open(os.path.join(workdir, "eval_knn_random_init.json")) as f:
            assert json.load(f)["top1"] == base["top1"]
        with open(os.path.join(workdir, "eval_knn.json")) as f:
            assert json.load(f)["step"] == 6  # the trained result is kept
        # Again: its features are cached, so its BN statistics need not be measured again.
        from ssl_jax.eval import features
        monkeypatch.setattr(features, "calibrate_bn", lambda *a, **k: pytest.fail("calibrated"))
        again = evaluation.evaluate(workdir, ("knn",), random_init=True)["knn"]
        assert again["stages"] == base["stages"]


def saved_run(config, workdir: str) -> dict:
    """What a run leaves after its first checkpoint, without training: config.json and
    the initial state and data position saved as step 1. -> {file name: contents} of
    the workdir's files."""
    from ssl_jax import checkpoint, experiment, parallel
    from ssl_jax.data import pipeline, sources
    os.makedirs(workdir)
    cfg_lib.save(config, workdir)
    exp = experiment.Experiment(config, experiment.data_spec(config), parallel.make_mesh())
    data = pipeline.train_iterator(sources.open_source(config.dataset, "train", config.data_dir),
                                   global_batch_size=config.batch_size, seed=config.seed)
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    ckpt.save(1, exp.initial_state(), data)
    ckpt.close()
    return _files(workdir)


def _files(workdir):
    return {n: open(os.path.join(workdir, n)).read() for n in sorted(os.listdir(workdir))
            if os.path.isfile(os.path.join(workdir, n))}


@pytest.fixture(scope="module")
def moco_run(tiny_data, tmp_path_factory):
    """A MoCo workdir with a checkpoint (step 1): (its config, workdir, files)."""
    config = tiny_config("moco", tiny_data, total_steps=3)
    workdir = str(tmp_path_factory.mktemp("moco") / "w")
    return config, workdir, saved_run(config, workdir)


def test_resume_under_a_different_config_is_refused_in_one_line(moco_run):
    config, workdir, files = moco_run
    changed = config.copy_and_resolve_references()
    changed.moco.temperature, changed.optimizer.lr = 0.5, 0.1
    with pytest.raises(UserError) as e:
        train.train(changed, workdir)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("the workdir holds a run of a different config (differing keys: "
                              "moco.temperature: 0.2 -> 0.5; optimizer.lr: 0.002 -> 0.1). Use "
                              "another --workdir; or"), message
    assert "--config.resume_from_different_config=True" in message
    assert _files(workdir) == files


def test_the_override_refuses_a_state_that_does_not_fit_before_writing(moco_run, tiny_data):
    """SimCLR on a MoCo workdir with --config.resume_from_different_config=True: one
    line, before anything is written (it was orbax's two tracebacks, with config.json
    and command.txt already rewritten to SimCLR's)."""
    _, workdir, files = moco_run
    other = tiny_config("simclr", tiny_data, total_steps=3, resume_from_different_config=True)
    with pytest.raises(UserError, match=r"^The checkpoint in .* \(step 1 of a moco run\) does "
                       r"not fit this simclr config: \d+ of its arrays differ \(.*\)\. "
                       r"--config.resume_from_different_config=True only resumes a change "
                       r"that keeps the state's arrays .*; train this config in another "
                       r"--workdir\.$"):
        train.run(other, workdir, command="python -m ssl_jax.train --config simclr")
    assert _files(workdir) == files


def test_the_override_accepts_a_change_that_keeps_the_arrays(moco_run):
    from ssl_jax import experiment, parallel
    config, workdir, _ = moco_run
    longer = config.copy_and_resolve_references()
    longer.total_steps, longer.optimizer.lr, longer.resume_from_different_config = 9, 0.1, True
    train.check_workdir(experiment.Experiment(longer, experiment.data_spec(longer),
                                              parallel.make_mesh()), workdir)  # no error


def test_a_workdir_without_a_checkpoint_holds_no_run(tiny_data, tmp_path):
    """A config.json with no checkpoint (a start that failed or stopped before its first
    save) is not "a run of a different config": another config starts there."""
    from ssl_jax import experiment, parallel
    workdir = str(tmp_path / "w")
    os.makedirs(workdir)
    cfg_lib.save(tiny_config("simclr", tiny_data), workdir)
    other = tiny_config("moco", tiny_data)
    train.check_workdir(experiment.Experiment(other, experiment.data_spec(other),
                                              parallel.make_mesh()), workdir)  # no error


def test_bad_batch_and_queue_sizes_fail_before_compiling(tiny_data, tmp_path):
    bad = tiny_config("moco", tiny_data)
    bad.moco.queue_size = 100
    with pytest.raises(ValueError, match="queue_size=100 is not divisible"):
        train.train(bad, str(tmp_path / "q"))
    assert not os.path.exists(tmp_path / "q" / "checkpoints")


def test_missing_dataset_names_the_prepare_command(tmp_path):
    c = tiny_config("simclr", str(tmp_path / "empty"))
    from ssl_jax.data.sources import DatasetNotFoundError
    with pytest.raises(DatasetNotFoundError, match="ssl_jax.prepare"):
        train.train(c, str(tmp_path / "w"))
