"""The online linear probe learns from frozen features (it returns only its own
state: the encoder is the train step's to update, tests/test_train.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import simclr
from ssl_jax.eval import online
from ssl_jax.methods import network


pytestmark = pytest.mark.usefixtures("fast_prng")  # conftest.py: the init compiles 10x faster


def test_online_linear_probe_learns_labels_a_frozen_encoder_separates():
    c = simclr.get_config("runlocal")
    c.model.widths = (4, 8, 8, 16)
    c.online.lr = 1e-2  # the default 1e-3 needs a few hundred steps here
    # Labels a frozen random encoder can tell apart: dark vs bright images.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 64).astype(np.int32)
    images = (np.where(labels[:, None, None, None] == 1, 200, 30)
              + rng.integers(0, 40, (64, 28, 28, 1))).astype(np.uint8)
    encoder = network.make_encoder(c.model)
    variables = encoder.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=True)
    params, state = {"encoder": variables["params"]}, {"batch_stats": {"encoder": variables["batch_stats"]}}
    probe = online.init(c, 16, 2)

    step = jax.jit(lambda pr, p, s: online.update(c, pr, p, s, images, labels))
    for _ in range(100):
        probe, metrics = step(probe, params, state)
    assert float(metrics["online_linear/train_top1"]) == 100.0
    assert float(metrics["online_linear/loss"]) < 0.5 * np.log(2)  # from log 2 at zero weights
