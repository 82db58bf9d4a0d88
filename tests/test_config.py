"""Command-line config handling: unknown keys, intervals given in another unit."""
import pytest

from configs import simclr
from ssl_jax import config as cfg_lib

SPEC = "configs/simclr.py:dataset=fashion_mnist"


@pytest.mark.parametrize("arg, message", [
    ("--config.optimizer.lrr=0.1", r"--config.optimizer.lrr: .*Did you mean lr\? Valid keys here: "
                                   r"\['b1', 'b2'"),
    ("--config.optimzer.lr=0.1", r"'optimzer' missing\).*Did you mean optimizer\?"),
])
def test_unknown_key_exits_naming_it_and_the_nearest_valid_key(arg, message):
    with pytest.raises(SystemExit, match=message):
        cfg_lib.check_command_line(["train", "--config", SPEC, arg, "--workdir", "w"])


def test_known_keys_and_other_flags_pass():
    cfg_lib.check_command_line(["train", f"--config={SPEC}", "--config.optimizer.lr=0.1",
                                "--config.model.widths=(4,8)", "--workdir=w"])
    with pytest.raises(SystemExit, match="not found"):
        cfg_lib.check_command_line(["train", "--config", "nope.py", "--config.seed=1"])


def test_an_interval_in_another_unit_replaces_the_presets():
    c = simclr.get_config("dataset=fashion_mnist")
    assert c.total_epochs is not None
    c.total_steps = 7  # what --config.total_steps=7 does, before clear_other_units
    with pytest.raises(ValueError, match="Set only one of"):
        cfg_lib.steps(c, "total", steps_per_epoch=100, batch_size=8)
    cfg_lib.clear_other_units(c, ["train", "--config.total_steps=7",
                                  "--config.optimizer.warmup_steps=2"])
    assert c.total_epochs is None and c.optimizer.warmup_epochs is None
    assert cfg_lib.steps(c, "total", steps_per_epoch=100, batch_size=8) == 7


def test_the_trainer_command_line_rejects_bad_keys_and_types_in_one_line(tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = [sys.executable, "-m", "ssl_jax.train", "--config", SPEC + ",runlocal",
            "--workdir", str(tmp_path / "w")]
    for arg, message in (("--config.optimizer.lrr=0.1", "Did you mean lr?"),
                         ("--config.optimizer.lr=abc",
                          "flag --config.optimizer.lr=abc: could not convert string to float")):
        p = subprocess.run(base + [arg], cwd=root, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and message in p.stderr, p.stderr[-2000:]
        assert "Traceback" not in p.stderr
    assert not os.path.exists(tmp_path / "w")  # nothing started, nothing written
