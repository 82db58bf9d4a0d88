"""launch/: the scripts parse (and pass shellcheck where it is installed), print
the commands they would run (--dry_run, SSL_JAX_DRY_RUN), and handle processes
as they say: local.sh's exit status, stopping the others when one fails, no
processes left behind; slurm.sbatch's requeue on exit 75. Stand-ins for python,
srun and scontrol keep those tests fast; one test runs the real trainer."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["local.sh", "tpu_pod.sh", "slurm.sh", "slurm.sbatch"]
JAX_VERSION = re.search(r"^jax==(\S+)", open(os.path.join(ROOT, "requirements.txt")).read(),
                        re.M).group(1)


def _launch(name, *args, env=None, timeout=60):
    return subprocess.run([os.path.join(ROOT, "launch", name), *args], cwd=ROOT,
                          env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                          timeout=timeout)


def _processes_with(marker: str) -> list[str]:
    """The command lines of the running processes that contain `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in args:
            found.append(f"{pid}: {args}")
    return found


# ------------------------------------------------------------------ the scripts

@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_executable_bash_that_parses(name):
    path = os.path.join(ROOT, "launch", name)
    assert os.access(path, os.X_OK), f"chmod +x {path}"
    p = subprocess.run(["bash", "-n", path], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_finds_nothing():
    paths = [os.path.join(ROOT, "launch", name) for name in SCRIPTS + ["quoting.sh"]]
    p = subprocess.run(["shellcheck", "--shell=bash", *paths], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("name, args", [
    ("local.sh", ["--processes", "0", "--", "--config", "x"]),
    ("local.sh", ["retrain", "--", "--config", "x"]),
    ("local.sh", ["--processes", "2", "--", "--process_id", "1"]),
    ("tpu_pod.sh", ["my-pod", "us-central2-b"]),
    ("tpu_pod.sh", ["my-pod", "us-central2-b", "my-proj", "--dry_run"]),
    ("slurm.sh", ["--nodes", "2", "--time", "01:00:00", "--", "--config", "x"]),
    ("slurm.sh", ["--nodes", "2", "--gpus_per_node", "4", "--time", "soon", "--", "x"]),
])
def test_a_wrong_command_line_prints_the_usage_and_exits_2(name, args):
    p = _launch(name, *args)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.splitlines()[-1].startswith(f"usage: launch/{name}"), p.stderr
    assert not p.stdout


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_exits_0(name, flag):
    p = _launch(name, flag)
    assert p.returncode == 0 and p.stdout.startswith("usage: "), p.stdout + p.stderr
    assert f"launch/{name}" in p.stdout.splitlines()[0] and not p.stderr
    if name == "tpu_pod.sh":  # after NAME ZONE PROJECT too, as anywhere before --
        p = _launch(name, "my-pod", "us-central2-b", "my-proj", flag)
        assert p.returncode == 0 and p.stdout.startswith("usage: "), p.stdout + p.stderr


# -------------------------------------------------------------------- dry runs

def test_tpu_pod_dry_run_copies_installs_and_trains_on_every_worker():
    train_args = ["--config", "configs/moco.py:dataset=imagenet2012", "--workdir", "gs://b/w",
                  "--config.name=it's mine"]  # a quote and a space, to check the quoting
    p = _launch("tpu_pod.sh", "my-pod", "us-central2-b", "my-proj", "--dry_run", "--",
                *train_args)
    assert p.returncode == 0, p.stderr
    assert "gs://" not in p.stderr  # no warning about the workdir
    commands = [shlex.split(line) for line in p.stdout.splitlines()]
    assert [c[:4] for c in commands] == [
        ["git", "-C", ROOT, "archive"],
        ["gcloud", "compute", "tpus", "tpu-vm"], ["gcloud", "compute", "tpus", "tpu-vm"],
        ["gcloud", "compute", "tpus", "tpu-vm"], ["gcloud", "compute", "tpus", "tpu-vm"]]
    tarball = commands[0][commands[0].index("-o") + 1]
    assert commands[0][-1] == "HEAD"
    target = ["--zone", "us-central2-b", "--project", "my-proj", "--worker=all"]
    assert commands[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                           "my-pod:ssl_jax.tar.gz", *target]
    remote = []
    for c in commands[2:]:
        assert c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"], c
        assert c[6:-2] == target and c[-2] == "--command", c
        remote.append(c[-1])
    unpack, install, train = remote
    assert "tar -xzf ~/ssl_jax.tar.gz -C ~/ssl_jax" in unpack
    assert "pip install -q -r requirements.txt" in install
    assert shlex.split(install.split("-r requirements.txt ", 1)[1].split(";")[0]) == [
        f"jax[tpu]=={JAX_VERSION}", "gcsfs", "google-cloud-storage"]  # gs:// backends
    words = shlex.split(train)
    assert words[:6] == ["cd", "~/ssl_jax", "&&", "SSL_JAX_DISTRIBUTED=auto",
                         "~/ssl_jax_venv/bin/python", "-m"], train
    assert words[6:] == ["ssl_jax.train", *train_args]  # what the worker's shell passes on


def test_tpu_pod_warns_about_a_workdir_off_cloud_storage():
    p = _launch("tpu_pod.sh", "my-pod", "us-central2-b", "my-proj", "--dry_run", "--",
                "--config", "configs/simclr.py", "--workdir=runs/x")
    assert p.returncode == 0, p.stderr
    assert "warning: --workdir runs/x is not on gs://" in p.stderr


def test_slurm_dry_run_submits_one_task_per_node_and_shows_the_step():
    train_args = ["--config", "configs/simclr.py:dataset=imagenet2012", "--workdir", "/shared/w"]
    p = _launch("slurm.sh", "--nodes", "2", "--gpus_per_node", "4", "--time", "04:00:00",
                "--partition", "gpu", "--account", "lab", "--dry_run", "--", *train_args)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if not line.startswith("#")]
    sbatch, srun, requeue = (shlex.split(line) for line in lines)
    assert sbatch == ["sbatch", "--nodes=2", "--ntasks-per-node=1", "--time=04:00:00",
                      "--gpus-per-node=4", "--partition=gpu", "--account=lab",
                      f"--export=ALL,SSL_JAX_ROOT={ROOT},SSL_JAX_GPUS_PER_NODE=4",
                      os.path.join(ROOT, "launch", "slurm.sbatch"), *train_args]
    # One process per node sees all 4 GPUs (JAX would give it only SLURM_LOCALID's).
    assert srun == ["env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3", "srun", "--ntasks-per-node=1",
                    "--kill-on-bad-exit=1", os.path.join(ROOT, ".venv", "bin", "python"),
                    "-m", "ssl_jax.train", *train_args]
    assert requeue == ["scontrol", "requeue", "$SLURM_JOB_ID"]
    header = open(os.path.join(ROOT, "launch", "slurm.sbatch")).read()
    for directive in ("--ntasks-per-node=1", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {directive}\n" in header
    assert re.search(r"^#SBATCH --signal=B:TERM@\d+$", header, re.M)


def test_local_dry_run_shows_one_command_per_process():
    p = _launch("local.sh", "--processes", "2", "--devices_per_process", "1", "--dry_run",
                "train", "--", "--config", "configs/simclr.py:runlocal", "--workdir", "w")
    assert p.returncode == 0, p.stderr
    commands = [shlex.split(line) for line in p.stdout.splitlines()]
    assert len(commands) == 2
    port = commands[0][commands[0].index("--coordinator") + 1]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", port)
    for i, c in enumerate(commands):
        assert c == ["JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=1",
                     os.path.join(ROOT, ".venv", "bin", "python"), "-m", "ssl_jax.train",
                     "--coordinator", port, "--num_processes", "2", "--process_id", str(i),
                     "--config", "configs/simclr.py:runlocal", "--workdir", "w"]
    p = _launch("local.sh", "--dry_run", "evaluate", "--", "--workdir", "w")
    assert shlex.split(p.stdout) == [os.path.join(ROOT, ".venv", "bin", "python"), "-m",
                                     "ssl_jax.evaluate", "--workdir", "w"]


# ------------------------------------------ process handling, with stand-ins

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python: -m ssl_jax.CMD --coordinator A --num_processes N --process_id I ...
id=$8
case "$FAKE_MODE:$id" in
  fail:1) sleep 1; exit 3 ;;                           # one process fails ...
  fail:*) trap '' TERM; sleep 300 & wait; exit 0 ;;    # ... the others hang (in a collective)
  term:*) trap 'exit 75' TERM; touch "$FAKE_READY/$id"; sleep 300 & wait ;;  # preempted: exit 75
esac
"""


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return str(path)


def test_local_stops_the_others_when_one_fails_and_leaves_no_process(fake_python):
    marker = f"--marker={fake_python}"
    start = time.time()
    p = _launch("local.sh", "--processes", "3", "train", "--", marker,
                env=dict(SSL_JAX_PYTHON=fake_python, FAKE_MODE="fail", SSL_JAX_KILL_GRACE_S="2"))
    assert p.returncode == 3, p.stderr  # the failed one's status, not the killed ones'
    assert "process 1 exited with status 3; stopping the others" in p.stderr
    assert time.time() - start < 30
    time.sleep(0.2)
    assert not _processes_with(fake_python)  # the hung ones and their helpers are gone


def test_local_passes_sigterm_on_and_exits_75(fake_python, tmp_path):
    ready = tmp_path / "ready"  # each stand-in touches ready/ID once its SIGTERM trap is set
    ready.mkdir()
    p = subprocess.Popen([os.path.join(ROOT, "launch", "local.sh"), "--processes", "2", "train",
                          "--", f"--marker={fake_python}"], cwd=ROOT, text=True,
                         env=dict(os.environ, SSL_JAX_PYTHON=fake_python, FAKE_MODE="term",
                                  FAKE_READY=str(ready)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while len(os.listdir(ready)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=30)
    assert p.returncode == 75, stderr
    time.sleep(0.2)
    assert not _processes_with(fake_python)


@pytest.fixture
def fake_slurm(tmp_path):
    """A PATH with stand-ins for srun (exits $FAKE_SRUN_STATUS, or 75 on SIGTERM once
    it has written srun.started) and scontrol (logs its arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        "trap 'kill $! 2>/dev/null; exit 75' TERM\n"
        f"echo \"$@\" > {tmp_path}/srun.started\n"
        "[ \"$FAKE_SRUN_STATUS\" != wait ] || { sleep 300 & wait; }\n"
        "exit \"$FAKE_SRUN_STATUS\"\n")
    (bin_dir / "scontrol").write_text(f"#!/usr/bin/env bash\necho \"$@\" >> {log}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_GPUS_ON_NODE="2", SSL_JAX_ROOT=ROOT)
    return env, log, tmp_path / "srun.started"


@pytest.mark.parametrize("status", [0, 1, 75])
def test_slurm_batch_script_requeues_exactly_when_preempted(fake_slurm, status):
    env, log, started = fake_slurm
    p = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "--workdir", "w"],
                       env=dict(os.environ, **env, FAKE_SRUN_STATUS=str(status)),
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == status, p.stdout + p.stderr
    assert started.read_text().split() == [
        "--ntasks-per-node=1", "--kill-on-bad-exit=1", os.path.join(ROOT, ".venv/bin/python"),
        "-m", "ssl_jax.train", "--workdir", "w"]
    assert (log.read_text() if log.exists() else "") == ("requeue 4242\n" if status == 75 else "")


def test_slurm_batch_script_passes_sigterm_to_srun_and_requeues(fake_slurm):
    env, log, started = fake_slurm
    p = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "--workdir", "w"],
                         env=dict(os.environ, **env, FAKE_SRUN_STATUS="wait"), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while not started.exists() and time.time() < deadline:
        time.sleep(0.1)
    # (srun's stand-in sets its trap before it writes the file; the script sets its own first)
    p.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 sends the batch shell
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 75, stdout + stderr
    assert "SIGTERM: passing it to srun" in stdout
    assert log.read_text() == "requeue 4242\n"


# ------------------------------------------------------ the real trainer

def test_local_real_processes_with_a_bad_config_key_exit_2_and_leave_nothing(tmp_path):
    workdir = str(tmp_path / "w")
    p = _launch("local.sh", "--processes", "2", "--devices_per_process", "1", "train", "--",
                "--config", "configs/simclr.py:runlocal", "--workdir", workdir,
                "--config.optimizer.lrr=0.1", env=dict(SSL_JAX_PYTHON=sys.executable), timeout=240)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("Unknown config key in --config.optimizer.lrr" in e for e in errors)
    assert not os.path.exists(workdir)
    assert not _processes_with(workdir)


@pytest.mark.skipif(os.environ.get("SSL_JAX_LAUNCH_TRAIN") != "1", reason=(
    "2 training processes: ~45 s of CPU each, 2m46s on the shared 2-core test machine; "
    "set SSL_JAX_LAUNCH_TRAIN=1 to run"))
def test_local_two_processes_train_for_real(tiny_data, tmp_path):
    workdir = str(tmp_path / "w")
    p = _launch("local.sh", "--processes", "2", "--devices_per_process", "1", "train", "--",
                "--config", "configs/simclr.py:dataset=fashion_mnist,runlocal",
                "--workdir", workdir, "--config.dataset=tiny_squares",
                f"--config.data_dir={tiny_data}", "--config.batch_size=16",
                "--config.model.widths=(4,8)", "--config.model.conv=xla", "--config.head.hidden=16",
                "--config.head.dim=8", "--config.total_steps=2", "--config.log_every_steps=1",
                env=dict(SSL_JAX_PYTHON=sys.executable, JAX_THREEFRY_PARTITIONABLE="false"), timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "on 2 device(s)" in p.stdout and "Done: 2 steps" in p.stdout, p.stdout
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
