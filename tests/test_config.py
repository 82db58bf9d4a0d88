"""Config files and the command line's --config (ssl_jax/cli.py over ml_collections'
flags): files loaded by path, unknown keys, intervals given in another unit, and
evaluate's --config.eval.* overrides of a stored config."""
import os
import sys

import pytest
from absl import flags

from ssl_jax import cli
from ssl_jax import config as cfg_lib
from ssl_jax import eval as eval_lib
from ssl_jax.errors import UserError

SPEC = "configs/simclr.py:dataset=fashion_mnist"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*args, config=cli.FILE):
    """The command line `prog *args` as cli.run parses it, into fresh flags with
    train's --workdir beside --config -> the parsed flags."""
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    cli.parse(["prog", *args], config, fv)
    return fv


def test_configs_are_plain_files_loaded_by_path_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = cfg_lib.load_file(SPEC)  # relative: not here, so from the checkout
    assert c.method == "simclr" and c.dataset == "fashion_mnist"
    # pirl.py builds on npid.py, which builds on common.py: siblings by path.
    pirl = cfg_lib.load_file(os.path.join(ROOT, "configs", "pirl.py") + ":dataset=cifar10")
    assert pirl.method == "pirl" and pirl.memory.negatives == 16000 and pirl.pirl.tiles
    assert "memory" in pirl and "size" not in pirl.memory  # the data's size is the data's
    assert not [m for m in sys.modules if m == "configs" or m.startswith("configs.")]
    with pytest.raises(UserError, match="Config file 'nope.py' not found"):
        cfg_lib.load_file("nope.py:runlocal")
    with pytest.raises(UserError, match=r"Unknown config argument 'datset'; valid: \['budget', 'dataset'"):
        cfg_lib.load_file("configs/simclr.py:datset=cifar10")
    with pytest.raises(UserError, match="dataset='mnist' has no preset"):
        cfg_lib.load_file("configs/simclr.py:dataset=mnist")


@pytest.mark.parametrize("arg, message", [
    ("--config.optimizer.lrr=0.1", r"^Unknown config key in --config.optimizer.lrr: .*Did you "
                                   r"mean lr\? Valid keys here: \['b1', 'b2'"),
    ("--config.optimzer.lr=0.1", r"'optimzer' missing\).*Did you mean optimizer\?"),
])
def test_unknown_key_is_one_line_naming_it_and_the_nearest_valid_key(arg, message):
    with pytest.raises(flags.Error, match=message) as e:
        parse("--config", SPEC, arg, "--workdir", "w")
    assert "\n" not in str(e.value)


def test_known_keys_are_typed_by_their_field():
    fv = parse(f"--config={SPEC}", "--config.optimizer.lr=1", "--config.model.widths=(4,8)",
               "--workdir=w")
    assert fv.config.optimizer.lr == 1.0 and isinstance(fv.config.optimizer.lr, float)
    assert fv.config.model.widths == (4, 8) and fv.workdir == "w"
    with pytest.raises(flags.Error, match="flag --config.optimizer.lr=abc: could not convert "
                                          "string to float"):
        parse("--config", SPEC, "--config.optimizer.lr=abc", "--workdir", "w")
    with pytest.raises(flags.Error, match="Config file 'nope.py' not found"):
        parse("--config", "nope.py", "--config.seed=1", "--workdir", "w")
    with pytest.raises(flags.Error, match="--config must have a value"):
        parse("--workdir", "w")


def test_an_interval_in_another_unit_replaces_the_presets():
    c = cfg_lib.load_file(SPEC)
    assert c.total_epochs is not None
    c.total_steps = 7  # set, but the preset's unit not cleared
    with pytest.raises(UserError, match="Set only one of"):
        cfg_lib.steps(c, "total", steps_per_epoch=100, batch_size=8)
    c = parse("--config", SPEC, "--config.total_steps=7", "--config.optimizer.warmup_steps=2",
              "--config.log_every_epochs=0.5", "--workdir", "w").config
    assert c.total_epochs is None and c.optimizer.warmup_epochs is None
    assert c.log_every_steps is None and c.log_every_epochs == 0.5
    assert cfg_lib.steps(c, "total", steps_per_epoch=100, batch_size=8) == 7
    assert cfg_lib.steps(c, "log_every", steps_per_epoch=100, batch_size=8) == 50


@pytest.mark.parametrize("first, second", [("total_steps=40", "total_epochs=0.01"),
                                           ("log_every_steps=10", "log_every_epochs=0.1")])
def test_two_units_of_one_length_on_the_command_line_are_refused_naming_both(first, second):
    with pytest.raises(UserError) as e:
        parse("--config", SPEC, f"--config.{first}", f"--config.{second}", "--workdir", "w")
    for given in (first, second):
        assert f"--config.{given.split('=')[0]}" in str(e.value)


def test_eval_overrides_are_typed_by_the_defaults_and_refuse_unknown_or_training_keys():
    schema = {"eval": eval_lib.defaults()}
    fv = parse("--config.eval.linear.lr=1", "--workdir", "w", "--config.eval.knn.also_k", "5",
               config=schema)
    over = fv["config"].override_values
    assert fv.workdir == "w" and over == {"eval.linear.lr": 1.0, "eval.knn.also_k": (5,)}
    assert isinstance(over["eval.linear.lr"], float)
    with pytest.raises(UserError, match="--config.eval.linear.lre: .*Did you mean lr"):
        parse("--config.eval.linear.lre=1", config=schema)
    with pytest.raises(UserError, match=r"--config.model.name: only --config.eval.\* can be "
                                        "changed here"):
        parse("--config.model.name=resnet18", config=schema)
    with pytest.raises(flags.Error, match="flag --config.eval.linear.epochs=many: "):
        parse("--config.eval.linear.epochs=many", config=schema)

    # evaluate() applies them to the stored config.
    c = cfg_lib.apply_overrides(cfg_lib.load_file("configs/simclr.py:runlocal"), over)
    assert c.eval.linear.lr == 1.0 and c.eval.knn.also_k == (5,)
    with pytest.raises(UserError, match="only --config.eval"):
        cfg_lib.apply_overrides(c, {"model.name": "resnet18"})
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
    sweep = parse("--config.eval.linear.weight_decay=(1e-5,1e-3)",
                  config=schema)["config"].override_values
    assert cfg_lib.apply_overrides(c, sweep).eval.linear.weight_decay == (1e-5, 1e-3)
