"""Methods through the network: the same loss and gradients on 1 and 8 devices
for the same global batch (BN over the global batch, global negatives,
shuffle-BN groups independent of the device count)."""
import numpy as np
import pytest

from tests import multidevice

SNIPPET = """
import jax, jax.numpy as jnp
jax.config.update("jax_threefry_partitionable", False)  # as fast_prng (conftest.py)
from ssl_jax import methods, parallel
from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec
spec = DataSpec(num_examples=32, image_shape=(28, 28, 1))
mesh = parallel.make_mesh()
out["devices"] = len(jax.devices())
images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (32, 28, 28, 1)), jnp.uint8)
for name in ("simclr", "moco"):
    c = load_file(f"configs/{name}.py:runlocal")
    c.model.widths, c.model.conv = (4, 8), "xla"  # compiles in half the time
    c.head.hidden, c.head.dim = 16, 8
    if name == "moco":
        c.moco.queue_size, c.moco.bn_groups = 64, 4
    m = methods.get(name)
    with jax.set_mesh(mesh):
        sh = parallel.batch_sharding(mesh)
        views = jax.jit(lambda r, x: m.views(r, x, c))(jax.random.key(1), jax.device_put(images, sh))
        params, state = m.init(jax.random.key(2), views, c, spec)
        f = jax.jit(jax.value_and_grad(
            lambda p, s, v: m.loss(p, s, v, {"index": jnp.arange(32)}, jax.random.key(3), c, spec),
            has_aux=True))
        (loss, (metrics, new_state)), grads = f(params, state, views)
    out[name + "_loss"] = loss
    out[name + "_view"] = jax.tree.leaves(views)[0]
    for i, g in enumerate(jax.tree.leaves(grads)):
        out[f"{name}_grad{i}"] = g
    for i, s in enumerate(jax.tree.leaves(new_state)):
        out[f"{name}_state{i}"] = s
"""


@pytest.fixture(scope="module")
def one_and_eight(tmp_path_factory):
    return multidevice.run_one_and_eight(SNIPPET, tmp_path_factory)


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_method_loss_gradients_and_state_equal_on_one_and_eight_devices(method, one_and_eight):
    one, eight = one_and_eight
    assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
    keys = [k for k in one if k.startswith(method + "_")]
    assert len(keys) > 10
    for k in keys:
        np.testing.assert_allclose(eight[k], one[k], rtol=2e-4, atol=2e-5, err_msg=k)
    assert np.isfinite(one[method + "_loss"]) and one[method + "_loss"] > 0
