"""NPID's and PIRL's memory bank, what it means, against NumPy: the row of each
image of the batch moves to normalise(a m_i + (1 - a) f_i) where f is the image
branch (never PIRL's jigsaw branch g), and the loss weighs the jigsaw term by
lam and the image term by 1 - lam. The momentum and the weight are chosen so
that a != 1 - a and lam != 1 - lam (the configs' 0.5 would hide a swap)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec
from ssl_jax.methods import memory, pirl
from tests.test_memory import _nce_reference, _normalize, _update_reference

B, N, A, LAM = 8, 40, 0.8, 0.3  # batch, images, bank momentum, jigsaw weight
SPEC = DataSpec(num_examples=N, image_shape=(8, 8, 1))
INDICES = np.array([3, 31, 17, 0, 39, 22, 8, 12], np.int32)  # distinct: the plain update rule

pytestmark = pytest.mark.usefixtures("fast_prng")  # conftest.py; nothing compares PRNG modes


def small_config(name):
    c = load_file(f"configs/{name}.py:runlocal")
    c.model.widths, c.model.conv = (4, 8), "xla"
    c.head.dim = 8
    c.memory.update(pad_to=8, negatives=16, momentum=A, loss="nce")
    if name == "pirl":
        c.pirl.jigsaw_weight = LAM
    return c


def test_update_moves_rows_by_one_minus_momentum():
    rng = np.random.default_rng(0)
    bank = _normalize(rng.normal(size=(16, 4))).astype(np.float32)
    idx = np.array([2, 9, 2, 15], np.int32)  # a duplicate: its row moves towards the mean
    values = rng.normal(size=(4, 4)).astype(np.float32)
    got = np.asarray(memory.update(jnp.asarray(bank), jnp.asarray(idx), jnp.asarray(values), A))
    np.testing.assert_allclose(got, _update_reference(bank, idx, values, A), atol=1e-6)
    # By hand for row 9: mostly the old row (a = 0.8), a fifth of the new value.
    v = values[1] / np.linalg.norm(values[1])
    want = A * bank[9] + (1 - A) * v
    np.testing.assert_allclose(got[9], want / np.linalg.norm(want), atol=1e-6)


@pytest.mark.parametrize("name", ["npid", "pirl"])
def test_loss_step_writes_the_image_branch_with_the_bank_momentum(name):
    c = small_config(name)
    rng = np.random.default_rng(1)
    views = {"image": jnp.asarray(rng.normal(size=(B, 8, 8, 1)), jnp.float32)}
    if name == "pirl":
        views["tiles"] = jnp.asarray(rng.normal(size=(B, 9, 8, 8, 1)), jnp.float32)
    params, state = pirl.init(jax.random.key(0), views, c, SPEC)
    key = jax.random.key(5)
    value, (metrics, new) = jax.jit(
        lambda p, s, v, i: pirl.loss(p, s, v, {"index": i}, key, c, SPEC))(
            params, state, views, INDICES)

    # f and g from a plain forward pass of the network.
    (_, f, g), _ = pirl._net(c).apply({"params": params, "batch_stats": state["batch_stats"]},
                                      views["image"], views.get("tiles"), train=True,
                                      mutable=["batch_stats"])
    f = np.asarray(f, np.float64)
    old = np.asarray(state["bank"], np.float64)
    want = old.copy()
    want[INDICES] = _normalize(A * old[INDICES] + (1 - A) * _normalize(f))
    np.testing.assert_allclose(np.asarray(new["bank"]), want, atol=2e-6)

    # The loss: NCE of each branch against the bank as it was before the write.
    neg = old[np.asarray(memory.sample_negatives(key, c.memory.negatives, N))]
    image_term, _ = _nce_reference(f, old[INDICES], neg, c.memory.temperature, N)
    if name == "npid":
        assert g is None
        np.testing.assert_allclose(float(value), image_term, rtol=1e-4)
    else:
        jigsaw_term, _ = _nce_reference(np.asarray(g), old[INDICES], neg,
                                        c.memory.temperature, N)
        # A swap of the weights moves the loss by 0.4 |jigsaw - image|: far beyond rtol.
        assert abs(jigsaw_term - image_term) > 0.01 * image_term
        np.testing.assert_allclose(float(value), LAM * jigsaw_term + (1 - LAM) * image_term,
                                   rtol=1e-4)
        np.testing.assert_allclose(float(metrics["loss_jigsaw"]), jigsaw_term, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss_image"]), image_term, rtol=1e-4)
