"""The commands speak to people: a mistake in the command, the config or the data
on disk is one line on stderr, `error: <what and the fix>`, exit status 2, no
traceback, and (train) nothing written. Each case is a real process
(`python -m ssl_jax.train|evaluate|export ...`), all started at once: each pays
JAX's import, not each other's wait."""
import importlib
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIMCLR = "configs/simclr.py:dataset=fashion_mnist,runlocal"
# Besides the error, stderr may hold only absl log records (e.g. TFDS's warning
# about a missing folder), never a print or a traceback.
LOG_RECORD = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def _cases(tmp, tiny_data):
    """name -> (argv after `python -m`, what the error line must say, the
    directory nothing may be written to, extra environment)."""
    empty, norun, old = tmp / "empty", tmp / "norun", tmp / "old_export"
    tiny = ["--config.dataset=tiny_squares", f"--config.data_dir={tiny_data}"]
    empty.mkdir()
    norun.mkdir()
    old.mkdir()
    (old / "export.json").write_text("{}")
    return {
        "two units of one length": (
            ["ssl_jax.train", "--config", SIMCLR, "--config.total_steps=40",
             "--config.total_epochs=0.01", "--workdir", str(tmp / "w4")],
            "--config.total_steps and --config.total_epochs both set config.total_*, in "
            "different units: give one of them.", tmp / "w4", {}),
        "an export over an export": (
            ["ssl_jax.export", "--workdir", str(norun), "--out", str(old)],
            f"--out {old} holds an export already (with whatever was evaluated on it): pass "
            "--overwrite to replace it whole, or choose another --out.", None, {}),
        "unprepared dataset": (
            ["ssl_jax.train", "--config", "configs/simclr.py:dataset=cifar10",
             f"--config.data_dir={empty}", "--workdir", str(tmp / "w1")],
            f"Dataset 'cifar10' is not prepared in {empty}. Prepare it with `python -m "
            f"ssl_jax.prepare --dataset cifar10 --data_dir {empty}`", tmp / "w1", {}),
        "unknown config key": (
            ["ssl_jax.train", "--config", SIMCLR, "--config.optimizer.lrr=0.1",
             "--workdir", str(tmp / "w2")],
            "Unknown config key in --config.optimizer.lrr: config has no key 'optimizer.lrr' "
            "('lrr' missing). Did you mean lr?", tmp / "w2", {}),
        "batch size for the devices": (
            ["ssl_jax.train", "--config", SIMCLR, "--config.dataset=tiny_squares",
             f"--config.data_dir={tiny_data}", "--config.batch_size=66",
             "--workdir", str(tmp / "w3")],
            "config.batch_size=66 is not divisible by the 4 devices of the mesh; use a "
            "multiple of 4 (e.g. 64)", tmp / "w3",
            {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}),
        "unknown evaluator": (
            ["ssl_jax.evaluate", "--workdir", str(norun), "--eval", "linear,lienar"],
            "--eval: 'lienar' is not an evaluator (did you mean linear?); the evaluators are "
            "linear, knn, mlp, lowshot, invariance.", None, {}),
        "a workdir without a run": (
            ["ssl_jax.export", "--workdir", str(norun), "--out", str(tmp / "out")],
            f"{norun}/config.json not found: {norun} is not a training workdir (no run was "
            "started there; python -m ssl_jax.train writes config.json when it starts). Point "
            "--workdir at a training run's folder, or train one there first.",
            tmp / "out", {}),
        # The data's checks run before anything is written too (it left config.json,
        # command.txt and train.log, and the corrected command was then refused).
        "video positives on images": (
            ["ssl_jax.train", "--config", "configs/simclr.py:runlocal,positives=temporal",
             *tiny, "--workdir", str(tmp / "w5")],
            "tiny_squares has no 'video_id' feature (it has ",
            tmp / "w5", {}),
        "a negative batch": (
            ["ssl_jax.train", "--config", SIMCLR, *tiny, "--config.batch_size=-4",
             "--workdir", str(tmp / "w6")],
            "config.batch_size=-4: use a positive integer, the global batch", tmp / "w6", {}),
        "a batch of 0": (
            ["ssl_jax.train", "--config", SIMCLR, *tiny, "--config.batch_size=0",
             "--workdir", str(tmp / "w7")],
            "config.batch_size=0: use a positive integer", tmp / "w7", {}),
        "a split smaller than a batch": (  # in epochs: a schedule of 0 steps an epoch
            ["ssl_jax.train", "--config", "configs/moco.py:dataset=fashion_mnist", *tiny,
             "--config.batch_size=512", "--workdir", str(tmp / "w8")],
            "A split of 256 examples (tiny_squares train) cannot fill a batch of 512: use "
            "--config.batch_size=256 or less, or a bigger split.", tmp / "w8", {}),
        "a misspelt boolean argument": (
            ["ssl_jax.train", "--config", "configs/simclr.py:runlocal=on", *tiny,
             "--workdir", str(tmp / "w9")],
            "Config argument 'runlocal=on': runlocal is true or false", tmp / "w9", {}),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """name -> (case, returncode, stdout, stderr), the commands run concurrently."""
    tmp = tmp_path_factory.mktemp("cli")
    cases = _cases(tmp, tiny_data)
    procs = {}
    for name, (args, _, _, env) in cases.items():
        env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
        procs[name] = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = (cases[name], p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("name", ["unprepared dataset", "unknown config key",
                                  "batch size for the devices", "unknown evaluator",
                                  "a workdir without a run", "two units of one length",
                                  "an export over an export", "video positives on images",
                                  "a negative batch", "a batch of 0",
                                  "a split smaller than a batch",
                                  "a misspelt boolean argument"])
def test_a_mistake_is_one_line_and_exit_status_2_with_nothing_written(runs, name):
    (_, says, untouched, _), returncode, stdout, stderr = runs[name]
    assert "Traceback" not in stdout + stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.splitlines()[-1] == errors[0], stderr
    assert says in errors[0], stderr
    others = [line for line in stderr.splitlines()[:-1] if not LOG_RECORD.match(line)]
    assert not others, stderr
    assert returncode == 2, stderr
    if untouched is not None:  # checks first: the workdir (or export) is not even made
        assert not os.path.exists(untouched) or not os.listdir(untouched), os.listdir(untouched)


# ------------------------------------------------------------------ --help

HELPS = {
    "train": ["ssl_jax.train", "--help"],
    "train with a config": ["ssl_jax.train", "--config", "configs/moco.py:dataset=imagenet2012",
                            "-h"],
    "evaluate": ["ssl_jax.evaluate", "--help"],
    "export": ["ssl_jax.export", "--helpshort"],
    "export, every flag": ["ssl_jax.export", "--helpfull"],
}


@pytest.fixture(scope="module")
def helps():
    """name -> (returncode, stdout, stderr) of HELPS, run concurrently."""
    procs = {name: subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT,
                                    env=dict(os.environ, JAX_PLATFORMS="cpu"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in HELPS.items()}
    return {name: (p.wait(timeout=300), p.stdout.read(), p.stderr.read())
            for name, p in procs.items()}


@pytest.mark.parametrize("name", sorted(HELPS))
def test_help_prints_the_commands_flags_and_exits_0(helps, name):
    returncode, out, err = helps[name]
    assert returncode == 0 and not [ln for ln in err.splitlines() if not LOG_RECORD.match(ln)], err
    command = HELPS[name][0]
    doc = importlib.import_module(command).__doc__.strip()
    assert out.startswith(doc.splitlines()[0]) and "\nFlags:\n" in out, out
    own = {"ssl_jax.train": ["--workdir", "--config"],
           "ssl_jax.evaluate": ["--workdir", "--exported", "--eval", "--[no]random_init"],
           "ssl_jax.export": ["--workdir", "--out", "--[no]overwrite"]}[command]
    for flag in own:
        assert f"\n  {flag}: " in out, (flag, out)
    process = "\n  --coordinator: HOST:PORT of process 0" in out
    assert process == (command != "ssl_jax.export"), out  # train, evaluate run on every host
    assert "!!python" not in out and "(default: 'None')" not in out
    assert ("absl.logging" in out) == (name == "export, every flag"), out


def test_help_lists_the_configs_fields_readably(helps):
    out = helps["train with a config"][1]
    assert "--config configs/moco.py:dataset=imagenet2012:\n  MoCo v2 (He et al." in out
    fields = [ln for ln in out.splitlines() if ln.startswith("  --config.")]
    for field in ("  --config.batch_size=256", "  --config.total_epochs=200.0",
                  "  --config.total_steps=None (int)", "  --config.aug.crop_size=(224, 224)",
                  "  --config.optimizer.name='sgd'", "  --config.moco.queue_size=65536"):
        assert field in fields, (field, out)
    out = helps["train"][1]
    assert "Config files: configs/cmc.py, configs/dino.py, configs/jigsaw.py," in out
    assert not [ln for ln in out.splitlines() if ln.startswith("  --config.")]
    out = helps["evaluate"][1]  # the evaluators' defaults, one field a line
    fields = [ln for ln in out.splitlines() if ln.startswith("  --config.")
              and not ln.startswith("  --config.<field>")]
    assert "  --config.eval.knn.also_k=(20,)" in fields
    assert "  --config.eval.linear.lr=0.3" in fields
    assert all(ln.startswith("  --config.eval.") for ln in fields), fields


@pytest.mark.parametrize("args", [[], ["bogus"]])
def test_run_sh_without_a_known_command_prints_its_usage_and_exits_2(args):
    p = subprocess.run(["./run.sh", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr == ("usage: ./run.sh demo [--config.field=value ...] | "
                        "./run.sh test [pytest args]\n")
