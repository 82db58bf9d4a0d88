"""config.cpu_budget_minutes: the run stops, saved, where its CPU time reaches the
budget, and a resume counts what the earlier runs spent (ssl_jax/cpu_budget.py)."""
import json
import re
import subprocess
import sys
import time

import pytest

from ssl_jax import checkpoint, cpu_budget, train
from ssl_jax import config as cfg_lib
from ssl_jax.errors import UserError
from tests.test_train import tiny_config


def test_process_seconds_counts_a_live_child():
    """grain's workers are live children: their CPU time counts before they exit."""
    before = cpu_budget.process_seconds()
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.5)
        used = cpu_budget.process_seconds() - before
    finally:
        child.kill()
        child.wait()
    assert used > 0.7, used  # the child's ~1.5 s of spinning (import included)


def test_a_budget_must_be_positive():
    with pytest.raises(UserError, match="cpu_budget_minutes=0 must be > 0"):
        cpu_budget.Budget(0.0)


def test_forecast_names_the_steps_that_fit():
    b = cpu_budget.Budget(1.0)  # 60 s
    b.seconds = 10.0
    assert b.forecast(10, 100, 0.5) is None  # 10 + 90 x 0.5 = 55 s: fits
    line = b.forecast(10, 100, 1.0)  # 100 s: does not
    assert "near step 60 of 100" in line and "--config.total_steps=60" in line


@pytest.fixture
def fake_clock(monkeypatch):
    """process_seconds() advances 1 s per call: used() is called once a step."""
    clock = iter(range(10_000))
    monkeypatch.setattr(cpu_budget, "process_seconds", lambda: float(next(clock)))


def test_the_run_stops_saved_at_its_budget_and_a_resume_counts_the_spent(
        tiny_data, fast_prng, fake_clock, tmp_path, capsys):
    config = tiny_config("simclr", tiny_data, total_steps=12)
    config.cpu_budget_minutes = 4.5 / 60  # 4.5 s: crossed at step 5
    workdir = str(tmp_path / "w")
    state, stopped_by = train.run(config, workdir)
    out = capsys.readouterr().out
    assert stopped_by == "budget" and int(state["step"]) == 5, out
    assert checkpoint.complete_steps(workdir)[-1] == 5  # the step that crossed it, saved
    assert "Stopped at the CPU budget (0.075 CPU-min" in out and "step 5/12" in out
    assert "--config.total_steps=5" in out
    # The forecast, at the second log step (5: the save), from 1 CPU-s a step.
    assert "it will stop near step 5 of 12" in out
    assert json.loads((tmp_path / "w" / cpu_budget.FILE).read_text()) == {"3": 3.0, "5": 5.0}
    metrics = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").open()]
    assert [m["train/cpu_minutes"] * 60 for m in metrics] == pytest.approx([3.0, 5.0])

    # The same command again: the budget is spent, no step is taken.
    state, stopped_by = train.run(config, workdir)
    out = capsys.readouterr().out
    assert stopped_by == "budget" and int(state["step"]) == 5
    assert "Resumed from step 5" in out and "at step 5/12" in out
    assert checkpoint.complete_steps(workdir)[-1] == 5

    # A larger budget (a length change: resume_from_different_config) goes on from
    # the 5 s already spent: 8.5 s is crossed 4 steps later.
    config.cpu_budget_minutes, config.resume_from_different_config = 8.5 / 60, True
    state, stopped_by = train.run(config, workdir)
    assert stopped_by == "budget" and int(state["step"]) == 9, capsys.readouterr().out


def test_without_a_budget_the_run_ends_done_with_its_cpu_time(
        tiny_data, fast_prng, fake_clock, tmp_path, capsys):
    config = tiny_config("simclr", tiny_data)  # 6 steps, log and save every 3
    state, stopped_by = train.run(config, str(tmp_path / "w"))
    out = capsys.readouterr().out
    assert stopped_by is None and int(state["step"]) == 6
    assert "Done: 6 steps in 0.0 CPU-min" in out  # 2 calls of the fake clock: 2 s
    assert "warning: at" not in out


# ------------------------------------------------------------ the budget presets

BUDGETED = ("simclr", "moco", "npid", "pirl", "rotnet", "jigsaw", "supervised", "dino",
            "polyview")


@pytest.mark.parametrize("method", BUDGETED)
def test_every_method_has_its_budget_presets(method):
    """budget=B: the config's own length for B, and the guard at B CPU-minutes."""
    module = cfg_lib.load_module(f"configs/{method}.py")
    for name, minutes in (("10m", 10.0), ("30m", 30.0), ("2h", 120.0)):
        c = cfg_lib.load_file(f"configs/{method}.py:dataset=fashion_mnist,budget={name}")
        assert c.cpu_budget_minutes == minutes
        assert c.total_steps == module.BUDGET[name]["steps"]
        assert c.total_epochs is None and c.total_examples is None
    short, long_ = (cfg_lib.load_file(f"configs/{method}.py:dataset=fashion_mnist,budget={b}")
                    for b in ("10m", "2h"))
    assert long_.total_steps > short.total_steps


def test_a_step_schedule_keeps_its_decays_at_the_same_fractions_of_the_run():
    preset = cfg_lib.load_file("configs/rotnet.py:dataset=fashion_mnist")
    c = cfg_lib.load_file("configs/rotnet.py:dataset=fashion_mnist,budget=30m")
    fractions = [e / preset.total_epochs for e in preset.optimizer.decay_epochs]
    epochs = c.total_steps * c.batch_size / 60000
    assert [e / epochs for e in c.optimizer.decay_epochs] == pytest.approx(fractions, abs=1e-4)


@pytest.mark.parametrize("arg, message", [
    ("dataset=fashion_mnist,budget=1h", "the budgets are ['10m', '30m', '2h']"),
    ("dataset=cifar10,budget=10m", "measured on fashion_mnist only"),
])
def test_a_budget_that_is_not_a_preset_is_refused(arg, message):
    with pytest.raises(UserError, match=re.escape(message)):
        cfg_lib.load_file(f"configs/simclr.py:{arg}")
