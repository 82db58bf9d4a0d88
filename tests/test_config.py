"""Command-line config handling: unknown keys, intervals given in another unit, and
evaluate's --config.eval.* overrides of a stored config."""
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


def test_eval_overrides_parse_typed_and_refuse_unknown_or_training_keys():
    from ssl_jax import eval as eval_lib
    argv, over = cfg_lib.split_overrides(["prog", "--config.eval.linear.lr=1", "--workdir", "w",
                                          "--config.eval.knn.also_k", "5"])
    assert argv == ["prog", "--workdir", "w"] and over == {"eval.linear.lr": "1",
                                                           "eval.knn.also_k": "5"}
    c = cfg_lib.apply_overrides(simclr.get_config("runlocal"), over)
    assert c.eval.linear.lr == 1.0 and isinstance(c.eval.linear.lr, float)
    assert c.eval.knn.also_k == (5,)
    with pytest.raises(KeyError, match="Did you mean lr"):
        cfg_lib.apply_overrides(c, {"eval.linear.lre": "1"})
    with pytest.raises(ValueError, match="only eval"):
        cfg_lib.apply_overrides(c, {"model.name": "resnet18"})
    with pytest.raises(ValueError, match="expected a int"):
        cfg_lib.apply_overrides(c, {"eval.linear.epochs": "'many'"})
    # A run stored before a field existed gets its default; stored values win.
    old = c.eval.to_dict()
    del old["linear"]["augment"], old["mlp"]
    old["linear"]["lr"] = 0.05
    filled = eval_lib.with_defaults(old)
    assert filled.linear.augment.views == 0 and filled.mlp.hidden == 200
    assert filled.linear.lr == 0.05 and filled.linear.epochs == 10
    # A sweep where a run stored one number (weight decays before they were swept).
    with c.eval.linear.ignore_type():
        c.eval.linear.weight_decay = 1e-4
    assert cfg_lib.apply_overrides(c, {"eval.linear.weight_decay": "(1e-5,1e-3)"}
                                   ).eval.linear.weight_decay == (1e-5, 1e-3)
