"""Faults caused for real: SIGTERM / SIGKILL to a training process, a corrupt
checkpoint, a NaN. Each test asserts nothing is lost: the resumed run ends with
parameters bitwise equal to an uninterrupted run's."""
import dataclasses
import glob
import os
import shlex
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ssl_jax import methods, train
from tests.test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(workdir, step=None):
    """{leaf path: array} of the params saved at `step` (default: the latest) in a workdir."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = manager.latest_step() if step is None else step
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    flat = jax.tree_util.tree_flatten_with_path(state["state"]["params"])[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def _assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# -------------------------------------------------------- real training processes

def _command(workdir, data_dir, total_steps, ckpt_every):
    """A tiny SimCLR run through the real command line, logging every step."""
    return [sys.executable, "-m", "ssl_jax.train",
            "--config", "configs/simclr.py:dataset=fashion_mnist,runlocal",
            "--workdir", workdir, "--config.dataset=tiny_squares",
            f"--config.data_dir={data_dir}", "--config.batch_size=32",
            "--config.model.widths=(4,8)", "--config.model.conv=xla", "--config.head.hidden=16",
            "--config.head.dim=8", f"--config.total_steps={total_steps}",
            f"--config.ckpt_every_steps={ckpt_every}", "--config.log_every_steps=1"]


@pytest.fixture(autouse=True, scope="module")
def _cache(module_compilation_cache, fast_prng):
    """Every run of this module, in-process or not, shares one compilation cache:
    they compile the same tiny programs. In-process runs also use fast_prng
    (conftest.py); the subprocesses use the default PRNG, and are only compared
    with one another."""
    yield module_compilation_cache


def _env(cache):
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _run(cmd, cache):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(cache), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def _run_until(cmd, cache, step, sig, repeat=1):
    """Starts cmd, sends `sig` (`repeat` times, 50 ms apart) once it logs step `step`;
    -> (return code, stdout)."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(cache), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    out = []
    deadline = time.time() + 300
    for line in p.stdout:
        out.append(line)
        if f"step {step}/" in line:
            for _ in range(repeat):
                p.send_signal(sig)
                time.sleep(0.05)
            break
        assert time.time() < deadline, "".join(out)
    out.append(p.stdout.read())
    return p.wait(timeout=120), "".join(out)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory, _cache):
    """An uninterrupted 12-step run: (its final params, data_dir)."""
    workdir = str(tmp_path_factory.mktemp("ref") / "w")
    _run(_command(workdir, tiny_data, 12, 100), _cache)
    return _params(workdir), tiny_data


def test_sigterm_checkpoints_the_current_step_exits_75_and_resumes_exactly(reference, tmp_path,
                                                                          _cache):
    ref, data_dir = reference
    workdir = str(tmp_path / "w")
    cmd = _command(workdir, data_dir, 12, 100)  # no periodic checkpoint before the end
    # Two SIGTERMs: the second lands while the first one's checkpoint is being written.
    rc, out = _run_until(cmd, _cache, 4, signal.SIGTERM, repeat=2)
    assert rc == 75, out  # EX_TEMPFAIL: launch/slurm.sbatch requeues on it
    assert "Preempted (SIGTERM) at step" in out and "Re-run the same command" in out, out
    stopped = int(out.split("Preempted (SIGTERM) at step ")[1].split("/")[0])
    assert 4 <= stopped < 12
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps == [stopped]
    out = _run(cmd, _cache)
    assert f"step {stopped + 1}/12" in out and "Done: 12 steps" in out
    _assert_same_params(_params(workdir), ref)


def test_ctrl_c_checkpoints_the_current_step_and_exits_130_without_a_traceback(
        reference, tmp_path, _cache):
    """Ctrl-C is a stop with a checkpoint, as SIGTERM is (whose test above shows the
    resume is exact: both set the same flag); only the status and the words differ."""
    _, data_dir = reference
    workdir = str(tmp_path / "w")
    rc, out = _run_until(_command(workdir, data_dir, 12, 100), _cache, 4, signal.SIGINT)
    assert rc == 130, out
    assert "Ctrl-C: stopping once the steps already sent to the device are done" in out, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    stopped = int(out.split("Stopped (Ctrl-C) at step ")[1].split("/")[0])
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps == [stopped] and 4 <= stopped < 12
    # The console and WORKDIR/train.log hold the run's lines, not the libraries' INFO;
    # the run's command is kept for the hints that say how to resume it.
    assert "xla_bridge" not in out and "dataset_info.py" not in out, out
    with open(os.path.join(workdir, "train.log")) as f:
        log = f.read().splitlines()
    assert log[0].endswith("command: python -m ssl_jax.train " + shlex.join(
        _command(workdir, data_dir, 12, 100)[3:])), log[0]
    assert any(f"step {stopped}/12 loss" in line for line in log), log
    assert log[-2].endswith(f"Stopped (Ctrl-C) at step {stopped}/12: checkpoint saved in "
                            f"{workdir}/checkpoints. Re-run the same command to resume.")
    with open(os.path.join(workdir, "command.txt")) as f:
        assert f.read().startswith("python -m ssl_jax.train --config configs/simclr.py")


def test_a_second_ctrl_c_stops_at_once_in_one_line(reference, tmp_path, _cache):
    """The second Ctrl-C lands while the first one's stop is under way: the run stops
    at once, says so in one line (no KeyboardInterrupt traceback) and exits 130."""
    _, data_dir = reference
    rc, out = _run_until(_command(str(tmp_path / "w"), data_dir, 12, 100), _cache, 4,
                         signal.SIGINT, repeat=2)
    assert rc == 130, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "Ctrl-C again: stopped at once" in out or "Stopped (Ctrl-C) at step" in out


def test_sigkill_resumes_from_the_newest_complete_checkpoint(reference, tmp_path, _cache):
    ref, data_dir = reference
    workdir = str(tmp_path / "w")
    cmd = _command(workdir, data_dir, 12, 2)
    rc, out = _run_until(cmd, _cache, 7, signal.SIGKILL)
    assert rc == -signal.SIGKILL, out
    ckpts = os.path.join(workdir, "checkpoints")
    # What a kill during a save leaves: orbax's temporary folder, never finalised.
    half = os.path.join(ckpts, "8.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(half, "state"))
    with open(os.path.join(half, "state", "manifest.ocdbt"), "wb") as f:
        f.write(b"\x00" * 10)
    out = _run(cmd, _cache)
    assert "Done: 12 steps" in out
    assert not os.path.exists(half)  # cleaned up, not loaded
    _assert_same_params(_params(workdir), ref)


# ----------------------------------------------------------- in-process faults

def test_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(
        tiny_data, tmp_path, capsys):
    c = tiny_config("simclr", tiny_data)  # 6 steps, checkpoints at 3 and 6
    workdir = str(tmp_path / "w")
    train.train(c, workdir)
    full = _params(workdir)
    # Truncate every data file of the newest checkpoint's arrays to half its size (the
    # per-process ones and the merged d/ beside the root manifest: small arrays live there).
    files = [f for f in glob.glob(os.path.join(workdir, "checkpoints", "6", "state", "**", "*"),
                                  recursive=True)
             if os.path.isfile(f) and ("ocdbt.process" in f or f"{os.sep}d{os.sep}" in f)]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    capsys.readouterr()
    train.train(c, workdir)
    out = capsys.readouterr().out
    assert "checkpoint(s) [6]" in out and "resumed from step 3" in out, out
    assert len(glob.glob(os.path.join(workdir, "corrupt_checkpoints", "6-*"))) == 1
    _assert_same_params(_params(workdir), full)


def poison_loss_at(monkeypatch, step: int, seed: int = 0) -> None:
    """SimCLR's loss made NaN at loop step `step` (1-based), recognised by the loss's key:
    the train step draws it from fold_in(fold_in(key(seed), 1), step - 1) (experiment.py)."""
    target = jax.random.split(jax.random.fold_in(
        jax.random.fold_in(jax.random.key(seed), 1), step - 1))[1]
    clean = methods.METHODS["simclr"]

    def loss(params, state, views, batch, rng, config, spec):
        value, aux = clean.loss(params, state, views, batch, rng, config, spec)
        hit = jnp.all(jax.random.key_data(rng) == jax.random.key_data(target))
        return value * jnp.where(hit, jnp.nan, 1.0), aux
    monkeypatch.setitem(methods.METHODS, "simclr", dataclasses.replace(clean, loss=loss))


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path,
                                                                      monkeypatch):
    poison_loss_at(monkeypatch, 5)
    c = tiny_config("simclr", tiny_data)  # checkpoints at 3 and 6
    c.log_every_steps = 1
    workdir = str(tmp_path / "w")
    with pytest.raises(FloatingPointError,
                       match=r"Non-finite loss \(nan\) and the gradient of \S+ \(and \d+ more "
                             r"parameters\) at step 5\."):
        train.train(c, workdir)
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps == [3]


def test_nan_skip_policy_keeps_the_state_and_counts(tiny_data, tmp_path, capsys, monkeypatch):
    poison_loss_at(monkeypatch, 5)  # the same poisoned step as above
    c = tiny_config("simclr", tiny_data, nonfinite="skip")
    c.ckpt_every_steps, c.keep_ckpts = 1, 6
    workdir = str(tmp_path / "w")
    state = train.train(c, workdir)
    assert "1 non-finite steps skipped" in capsys.readouterr().out
    assert int(state["step"]) == 6
    assert all(np.isfinite(x).all() for x in _params(workdir).values())
    # Step 5 was skipped: its parameters are step 4's; the other steps trained.
    _assert_same_params(_params(workdir, 5), _params(workdir, 4))
    for a, b in ((3, 4), (5, 6)):
        assert not np.array_equal(*(list(_params(workdir, s).values())[0] for s in (a, b)))


def test_images_with_another_channel_count_than_the_config_are_refused(tiny_dataset, tmp_path):
    data_dir, _ = tiny_dataset  # 6x6 RGB images; the Fashion-MNIST preset normalises 1 channel
    c = tiny_config("simclr", data_dir)
    c.dataset = "tiny_rgb"
    with pytest.raises(ValueError, match=r"tiny_rgb has 3-channel images \(6, 6, 3\) but "
                                         r"config.aug.mean has 1 value\(s\).*--config.aug.mean"):
        train.train(c, str(tmp_path / "w"))
    assert not os.path.exists(os.path.join(tmp_path, "w", "checkpoints"))


# ------------------------------------------------------------- corrupt records

@pytest.fixture
def corrupt_data(tmp_path):
    """A 600-record dataset with 50 bytes flipped in the middle of its train shard:
    -> (data_dir, images (600, 28, 28, 1))."""
    from ssl_jax.datasets import arrays
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (600, 28, 28, 1), dtype=np.uint8)
    data = {"train": (images, rng.integers(0, 10, 600)),
            "test": (images[:10], rng.integers(0, 10, 10))}
    arrays.build_from_arrays("tiny_corrupt", str(tmp_path), data, num_classes=10)
    shard, = glob.glob(str(tmp_path / "tiny_corrupt" / "*" / "*train.array_record*"))
    raw = bytearray(open(shard, "rb").read())
    for i in range(len(raw) // 2, len(raw) // 2 + 50):
        raw[i] ^= 0xFF
    with open(shard, "wb") as f:
        f.write(raw)
    return str(tmp_path), images


def test_corrupt_record_is_named_or_skipped(corrupt_data):
    from ssl_jax.data import sources
    data_dir, images = corrupt_data
    with pytest.raises(sources.CorruptRecordError,
                       match=r"Record (\d+) of tiny_corrupt train in .* cannot be read: .*Riegeli"
                             r".*skip_corrupt=True") as e:
        sources.open_source("tiny_corrupt", "train", data_dir)
    bad = int(str(e.value).split("Record ")[1].split(" ")[0])
    # Skipped: the other 599 records, each with its own index and image.
    src = sources.open_source("tiny_corrupt", "train", data_dir, skip_corrupt=True)
    assert len(src) == 599 and bad not in src.index
    batch = sources.read_batch(src, np.arange(599))
    np.testing.assert_array_equal(batch["image"], images[batch["index"]])
    # Read lazily (big datasets): the batch holding it fails naming it, or is filled.
    lazy = sources.open_source("tiny_corrupt", "train", data_dir, memory_limit=0)
    ix = np.arange(bad - 3, bad + 3)
    with pytest.raises(sources.CorruptRecordError, match=f"Record {bad} of"):
        sources.read_batch(lazy, ix)
    lazy = sources.open_source("tiny_corrupt", "train", data_dir, memory_limit=0,
                                skip_corrupt=True)
    batch = sources.read_batch(lazy, ix)
    assert batch["image"].shape == (6, 28, 28, 1)
    good = ix != bad
    np.testing.assert_array_equal(batch["image"][good], images[ix[good]])


def test_a_run_resumes_on_another_number_of_devices(reference, tmp_path, _cache):
    """Checkpoints hold global arrays and the data position is independent of the
    mesh, so a run stopped on 8 devices resumes on 1 (e.g. a smaller allocation after
    a requeue): it ends where the 1-device run does, up to float summation order."""
    ref, data_dir = reference
    workdir = str(tmp_path / "w")
    cmd = _command(workdir, data_dir, 12, 100)
    env = dict(_env(_cache), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    out = []
    for line in p.stdout:  # stopped with a checkpoint at step >= 4, as SIGTERM does
        out.append(line)
        if "step 4/" in line:
            p.send_signal(signal.SIGTERM)
            break
    out.append(p.stdout.read())
    assert p.wait(timeout=120) == 75, "".join(out)
    assert "on 8 device(s)" in "".join(out)
    out = _run(cmd, _cache)
    assert "on 1 device(s)" in out and "Resumed from step" in out and "Done: 12 steps" in out
    got = _params(workdir)
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
