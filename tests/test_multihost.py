"""Multi-process runs for real: two `python -m ssl_jax.train` processes on 127.0.0.1
joined by jax.distributed (CPU collectives: gloo), as launch/ starts them on a pod.

What is pinned: a two-process run equals a one-process run with the same global
batch and the same total device count, state leaf for state leaf and bit for bit
(the data order does not depend on the process count: pipeline.py); both
processes killed and restarted resume bitwise; a memory bank sharded over the
processes' devices (NPID's, which PIRL shares) too; a process that dies makes the other
stop with an error within a bounded time; an unreachable coordinator and
mismatched configs fail before anything is written; evaluate on two processes
prints the one-process numbers.

Every subprocess has a timeout: a hang is a failure here, never a stuck CI.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # per run; a tiny run takes ~20-60 s here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(method, workdir, data_dir, steps, *extra):
    """A tiny run of `method` on the tiny_squares fixture through the real command line."""
    # DINO's preset encoder is a ViT: the same ConvNet as the others instead.
    model = ",model=convnet" if method == "dino" else ""
    args = ["--config", f"configs/{method}.py:dataset=fashion_mnist,runlocal{model}",
            "--workdir", workdir, "--config.dataset=tiny_squares",
            f"--config.data_dir={data_dir}", "--config.batch_size=32",
            # Two tiny blocks and XLA's own convolution: each process compiles its
            # programs (~20 s), which is most of a run's time here.
            "--config.model.widths=(4,8)", "--config.model.conv=xla",
            f"--config.total_steps={steps}",
            "--config.log_every_steps=1", "--config.eval.batch_size=64"]
    if method == "dino":  # its head is config.dino's
        args += ["--config.dino.out_dim=32", "--config.dino.hidden=16",
                 "--config.dino.bottleneck=8", "--config.dino.local_crops=2"]
    elif method not in ("npid", "pirl"):  # their heads are sized by their runlocal presets
        args += ["--config.head.hidden=16", "--config.head.dim=8"]
    if method == "moco":
        args += ["--config.moco.queue_size=64", "--config.moco.bn_groups=8"]
    return args + list(extra)


_STARTED = []  # every Group, so that a failed test leaves no process behind


@pytest.fixture(autouse=True)
def _kill_leftovers():
    yield
    while _STARTED:
        _STARTED.pop().kill()


class Group:
    """`processes` copies of `python -m ssl_jax.<command>`, each seeing `devices` CPU
    devices, joined through a coordinator on 127.0.0.1 (one plain process if 1)."""

    def __init__(self, command, args, processes, devices, cache, extra_env=None,
                 per_process=None):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_THREEFRY_PARTITIONABLE="0",  # conftest.fast_prng: 10x faster compiles
                   **(extra_env or {}))
        coordinator = f"127.0.0.1:{_free_port()}"
        self.procs = []
        _STARTED.append(self)
        for i in range(processes):
            flags = ([] if processes == 1 else
                     ["--coordinator", coordinator, "--num_processes", str(processes),
                      "--process_id", str(i), "--initialization_timeout", "60"])
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", f"ssl_jax.{command}", *args, *flags,
                 *(per_process or {}).get(i, [])], cwd=ROOT,
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    def wait(self, timeout=TIMEOUT_S):
        """-> [(return code, output)] of every process; kills them all on timeout."""
        deadline, results = time.time() + timeout, []
        try:
            for p in self.procs:
                out, _ = p.communicate(timeout=max(1, deadline - time.time()))
                results.append((p.returncode, out))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("a process did not exit in time:\n"
                                 + "\n".join(p.communicate()[0][-3000:] for p in self.procs))
        return results

    def until(self, text, timeout=TIMEOUT_S, path=None):
        """Blocks until process 0 prints a line containing `text` (and `path` exists,
        checked at each line it prints); -> what it printed."""
        deadline, out = time.time() + timeout, []
        for line in self.procs[0].stdout:
            out.append(line)
            if text in "".join(out) and (path is None or os.path.exists(path)):
                return "".join(out)
            if time.time() > deadline:
                break
        self.kill()
        raise AssertionError(f"never printed {text!r}:\n" + "".join(out)[-3000:])

    def kill(self, sig=signal.SIGKILL):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)


def _ok(results):
    for rc, out in results:
        assert rc == 0, out[-4000:]
    return results[0][1]


def _state(workdir, step=None) -> dict:
    """{leaf path: numpy array} of the whole saved train state (params, optimizer
    moments, BN statistics, queues, banks, step) at `step` (default: the newest)."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = manager.latest_step() if step is None else step
    path = os.path.join(manager.directory, str(step), "state")
    manager.close()
    tree = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ocp.PyTreeCheckpointer().restore(path, restore_args=restore_args)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def _assert_same_state(a, b, exact=True):
    """exact=False: to float32 rounding grown over a few steps (rtol 1e-4, atol 1e-5;
    Adam divides near-zero gradients by their own size, so a last-bit difference
    there moves a parameter by up to ~1e-6 a step), for runs whose cross-device sums
    are ordered differently (see the sharded-state test); integer leaves stay exact."""
    assert a.keys() == b.keys()
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    if exact:
        assert not differ, f"{len(differ)} of {len(a)} state leaves differ, e.g. {differ[:4]}"
    for k in a:
        if a[k].dtype.kind in "iub":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    print(f"{len(differ)} of {len(a)} state leaves differ in their last bits: {differ[:8]}")


def _losses(out):
    """The losses of the progress lines ("[###---] step 3/16 loss 4.123 ..."), in order."""
    return [line.split(" loss ")[1].split()[0] for line in out.splitlines()
            if line.startswith("[") and "] step " in line and " loss " in line]


@pytest.fixture(scope="module")
def cache(module_compilation_cache):
    return module_compilation_cache


# ------------------------------------------------- equal to one process, and resume

def test_simclr_two_processes_equal_one_and_resume_after_sigterm(tiny_data, tmp_path, cache):
    """2 processes x 1 device == 1 process x 2 devices; SIGTERM to both (a pod's
    preemption) makes both save the same step and exit 75; the same command resumes
    and ends bitwise equal; evaluate on 2 processes prints the 1-process numbers."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    steps = 16  # enough steps after the signal for the processes to agree on one
    # The reference runs beside the two-process group: compiling is single-threaded.
    ref = Group("train", _train_args("simclr", one, tiny_data, steps), 1, 2, cache)
    group = Group("train", _train_args("simclr", two, tiny_data, steps), 2, 1, cache)
    seen = group.until("step 2/")  # process 0's first lines: wait() returns the rest
    group.kill(signal.SIGTERM)
    stopped = group.wait()
    for rc, out in stopped:
        assert rc == 75, out[-4000:]  # EX_TEMPFAIL: launch/slurm.sbatch requeues on it
    assert "Preempted (SIGTERM) at step" in stopped[0][1]
    at = int(stopped[0][1].split("Preempted (SIGTERM) at step ")[1].split("/")[0])
    assert 2 <= at < steps
    resumed = _ok(Group("train", _train_args("simclr", two, tiny_data, steps), 2, 1,
                        cache).wait())
    assert f"Resumed from step {at}" in resumed and f"Done: {steps} steps" in resumed
    reference = _ok(ref.wait())
    assert len(_losses(reference)) == steps  # one progress line a step (log_every 1)
    assert _losses(seen + stopped[0][1])[:at] + _losses(resumed) == _losses(reference)
    _assert_same_state(_state(two), _state(one))
    # Only process 0 writes the run's files; both wrote their data-iterator state.
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    with open(os.path.join(two, "train.log")) as f:  # process 0's lines, both starts
        log = f.read()
    assert log.count("command: python -m ssl_jax.train ") == 2 and "--process_id 0" in log
    assert "Resumed from step" in log and f"Done: {steps} steps" in log

    evals = ["evaluate", "--eval", "knn", "--config.eval.knn.k=5"]
    ev_one = Group(evals[0], [*evals[1:], "--workdir", one], 1, 2, cache)
    ev_two = Group(evals[0], [*evals[1:], "--workdir", two], 2, 1, cache)
    line = [next(l for l in _ok(g.wait()).splitlines() if "knn" in l and "%" in l)
            for g in (ev_one, ev_two)]
    assert line[0] == line[1]


def test_dino_two_processes_equal_one(tiny_data, tmp_path, cache):
    """DINO's centre is an EMA of the teacher's outputs averaged over the global batch, and
    its teacher follows the student: 2 processes x 1 device end where 1 process of 1
    device does (to float32 rounding: the sums are ordered differently), centre, teacher
    and schedule count included. (Against 1 process of 2 devices, a centre averaged over
    each device's rows only would be equally wrong in both.)"""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ref = Group("train", _train_args("dino", one, tiny_data, 3), 1, 1, cache)
    group = Group("train", _train_args("dino", two, tiny_data, 3), 2, 1, cache)
    got, want = (np.asarray(_losses(_ok(g.wait())), float) for g in (group, ref))
    assert len(want) == 3
    np.testing.assert_allclose(got, want, rtol=1e-4)
    a, b = _state(two), _state(one)
    _assert_same_state(a, b, exact=False)
    centre = next(v for k, v in a.items() if "center" in k)
    assert np.abs(centre).sum() > 0


def test_two_processes_stop_together_at_a_cpu_budget_that_sums_both(tiny_data, tmp_path, cache):
    """config.cpu_budget_minutes in a 2-process run: the count is the sum over the
    processes (an all-gather at log steps), so both stop, saved, at the same step and
    exit 0; what process 0 records is both processes' time, not its own."""
    import resource

    def children_s():
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime
    workdir, before = str(tmp_path / "w"), children_s()
    # 0.3 CPU-min: less than two processes' start and compilation, so the first log
    # step (every step here) already crosses it.
    results = Group("train", _train_args("simclr", workdir, tiny_data, 40,
                                         "--config.cpu_budget_minutes=0.3"), 2, 1, cache).wait()
    out = _ok(results)  # both exit 0: a budget's stop is the run's end
    used = children_s() - before  # both processes, to their exit
    assert "Stopped at the CPU budget (0.3 CPU-min" in out, out[-3000:]
    step = int(out.split("Stopped at the CPU budget")[1].split(" at step ")[1].split("/")[0])
    with open(os.path.join(workdir, "cpu_seconds.json")) as f:
        recorded = json.load(f)[str(step)]
    assert recorded >= 18  # the budget
    # Both processes' time at that step: well over the half of their total that one
    # process's own count would be (their exit after it costs a few seconds).
    assert 0.65 * used < recorded <= used, (recorded, used)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


def _logged_losses(workdir) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]


@pytest.mark.parametrize("method,extra", [
    ("polyview", ()),  # the preset's M = 4 views, Poly-View's loss over the global batch
    ("cmc", ("--config.cmc.objective=nce",)),  # CMC's NCE: 4 banks sharded over processes
])
def test_multiview_two_processes_equal_one(method, extra, tiny_data, tmp_path, cache):
    """The M-view losses gather every view of the global batch across processes; CMC's NCE
    also reads and writes per-view memory banks sharded over the processes' devices and
    estimates each Z over the global batch on step 1: 2 processes x 1 device end where 1
    process of 1 device does (to float32 rounding), banks and Z included."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ref = Group("train", _train_args(method, one, tiny_data, 3, *extra), 1, 1, cache)
    group = Group("train", _train_args(method, two, tiny_data, 3, *extra), 2, 1, cache)
    for g in (group, ref):
        _ok(g.wait())
    # From metrics.jsonl: more digits than the progress lines' 3.
    got, want = (np.asarray(_logged_losses(w)) for w in (two, one))
    assert len(want) == 3 and np.isfinite(want).all()
    np.testing.assert_allclose(got, want, rtol=1e-4)
    a, b = _state(two), _state(one)
    _assert_same_state(a, b, exact=False)
    if method == "cmc":
        banks = [k for k in a if "banks" in k]
        assert len(banks) == 4, banks
        log_z = next(v for k, v in a.items() if "log_z" in k)
        assert np.isfinite(log_z[0, 1:]).all() and np.isfinite(log_z[1:, 0]).all()


def test_moco_two_processes_of_four_devices_equal_one_of_eight_after_both_are_killed(
        tiny_data, tmp_path, cache):
    """MoCo (queue, key encoder, shuffle-BN across processes): 2 processes x 4
    devices == 1 process x 8 devices, after both processes were SIGKILLed once the
    step-2 checkpoint was complete (a lost slice) and the same command restarted."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = lambda w: _train_args("moco", w, tiny_data, 8, "--config.ckpt_every_steps=2",  # noqa: E731
                                 "--config.keep_ckpts=8")
    ref = Group("train", args(one), 1, 8, cache)
    group = Group("train", args(two), 2, 4, cache)
    # orbax renames a checkpoint's folder to "2" once every process's part is written.
    group.until("step 3/", path=os.path.join(two, "checkpoints", "2"))
    group.kill()
    group.wait()
    # Restart from step 2 whatever the kill caught: later checkpoints go, as if
    # the processes had died right after step 2's.
    for s in os.listdir(os.path.join(two, "checkpoints")):
        if s.isdigit() and int(s) > 2:
            shutil.rmtree(os.path.join(two, "checkpoints", s))
    out = _ok(Group("train", args(two), 2, 4, cache).wait())
    assert "Resumed from step 2" in out
    reference = _ok(ref.wait())
    got, want = np.asarray(_losses(out), float), np.asarray(_losses(reference)[2:], float)
    assert len(want) == 6
    np.testing.assert_allclose(got, want, atol=2e-3)  # 3 printed decimals; see below
    # Not bitwise: with 4 devices a process, an all-reduce sums each process's 4
    # devices first and then the 2 processes (Gloo), a different order from one
    # process's 8-way sum, so float32 sums may differ in their last bit.
    _assert_same_state(_state(two), _state(one), exact=False)


def test_memory_bank_sharded_over_two_processes_equals_one_process(tiny_data, tmp_path, cache):
    """NPID's memory bank (PIRL's: methods/pirl.py, without the jigsaw branch, whose
    views are per-device work pinned on 1 and 8 devices in test_pirl.py) sharded over
    the devices of two processes: its warm start's rows, and the rows written and
    looked up across them at each step: 2 x 1 device == 1 x 2 devices, bit for bit."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ref = Group("train", _train_args("npid", one, tiny_data, 4), 1, 2, cache)
    out = _ok(Group("train", _train_args("npid", two, tiny_data, 4), 2, 1, cache).wait())
    assert _losses(out) == _losses(_ok(ref.wait()))
    _assert_same_state(_state(two), _state(one))


# ----------------------------------------------------------------- failures

def test_a_dead_process_stops_the_other_at_once_with_one_line(tiny_data, tmp_path, cache):
    group = Group("train", _train_args("simclr", str(tmp_path / "w"), tiny_data, 400,
                                       "--heartbeat_timeout", "20"), 2, 1, cache)
    group.until("step 2/")
    group.procs[1].kill()
    t0 = time.time()
    rc, out = group.wait(timeout=60)[0]
    # Gloo sees the closed connection at the next collective; were it missed, the
    # coordination service's heartbeat (20 s here) would end the process.
    assert time.time() - t0 < 45
    assert rc == 3, out[-3000:]
    assert "error: process 0 of 2 lost contact with the others" in out


def test_unreachable_coordinator_fails_after_the_timeout_writing_nothing(tiny_data, tmp_path,
                                                                         cache):
    workdir = tmp_path / "w"
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "-m", "ssl_jax.train",
         *_train_args("simclr", str(workdir), tiny_data, 4),
         "--coordinator", f"127.0.0.1:{_free_port()}", "--num_processes", "2",
         "--process_id", "1", "--initialization_timeout", "5"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "error: Could not join the multi-process run as process 1 of 2" in p.stderr
    assert time.time() - t0 < 60
    assert not workdir.exists()


def test_processes_with_different_configs_refuse_to_start(tiny_data, tmp_path, cache):
    workdir = tmp_path / "w"
    # Process 1 has another learning rate, as a host with a stale flag would.
    group = Group("train", _train_args("simclr", str(workdir), tiny_data, 4), 2, 1, cache,
                  per_process={1: ["--config.optimizer.lr=0.5"]})
    for rc, out in group.wait(timeout=120):
        assert rc == 2, out[-3000:]
        assert "The processes were given different configs: process(es) [1]" in out
    assert not workdir.exists()
