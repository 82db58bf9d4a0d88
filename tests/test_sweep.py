"""launch/sweep.py: checks before anything starts, the grid and its names, the
summary, and a real two-point sweep on tiny data, one point interrupted by
SIGTERM and resumed by re-running the sweep."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import sweep  # noqa: E402
import sweep_summary  # noqa: E402

CONFIG = "configs/simclr.py:dataset=fashion_mnist,runlocal"


def _main(capsys, *argv):
    rc = sweep.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------ checks

@pytest.mark.parametrize("spec, expected", [
    ("config.optimizer.lrr=0.1", ["optimizer.lrr", "Did you mean lr", "weight_decay"]),
    ("config.simclr.temprature=0.1", ["Did you mean temperature"]),
    ("config.optimizer.lr=0.1,abc", ["optimizer.lr=abc", "could not convert", "float"]),
    ("config.batch_size=64,0.5", ["batch_size=0.5", "int"]),
])
def test_bad_key_or_value_is_refused_before_anything_starts(capsys, tmp_path, spec, expected):
    root = tmp_path / "root"
    rc, out, err = _main(capsys, "--config", CONFIG, "--sweep", "config.seed=0,1",
                         "--sweep", spec, "--root", str(root))
    assert rc == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for e in expected:
        assert e in err, err
    assert not root.exists()


def test_other_refusals(capsys, tmp_path):
    root = str(tmp_path / "root")
    for argv, expected in [
        (["--sweep", "config.seed=0", "--sweep", "config.seed=1"], "swept twice"),
        (["--sweep", "config.seed="], "KEY=V1,V2"),
        (["--sweep", "config.seed=0", "--eval", "linear,nope"], "unknown"),
        (["--sweep", "config.seed=0", "--launcher", "tpu"], "--tpu NAME,ZONE,PROJECT"),
        (["--sweep", "config.seed=0,1", "--", "--config.seed=3"], "given after --"),
        ([], "nothing to sweep"),
    ]:
        rc, _, err = _main(capsys, "--config", CONFIG, "--root", root, *argv)
        assert rc == 2 and expected in err, (argv, err)
    assert not os.path.exists(root)


def test_summarize_refuses_a_folder_that_holds_no_sweep(capsys, tmp_path):
    """--summarize on a folder no sweep ran in (a typo, a run's workdir) is an error,
    not an empty table with exit 0; it writes no summary there."""
    (tmp_path / "some_run").mkdir()
    (tmp_path / "some_run" / "config.json").write_text("{}")
    for root in (tmp_path, tmp_path / "some_run"):
        rc, out, err = _main(capsys, "--root", str(root), "--summarize")
        assert rc == 2 and not out, out
        assert err == (f"error: --summarize: {root} holds no sweep (no sweep.json, no point "
                       "with sweep_point.json): give the --root a sweep ran in.\n")
    assert sorted(os.listdir(tmp_path)) == ["some_run"]
    assert sorted(os.listdir(tmp_path / "some_run")) == ["config.json"]


def test_command_line_exit_status(tmp_path):
    p = subprocess.run([sys.executable, "launch/sweep.py", "--config", CONFIG, "--sweep",
                        "config.optimizer.nope=1", "--root", str(tmp_path / "r")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: "), p.stderr
    assert "Valid keys here" in p.stderr and not (tmp_path / "r").exists()


# ------------------------------------------------------------- grid, names

def test_grid_and_names():
    assert sweep.split_values("0.1, (1,2),'a,b',[3,4]") == ["0.1", "(1,2)", "'a,b'", "[3,4]"]
    points = sweep.grid(["config.optimizer.lr=0.03,0.1", "moco.temperature=0.1,0.2"])
    assert points == [[("optimizer.lr", a), ("moco.temperature", b)]
                      for a in ("0.03", "0.1") for b in ("0.1", "0.2")]
    names = sweep.name_points(points)
    assert names[0] == "optimizer.lr=0.03,moco.temperature=0.1"
    assert len(set(names)) == 4
    tricky = [[("model.widths", "(8, 16)")], [("model.widths", "(8,_16)")],
              [("a.b", "x/y")]]
    names = sweep.name_points(tricky)
    assert len(set(names)) == 3 and all("/" not in n and " " not in n for n in names)
    long = [[(f"optimizer.some_long_key_{i}", "0.000123456") for i in range(8)]]
    name, = sweep.name_points(long)
    assert len(name) <= 100 and name.startswith("some_long_key_0=")


def test_sweep_function_and_dry_runs(capsys, tmp_path):
    cfg = tmp_path / "my.py"
    cfg.write_text(
        "from ssl_jax.config import load_file\n"
        f"def get_config(arg=None):\n    return load_file({CONFIG!r})\n"
        "def sweep(arg):\n"
        "    return [{'config.optimizer.lr': lr, 'config.model.widths': (4, 8, 8, 16)}\n"
        "            for lr in (0.01, 0.02)]\n")
    root = tmp_path / "root"
    rc, out, err = _main(capsys, "--config", str(cfg), "--root", str(root), "--eval", "knn",
                         "--dry_run", "--", "--config.total_steps=7")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 4 and "ssl_jax.evaluate" in lines[1]
    assert "--config.optimizer.lr=0.02" in lines[2] and "--config.total_steps=7" in lines[2]
    assert "/optimizer.lr=0.01,model.widths=4-8-8-16 " in lines[0]
    # The function times a grid; slurm: one array task per point.
    rc, out, err = _main(capsys, "--config", str(cfg), "--sweep_fn", "--sweep",
                         "config.seed=0,1", "--root", str(root), "--launcher", "slurm",
                         "--parallel", "2", "--dry_run")
    assert rc == 0, err
    assert "#SBATCH --array=0,1,2,3%2" in out and out.count("--workdir") == 4
    assert "scontrol requeue" in out
    # tpu: launch/tpu_pod.sh NAME ZONE PROJECT -- <train args>
    rc, out, err = _main(capsys, "--config", str(cfg), "--root", str(root), "--launcher",
                         "tpu", "--tpu", "pod,zone-a,proj", "--dry_run")
    assert rc == 0, err
    assert "tpu_pod.sh pod zone-a proj -- --config" in out.splitlines()[0]
    assert not root.exists()


def test_summary_of_logged_metrics(tmp_path):
    root = tmp_path / "root"
    for name, lr, acc, loss in (("a", "0.1", 40.0, 2.0), ("b", "0.2", 55.0, 2.5)):
        wd = root / name
        wd.mkdir(parents=True)
        (wd / "checkpoints" / "10").mkdir(parents=True)
        (wd / "checkpoints" / "12.orbax-checkpoint-tmp-3").mkdir()
        lines = [{"step": 5, "train/loss": 9.0, "train/images_per_sec": 0.0},
                 {"step": 10, "train/loss": loss, "train/images_per_sec": 100.0},
                 {"step": 10, "online_knn/top1": acc}]
        (wd / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines)
                                          + '{"step": 1')  # a line cut by a kill
        sweep_summary.write_point(str(wd), dict(values={"optimizer.lr": lr}, train_rc=0,
                                                total_steps=10))
    assert sweep_summary.latest_step(str(root / "a")) == 10
    rows, key = sweep_summary.write(str(root), plot=True)
    assert key == "online_knn/top1" and [r["name"] for r in rows] == ["b", "a"]
    assert rows[0]["status"] == "done" and rows[0]["images_per_sec"] == 100.0
    md = (root / "summary.md").read_text()
    assert "| optimizer.lr | status |" in md and "| 0.2 | done | 10/10 | 2.5000 | 55.00 |" in md
    assert (root / "sweep_optimizer.lr.png").stat().st_size > 0
    rows, key = sweep_summary.write(str(root), metric="train/loss")
    assert [r["name"] for r in rows] == ["a", "b"]


# ------------------------------------------------------- a real local sweep

def _sweep_cmd(root, data_dir, *more):
    return [sys.executable, "launch/sweep.py", "--config", CONFIG,
            "--sweep", "config.keep_ckpts=2,3", "--root", root, *more, "--",
            "--config.dataset=tiny_squares", f"--config.data_dir={data_dir}",
            "--config.batch_size=32", "--config.model.widths=(4,8)", "--config.model.conv=xla",
            "--config.head.hidden=16", "--config.head.dim=8", "--config.total_steps=80",
            "--config.ckpt_every_steps=10", "--config.log_every_steps=10",
            "--config.eval.knn.k=20", "--config.eval.train_examples=0",
            "--config.eval.batch_size=64"]  # tiny_config's: its feature programs too


def test_real_sweep_interrupted_then_resumed(tiny_data, tmp_path, compilation_cache):
    # keep_ckpts changes no compiled program: the points and the resumed run share
    # the compilation cache, which is most of a tiny run's time. The session's cache
    # (conftest.py): the points' train step is the tiny SimCLR step that other
    # modules' runs compile (test_train.tiny_config: total_steps and the checkpoint
    # and log intervals change no compiled program either).
    root = str(tmp_path / "sweep")
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_THREEFRY_PARTITIONABLE="0")  # conftest.fast_prng: faster compiles
    first = os.path.join(root, "keep_ckpts=2")
    p = subprocess.Popen(_sweep_cmd(root, tiny_data, "--eval", "knn"), cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while sweep_summary.latest_step(first) is None:  # its first checkpoint
            assert p.poll() is None and time.time() < deadline, p.stdout.read()
            time.sleep(0.05)
        os.kill(sweep_summary.read_point(first)["pid"], signal.SIGTERM)
        out = p.communicate(timeout=300)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 75, out  # one point interrupted, the other done
    assert "keep_ckpts=2: interrupted" in out and "keep_ckpts=3: done" in out, out
    rows = {r["name"]: r for r in json.load(open(os.path.join(root, "summary.json")))["rows"]}
    assert rows["keep_ckpts=2"]["status"] == "interrupted"
    assert rows["keep_ckpts=2"]["step"] < 80
    assert rows["keep_ckpts=3"]["status"] == "done" and rows["keep_ckpts=3"]["eval/knn"] >= 0

    # The same command again: resumes (and evaluates) the first, skips the second.
    p = subprocess.run(_sweep_cmd(root, tiny_data, "--eval", "knn", "--plot"), cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "keep_ckpts=3: finished before, skipped" in p.stdout
    assert "keep_ckpts=3: evaluating" not in p.stdout  # its result is of the last step
    assert "Resumed from step" in open(os.path.join(first, "train.log")).read()
    summary = json.load(open(os.path.join(root, "summary.json")))
    assert summary["metric"] == "eval/knn" and len(summary["rows"]) == 2
    for r in summary["rows"]:
        assert r["status"] == "done" and r["step"] == r["total_steps"] == 80
        assert 0 <= r["eval/knn"] <= 100 and r["train/loss"] > 0
    md = open(os.path.join(root, "summary.md")).read()
    assert "| keep_ckpts |" in md and "| 2 | done |" in md and "| 3 | done |" in md
    assert os.path.exists(os.path.join(root, "sweep_keep_ckpts.png"))

    # --summarize rebuilds the table from the workdirs, running nothing.
    p = subprocess.run([sys.executable, "launch/sweep.py", "--root", root, "--summarize",
                        "--metric", "train/loss"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Sorted by train/loss (ascending)" in p.stdout and "| 3 | done |" in p.stdout
