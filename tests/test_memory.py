"""Memory bank and NCE: numpy references, and the same results with the bank
sharded over 8 simulated devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import losses
from ssl_jax.methods import memory
from tests import multidevice


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _nce_reference(z, pos, neg, t, n, log_z=None):
    """NPID's NCECriterion, one example at a time, in float64."""
    z, pos, neg = (np.asarray(a, np.float64) for a in (z, pos, neg))
    z = _normalize(z)
    k = len(neg)
    scores = np.concatenate([np.sum(z * pos, 1, keepdims=True), z @ neg.T], 1) / t
    if log_z is None:
        log_z = np.log(n * np.mean(np.exp(scores)))
    total = 0.0
    for row in scores:
        h = np.exp(row - log_z) / (np.exp(row - log_z) + k / n)
        total += -np.log(h[0]) - np.sum(np.log(1 - h[1:]))
    return total / len(z), log_z


def _info_nce_reference(z, pos, neg, t):
    z = _normalize(np.asarray(z, np.float64))
    logits = np.concatenate([np.sum(z * pos, 1, keepdims=True), z @ neg.T], 1) / t
    return np.mean(np.log(np.sum(np.exp(logits), 1)) - logits[:, 0])


def _update_reference(bank, idx, values, momentum):
    """Each distinct index moves once, towards the mean of its duplicates."""
    bank, values = bank.astype(np.float64).copy(), _normalize(values.astype(np.float64))
    for i in np.unique(idx):
        v = values[idx == i].mean(0)
        bank[i] = _normalize(momentum * bank[i] + (1 - momentum) * v)
    return bank


def _data(seed=0, b=8, k=16, d=6, n=100):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, d)).astype(np.float32),
            _normalize(rng.normal(size=(b, d))).astype(np.float32),
            _normalize(rng.normal(size=(k, d))).astype(np.float32), n)


def test_nce_hand_computed_one_example():
    # z = positive = e1, one negative e2, t = 1, N = 4, Z = 1:
    # P = e^1 and e^0; K/N = 1/4; h+ = e/(e + 1/4); h- = 1/(1 + 1/4).
    z, pos, neg = jnp.array([[2.0, 0.0]]), jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]])
    got, m = losses.nce(z, pos, neg, 1.0, 4, jnp.float32(0.0))
    e = np.e
    np.testing.assert_allclose(float(got), -np.log(e / (e + 0.25)) - np.log(1 - 1 / 1.25), rtol=1e-6)
    assert float(m["log_z"]) == 0.0 and float(m["contrast_acc"]) == 1.0


@pytest.mark.parametrize("estimate", [True, False])
def test_nce_matches_reference(estimate):
    z, pos, neg, n = _data()
    log_z = None if estimate else 9.5
    want, want_log_z = _nce_reference(z, pos, neg, 0.07, n, log_z)
    got, m = losses.nce(jnp.array(z), jnp.array(pos), jnp.array(neg), 0.07, n,
                        jnp.float32(-jnp.inf if estimate else log_z))
    np.testing.assert_allclose(float(got), want, rtol=1e-4)
    np.testing.assert_allclose(float(m["log_z"]), want_log_z, rtol=1e-5)


def test_nce_z_estimated_once_then_fixed():
    z, pos, neg, n = _data(0)
    _, m0 = losses.nce(z, pos, neg, 0.07, n, jnp.float32(-jnp.inf))
    z1, pos1, neg1, _ = _data(1)
    _, m1 = losses.nce(z1, pos1, neg1, 0.07, n, m0["log_z"])
    assert float(m1["log_z"]) == float(m0["log_z"])                 # kept, not re-estimated
    _, fresh = losses.nce(z1, pos1, neg1, 0.07, n, jnp.float32(-jnp.inf))
    assert abs(float(fresh["log_z"]) - float(m0["log_z"])) > 1e-3  # a new batch would differ


def test_info_nce_form_matches_reference():
    z, pos, neg, _ = _data()
    got, _ = losses.info_nce_queue(jnp.array(z), jnp.array(pos), jnp.array(neg), 0.07)
    np.testing.assert_allclose(float(got), _info_nce_reference(z, pos, neg, 0.07), rtol=1e-4)


def test_nce_gradient_flows_to_embeddings_only():
    z, pos, neg, n = (jnp.asarray(a) if i < 3 else a for i, a in enumerate(_data()))
    gz, gp, gn = jax.grad(lambda a, b, c: losses.nce(a, b, c, 0.07, n, jnp.float32(9.0))[0],
                          argnums=(0, 1, 2))(z, pos, neg)
    assert float(jnp.abs(gz).max()) > 0
    assert float(jnp.abs(gp).max()) == 0 and float(jnp.abs(gn).max()) == 0


def test_bank_init_statistics_and_padding():
    dim, bank = 128, memory.init(jax.random.key(0), 5000, 128, pad_to=1024)
    assert bank.shape == (memory.padded_size(5000, 1024), dim) == (5120, dim)
    assert bank.dtype == jnp.float32
    b = np.asarray(bank)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, rtol=1e-5)
    # Coordinates uniform in +-1/sqrt(D/3) have variance 1/D, so raw rows already
    # have norm ~1 and normalising barely moves them: still mean 0, variance 1/D,
    # (nearly) within the bound, and a uniform's kurtosis (1.8; a Gaussian's is 3).
    assert abs(b.mean()) < 2e-3 and abs(b.var() * dim - 1) < 0.02
    bound = 1 / np.sqrt(dim / 3)
    assert 0.95 * bound < np.abs(b).max() < 1.2 * bound
    assert abs(np.mean(b ** 4) / np.mean(b ** 2) ** 2 - 1.8) < 0.05
    np.testing.assert_array_equal(b, memory.init(jax.random.key(0), 5000, 128, pad_to=1024))
    assert not np.allclose(b, memory.init(jax.random.key(1), 5000, 128, pad_to=1024))


def test_sample_negatives_uniform_in_range():
    idx = np.asarray(memory.sample_negatives(jax.random.key(0), 20000, 50))
    assert idx.dtype == np.int32 and idx.min() == 0 and idx.max() == 49
    counts = np.bincount(idx, minlength=50)
    assert counts.min() > 300 and counts.max() < 500  # 400 expected per index


def _bank_case():
    rng = np.random.default_rng(3)
    bank = _normalize(rng.normal(size=(64, 6))).astype(np.float32)
    # 16 rows of a global batch, with duplicates (5 three times, 60 twice) and
    # rows owned by every one of the 8 devices' blocks of 8.
    idx = np.array([5, 17, 60, 5, 33, 0, 63, 41, 9, 60, 24, 5, 50, 12, 29, 38], np.int32)
    values = rng.normal(size=(16, 6)).astype(np.float32)
    lookup_idx = np.array([63, 0, 7, 8, 5, 5, 40, 33, 62, 1], np.int32)
    return bank, idx, values, lookup_idx


def test_lookup_and_update_one_device_match_numpy():
    bank, idx, values, lookup_idx = _bank_case()
    np.testing.assert_array_equal(memory.lookup(bank, lookup_idx), bank[lookup_idx])
    got = memory.update(jnp.asarray(bank), jnp.asarray(idx), jnp.asarray(values), 0.5)
    np.testing.assert_allclose(got, _update_reference(bank, idx, values, 0.5), rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(64), idx)
    np.testing.assert_array_equal(np.asarray(got)[untouched], bank[untouched])


SNIPPET = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from ssl_jax import losses, parallel
from ssl_jax.methods import memory
from tests.test_memory import _bank_case, _data
bank, idx, values, lookup_idx = _bank_case()
z, pos, neg, n = _data(b=16)
mesh = parallel.make_mesh()
out["devices"] = len(jax.devices())
with jax.set_mesh(mesh):
    rows = parallel.batch_sharding(mesh)
    bank_s = jax.device_put(bank, rows)
    lookup = jax.jit(parallel.on_shards(memory.lookup, (True, False)))
    out["lookup"] = lookup(bank_s, lookup_idx)
    upd = parallel.on_shards(lambda b, i, v, axis_name: memory.update(b, i, v, 0.5, axis_name),
                             (True, True, True), batch_out=True)
    new = jax.jit(upd, donate_argnums=0)(bank_s, jax.device_put(idx, rows), jax.device_put(values, rows))
    out["update"] = new
    out["update_spec"] = np.array(str(new.sharding.spec))
    out["shard_rows"] = np.array([s.data.shape[0] for s in new.addressable_shards])
    for est in (True, False):
        f = parallel.on_shards(lambda a, p, u, lz, axis_name: losses.nce(a, p, u, 0.07, n, lz, axis_name),
                               (True, True, False, False))
        lz = jnp.float32(-jnp.inf if est else 9.5)
        (v, m), g = jax.jit(jax.value_and_grad(lambda a: f(a, pos, neg, lz), has_aux=True))(
            jax.device_put(z, rows))
        out[f"nce{est}"], out[f"nce_log_z{est}"], out[f"nce_grad{est}"] = v, m["log_z"], g
"""


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    return multidevice.run(SNIPPET, tmp_path_factory.mktemp("eight"), devices=8)


def test_sharded_lookup_and_update_match_numpy(eight):
    bank, idx, values, lookup_idx = _bank_case()
    assert int(eight["devices"]) == 8
    np.testing.assert_array_equal(eight["lookup"], bank[lookup_idx])
    np.testing.assert_allclose(eight["update"], _update_reference(bank, idx, values, 0.5),
                               rtol=1e-5, atol=1e-6)
    # The bank stayed sharded: 8 rows on each device, never the whole bank.
    assert "data" in str(eight["update_spec"]) and list(eight["shard_rows"]) == [8] * 8


@pytest.mark.parametrize("estimate", [True, False])
def test_nce_equal_on_one_and_eight_devices(eight, estimate):
    z, pos, neg, n = _data(b=16)
    lz = jnp.float32(-jnp.inf if estimate else 9.5)
    (v, m), g = jax.value_and_grad(lambda a: losses.nce(a, pos, neg, 0.07, n, lz), has_aux=True)(z)
    np.testing.assert_allclose(eight[f"nce{estimate}"], v, rtol=1e-5)
    np.testing.assert_allclose(eight[f"nce_log_z{estimate}"], m["log_z"], rtol=1e-6)
    np.testing.assert_allclose(eight[f"nce_grad{estimate}"], g, rtol=1e-4, atol=1e-7)
    assert np.abs(g).max() > 0
