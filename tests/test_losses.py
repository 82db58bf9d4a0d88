"""Losses: hand-computed cases, and the same value and gradient on 1 and 8 devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import losses
from tests import multidevice


def _nt_xent_reference(z1, z2, t):
    """Straight from the paper's definition, one anchor at a time, in numpy."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = np.array([z[i] @ z[j] / t for j in range(2 * n) if j != i])
        others = [j for j in range(2 * n) if j != i]
        total += -(z[i] @ z[pos] / t) + np.log(np.sum(np.exp(sims)))
        assert pos in others
    return total / (2 * n)


def test_nt_xent_hand_computed_two_pairs():
    # Two pairs in 2-D: views of image 0 point right, of image 1 up.
    z1 = np.array([[1.0, 0.0], [0.0, 1.0]])
    z2 = np.array([[1.0, 0.1], [0.1, 1.0]])
    t = 0.5
    got, metrics = losses.nt_xent(jnp.array(z1), jnp.array(z2), t)
    np.testing.assert_allclose(float(got), _nt_xent_reference(z1, z2, t), rtol=1e-5)
    assert float(metrics["contrast_acc"]) == 1.0
    # By hand: anchors z1[0] and z1[1] are mirror images, so are z2[0] and z2[1].
    # z1[0]: positive cos c = 1/sqrt(1.01); negatives z1[1] (cos 0), z2[1] (cos 0.1c).
    # z2[0]: positive cos c; negatives z1[1] (cos 0.1c), z2[1] (cos 0.2/1.01).
    c = 1 / np.sqrt(1.01)
    l_a = -c / t + np.log(np.exp(c / t) + 1 + np.exp(0.1 * c / t))
    l_b = -c / t + np.log(np.exp(c / t) + np.exp(0.1 * c / t) + np.exp(0.2 / 1.01 / t))
    np.testing.assert_allclose(float(got), (l_a + l_b) / 2, rtol=1e-5)


def test_nt_xent_matches_reference_random():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    got, _ = losses.nt_xent(jnp.array(z1), jnp.array(z2), 0.2)
    np.testing.assert_allclose(float(got), _nt_xent_reference(z1, z2, 0.2), rtol=1e-5)


def test_info_nce_queue_hand_computed():
    q = jnp.array([[1.0, 0.0]])
    k = jnp.array([[1.0, 0.0]])
    queue = jnp.array([[0.0, 1.0], [-1.0, 0.0]])
    t = 0.2
    got, metrics = losses.info_nce_queue(q, k, queue, t)
    expected = -1 / t + np.log(np.exp(1 / t) + np.exp(0) + np.exp(-1 / t))
    np.testing.assert_allclose(float(got), expected, rtol=1e-4)
    assert float(metrics["contrast_acc"]) == 1.0


def test_info_nce_queue_gives_no_gradient_to_keys_or_queue():
    rng = np.random.default_rng(1)
    q, k, queue = (jnp.array(rng.normal(size=s)) for s in ((4, 3), (4, 3), (8, 3)))
    gk, gqueue = jax.grad(lambda k, u: losses.info_nce_queue(q, k, u, 0.2)[0], argnums=(0, 1))(k, queue)
    assert float(jnp.abs(gk).max()) == 0 and float(jnp.abs(gqueue).max()) == 0


SNIPPET = """
import jax, jax.numpy as jnp
from ssl_jax import losses, parallel
rng = np.random.default_rng(0)
z1, z2 = jnp.array(rng.normal(size=(32, 16)), jnp.float32), jnp.array(rng.normal(size=(32, 16)), jnp.float32)
queue = losses.l2_normalize(jnp.array(rng.normal(size=(64, 16)), jnp.float32))
nt = parallel.on_shards(lambda a, b, axis_name: losses.nt_xent(a, b, 0.2, axis_name)[0], (True, True))
mo = parallel.on_shards(lambda a, b, u, axis_name: losses.info_nce_queue(a, b, u, 0.2, axis_name)[0],
                        (True, True, False))
mesh = parallel.make_mesh()
out["devices"] = len(jax.devices())
with jax.set_mesh(mesh):
    sh = parallel.batch_sharding(mesh)
    a, b = jax.device_put(z1, sh), jax.device_put(z2, sh)
    out["nt"], (out["nt_g1"], out["nt_g2"]) = jax.jit(jax.value_and_grad(nt, argnums=(0, 1)))(a, b)
    out["mo"], out["mo_g"] = jax.jit(jax.value_and_grad(mo))(a, b, queue)
"""


@pytest.fixture(scope="module")
def one_and_eight(tmp_path_factory):
    return multidevice.run_one_and_eight(SNIPPET, tmp_path_factory)


def test_losses_equal_on_one_and_eight_devices(one_and_eight):
    one, eight = one_and_eight
    assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
    for key in ("nt", "nt_g1", "nt_g2", "mo", "mo_g"):
        np.testing.assert_allclose(eight[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert np.abs(one["nt_g1"]).max() > 0  # gradients are not trivially zero
