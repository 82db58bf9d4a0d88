"""The online linear probe learns from frozen features (it returns only its own
state: the encoder is the train step's to update, tests/test_train.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import errors
from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec
from ssl_jax.eval import features, online
from ssl_jax.methods import network


pytestmark = pytest.mark.usefixtures("fast_prng")  # conftest.py: the init compiles 10x faster


def test_online_linear_probe_learns_labels_a_frozen_encoder_separates():
    c = load_file("configs/simclr.py:runlocal")
    c.model.widths, c.model.conv = (4, 8), "xla"  # compiles in half the time
    c.online.lr = 1e-2  # the default 1e-3 needs a few hundred steps here
    # Labels a frozen random encoder can tell apart: dark vs bright images.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 64).astype(np.int32)
    images = (np.where(labels[:, None, None, None] == 1, 200, 30)
              + rng.integers(0, 40, (64, 28, 28, 1))).astype(np.uint8)
    c.online.linear = True
    encoder = network.make_encoder(c.model)
    variables = encoder.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=True)
    stage = network.final_stage(c.model)
    fn = features.make_features_fn(encoder, features.eval_view_config(c), stages=(stage,))
    units = dict(steps_per_epoch=1, batch_size=64)
    hook = online.make(c, DataSpec(64, (28, 28, 1), num_classes=2), units, (stage, fn))
    assert hook.stateful and not hook.due(1, last=True)  # no periodic kNN was asked for
    probe = hook.init(variables, images)
    assert probe["params"]["w"].shape == (8, 2)

    step = jax.jit(lambda pr, v: hook.update(pr, v, images, labels))
    for _ in range(100):
        probe, metrics = step(probe, variables)
    assert float(metrics["online_linear/train_top1"]) == 100.0
    assert float(metrics["online_linear/loss"]) < 0.5 * np.log(2)  # from log 2 at zero weights


def test_the_hook_is_off_unless_asked_and_refuses_a_dataset_without_labels():
    c = load_file("configs/simclr.py:runlocal")
    units = dict(steps_per_epoch=10, batch_size=64)
    unlabelled = DataSpec(640, (28, 28, 1), num_classes=None)
    assert online.make(c, unlabelled, units, None) is None  # both probes off by default
    c.online.every_epochs = 0.5
    with pytest.raises(errors.UserError, match="need labels"):
        online.make(c, unlabelled, units, None)
    hook = online.make(c, DataSpec(640, (28, 28, 1), num_classes=10), units, ("block2", None))
    assert not hook.stateful and [s for s in range(1, 21) if hook.due(s, s == 20)] == [5, 10, 15, 20]
