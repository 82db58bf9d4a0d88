"""M-view losses (ssl_jax/multiview.py) against NumPy written from the papers' definitions,
one term at a time, in float64; and the same value and gradient on 1 and 8 devices."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import losses, multiview
from tests import multidevice


def _unit(z):
    z = np.asarray(z, np.float64)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def polyview_reference(z, t, variant):
    """Poly-View, Algorithm 1: for anchor view a and target t != a of sample i, a softmax
    over the target and every view of every other sample; geometric = mean of the pairs'
    log-probabilities, arithmetic = log of the mean of their probabilities. z: (K, M, D)."""
    z = _unit(z)
    k, m, _ = z.shape
    total = 0.0
    for i, a in itertools.product(range(k), range(m)):
        negs = [np.exp(z[i, a] @ z[j, c] / t) for j in range(k) if j != i for c in range(m)]
        assert len(negs) + 1 == m * (k - 1) + 1
        probs = []
        for c in range(m):
            if c != a:
                pos = np.exp(z[i, a] @ z[i, c] / t)
                probs.append(pos / (pos + sum(negs)))
        probs = np.array(probs)
        total += -np.mean(np.log(probs)) if variant == "geometric" else -np.log(np.mean(probs))
    return total / (k * m)


def cmc_reference(z, t, pairs):
    """CMC: L(i, j) = mean over samples of -log softmax over view j's K candidates;
    the objective sums L(i, j) + L(j, i) over the pairs."""
    z = _unit(z)
    k = len(z)

    def two_view(a, c):
        return np.mean([-np.log(np.exp(z[n, a] @ z[n, c] / t)
                                / sum(np.exp(z[n, a] @ z[q, c] / t) for q in range(k)))
                        for n in range(k)])
    return sum(two_view(i, j) + two_view(j, i) for i, j in pairs)


NCE_EPS = 1e-7  # NCECriterion's


def nce_average_reference(z, banks, y, idx, z_consts, t, momentum, n_data, pairs):
    """HobbitLong/CMC's NCEAverage.forward then NCECriterion, in float64, from its two views
    (l, ab) to the pairs of a graph with one bank per view: pair (i, j) scores view i
    against bank j (NCEAverage's out_l: l against memory_ab) and view j against bank i;
    out = exp(w.z / t), its Z = mean(out) * n_data at the term's first call, then kept;
    NCECriterion of out / Z, Pn = 1 / n_data; loss = the terms' sum (l_loss + ab_loss);
    then each view's bank: rows y <- (m row + (1 - m) z) / its norm.

    z: (B, M, D) the model's outputs (unit rows: its Normalize); banks: (M, N, D);
    y: (B,) distinct rows; idx: (B, K + 1), idx[:, 0] = y (the authors' draw);
    z_consts: {(a, c): Z} of the terms already set. -> (loss, new banks, new z_consts)."""
    z, banks, z_consts = _unit(z), np.array(banks, np.float64), dict(z_consts)
    b, m = z.shape[:2]
    k = idx.shape[1] - 1
    loss = 0.0
    for i, j in pairs:
        for a, c in ((i, j), (j, i)):
            weight = banks[c][idx]                                      # (B, K + 1, D)
            out = np.exp(np.einsum("bkd,bd->bk", weight, z[:, a]) / t)
            if z_consts.get((a, c), -1) < 0:
                z_consts[(a, c)] = out.mean() * n_data
            x = out / z_consts[(a, c)]
            pn = 1.0 / n_data
            log_d1 = np.log(x[:, 0] / (x[:, 0] + k * pn + NCE_EPS))
            log_d0 = np.log(k * pn / (x[:, 1:] + k * pn + NCE_EPS))
            loss += -(log_d1.sum() + log_d0.sum()) / b
    new = banks.copy()
    for v in range(m):
        pos = banks[v][y] * momentum + z[:, v] * (1 - momentum)
        new[v][y] = pos / np.linalg.norm(pos, axis=1, keepdims=True)
    return loss, new, z_consts


def authors_bank(rng, m, n, d):
    """NCEAverage's init: every row uniform in +-1/sqrt(D/3), not normalised."""
    stdv = 1.0 / np.sqrt(d / 3)
    return rng.uniform(-stdv, stdv, (m, n, d))


def mv_infonce_reference(z, t):
    z = _unit(z)
    k, m, _ = z.shape
    total = 0.0
    for i in range(k):
        num = sum(np.exp(z[i, l] @ z[i, q] / t) for l in range(m) for q in range(m) if q != l)
        den = sum(np.exp(z[i, l] @ z[j, q] / t) for l in range(m)
                  for j in range(k) for q in range(m) if (j, q) != (i, l))
        total += -np.log(num / den)
    return total / k


def mv_dhel_reference(z, t):
    z = _unit(z)
    k, m, _ = z.shape
    total = 0.0
    for i in range(k):
        num = sum(np.exp(z[i, l] @ z[i, q] / t) for l in range(m) for q in range(l + 1, m))
        den = np.prod([sum(np.exp(z[i, l] @ z[j, l] / t) for j in range(k) if j != i)
                       for l in range(m)])
        total += -np.log(num / den)
    return total / k


def _z(seed, shape):
    return np.random.default_rng(seed).normal(size=shape)


def _value(f, z, *args):
    return float(jax.jit(lambda z: f(z, *args)[0])(jnp.asarray(z, jnp.float32)))


# ------------------------------------------------------------------ Poly-View

@pytest.mark.parametrize("variant", multiview.POLYVIEW_VARIANTS)
def test_polyview_at_two_views_is_nt_xent(variant):
    z = jnp.asarray(_z(0, (6, 2, 5)), jnp.float32)
    f = jax.value_and_grad(lambda z: multiview.polyview(z, 0.2, variant), has_aux=True)
    g = jax.value_and_grad(lambda z: losses.nt_xent(z[:, 0], z[:, 1], 0.2), has_aux=True)
    (fv, fm), fg = jax.jit(f)(z)
    (gv, gm), gg = jax.jit(g)(z)
    np.testing.assert_allclose(fv, gv, rtol=1e-6)
    np.testing.assert_allclose(fg, gg, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fm["contrast_acc"], gm["contrast_acc"])


def test_polyview_at_three_views_matches_algorithm_1():
    z = _z(1, (5, 3, 4))
    geo = _value(multiview.polyview, z, 0.3, "geometric")
    ari = _value(multiview.polyview, z, 0.3, "arithmetic")
    np.testing.assert_allclose(geo, polyview_reference(z, 0.3, "geometric"), rtol=1e-5)
    np.testing.assert_allclose(ari, polyview_reference(z, 0.3, "arithmetic"), rtol=1e-5)
    # log is concave: the log of the mean probability >= the mean log-probability.
    assert ari < geo - 1e-3


def test_polyview_logits_count_and_accuracy():
    z = _z(2, (7, 4, 6))
    _, metrics = jax.jit(lambda z: multiview.polyview(z, 0.2))(jnp.asarray(z, jnp.float32))
    assert float(metrics["logits"]) == 4 * (7 - 1) + 1
    # Views of one sample point one way, of the others other ways: every top-1 a positive.
    easy = np.repeat(np.eye(6)[:5, None], 4, axis=1) + 0.01 * _z(3, (5, 4, 6))
    _, metrics = multiview.polyview(jnp.asarray(easy, jnp.float32), 0.2)
    assert float(metrics["contrast_acc"]) == 1.0


def test_multicrop_nt_xent_is_swav_eq7_and_polyview_geometric():
    # SwAV appendix A.8, Eq. 7: each positive pair's denominator is the pair plus every crop
    # of the OTHER images (replaces test_multicrop's reference, which kept the positives in).
    z = _z(4, (5, 2 + 3, 4))
    mc = _value(losses.multicrop_nt_xent, z, 0.3)
    np.testing.assert_allclose(mc, polyview_reference(z, 0.3, "geometric"), rtol=1e-5)
    np.testing.assert_allclose(mc, _value(multiview.polyview, z, 0.3, "geometric"), rtol=1e-6)
    easy = np.repeat(np.eye(5)[:, None], 5, axis=1) + 0.01 * _z(5, (5, 5, 5))
    _, metrics = losses.multicrop_nt_xent(jnp.asarray(easy, jnp.float32), 0.3)
    assert float(metrics["contrast_acc"]) == 1.0


# ------------------------------------------------------------------ CMC

def test_cmc_at_two_views_is_both_directions_summed_not_nt_xent():
    z = _z(6, (6, 2, 5))
    got = _value(multiview.cmc, z, 0.2, "core")
    np.testing.assert_allclose(got, cmc_reference(z, 0.2, [(0, 1)]), rtol=1e-5)
    np.testing.assert_allclose(got, _value(multiview.cmc, z, 0.2, "full"), rtol=1e-6)
    nt = float(losses.nt_xent(jnp.asarray(z[:, 0], jnp.float32),
                              jnp.asarray(z[:, 1], jnp.float32), 0.2)[0])
    assert abs(got - nt) > 0.5 and abs(got / 2 - nt) > 0.05


@pytest.mark.parametrize("graph,count", [("core", 3), ("full", 6)])
def test_cmc_graphs_sum_their_pairs(graph, count):
    z = _z(7, (5, 4, 3))
    pairs = multiview.cmc_pairs(4, graph)
    assert len(pairs) == count and len(set(pairs)) == count
    assert (graph == "full") or all(i == 0 for i, _ in pairs)
    got, metrics = jax.jit(lambda z: multiview.cmc(z, 0.3, graph))(jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(float(got), cmc_reference(z, 0.3, pairs), rtol=1e-5)
    assert float(metrics["pairs"]) == count


@pytest.mark.parametrize("m,graph", [(2, "core"), (3, "full")])
def test_cmc_nce_is_the_authors_nce_average_and_criterion(m, graph):
    """multiview.cmc_nce on the rows NCEAverage would read == its forward + NCECriterion
    (NumPy), two batches: the first sets each directed term's Z, the second keeps it."""
    rng, n, b, k, d, t = np.random.default_rng(20), 50, 6, 7, 5, 0.2
    banks, pairs = authors_bank(rng, m, n, d), multiview.cmc_pairs(m, graph)
    log_z, z_consts = jnp.full((m, m), -jnp.inf), {}
    for step in range(2):
        y, negs = rng.permutation(n)[:b], rng.integers(0, n, k)
        z = rng.normal(size=(b, m, d))
        if step:  # near their own rows: a larger mean exp(score), another Z's estimate
            z = banks[:, y].transpose(1, 0, 2) + 0.1 * z
        idx = np.concatenate([y[:, None], np.broadcast_to(negs, (b, k))], axis=1)
        want, new_banks, z_consts = nce_average_reference(z, banks, y, idx, z_consts, t, 0.5, n,
                                                          pairs)
        got, metrics = jax.jit(lambda z, p, u, lz: multiview.cmc_nce(z, p, u, lz, t, n, graph))(
            *(jnp.asarray(x, jnp.float32) for x in (z, banks[:, y].transpose(1, 0, 2),
                                                    banks[:, negs].transpose(1, 0, 2), log_z)))
        np.testing.assert_allclose(float(got), want, rtol=1e-5, err_msg=f"step {step}")
        terms = [(a, c) for i, j in pairs for a, c in ((i, j), (j, i))]
        got_z = np.exp(np.asarray(metrics["log_z"], np.float64))
        assert sorted(terms) == sorted(z_consts) and len(terms) == 2 * len(pairs)
        for a, c in itertools.product(range(m), range(m)):
            if (a, c) in z_consts:
                np.testing.assert_allclose(got_z[a, c], z_consts[a, c], rtol=1e-5)
            else:  # no pair: never estimated
                assert got_z[a, c] == 0.0
        if step == 1:  # the second batch's own estimate is another Z: it was not taken
            fresh = nce_average_reference(z, banks, y, idx, {}, t, 0.5, n, pairs)[2]
            assert all(abs(fresh[q] / z_consts[q] - 1) > 0.05 for q in terms)
        assert float(metrics["pairs"]) == len(pairs)
        banks, log_z = new_banks, metrics["log_z"]


# ------------------------------------------------------------------ Koromilas et al.

def test_mv_infonce_and_mv_dhel_by_hand():
    # Two samples, three views each; one sample's views all along x, the other's along y:
    # s = 1/t between a sample's views, 0 across samples.
    z = np.array([[[1.0, 0.0]] * 3, [[0.0, 1.0]] * 3])
    t = 0.5
    e = np.exp(1 / t)
    # MV-InfoNCE: 6 ordered pairs over, per view, 2 own views + 3 of the other sample.
    np.testing.assert_allclose(_value(multiview.mv_infonce, z, t),
                               -np.log(6 * e / (3 * (2 * e + 3))), rtol=1e-5)
    # MV-DHEL: 3 unordered pairs over a product of 3 one-term sums of exp(0).
    np.testing.assert_allclose(_value(multiview.mv_dhel, z, t), -np.log(3 * e), rtol=1e-5)


@pytest.mark.parametrize("fn,ref", [(multiview.mv_infonce, mv_infonce_reference),
                                    (multiview.mv_dhel, mv_dhel_reference)])
def test_koromilas_losses_match_the_definition(fn, ref):
    for shape in ((6, 2, 5), (5, 4, 3)):
        z = _z(8, shape)
        np.testing.assert_allclose(_value(fn, z, 0.3), ref(z, 0.3), rtol=1e-5)


# ------------------------------------------------------------------ all of them

ALL = [(multiview.polyview, ("geometric",)), (multiview.polyview, ("arithmetic",)),
       (multiview.cmc, ("full",)), (multiview.mv_infonce, ()), (multiview.mv_dhel, ())]


@pytest.mark.parametrize("fn,args", ALL + [(multiview.cmc, ("core",))])
def test_invariant_to_permuting_samples_and_views(fn, args):
    z = _z(9, (6, 4, 5))
    base = _value(fn, z, 0.25, *args)
    rng = np.random.default_rng(10)
    views = rng.permutation(4) if args != ("core",) else np.r_[0, 1 + rng.permutation(3)]
    assert list(views) != list(range(4))
    permuted = z[rng.permutation(6)][:, views]
    np.testing.assert_allclose(_value(fn, permuted, 0.25, *args), base, rtol=1e-5)


@pytest.mark.parametrize("fn,args", ALL + [(multiview.cmc, ("core",))])
def test_gradients_finite_and_not_zero(fn, args):
    z = jnp.asarray(_z(11, (4, 3, 5)), jnp.float32)
    g = jax.jit(jax.grad(lambda z: fn(z, 0.1, *args)[0]))(z)
    assert np.isfinite(g).all() and np.abs(g).max() > 1e-4


def test_unknown_variant_and_graph_are_refused():
    z = jnp.zeros((2, 2, 3))
    with pytest.raises(ValueError, match="variant"):
        multiview.polyview(z, 0.1, "harmonic")
    with pytest.raises(ValueError, match="graph"):
        multiview.cmc(z, 0.1, "star")


SNIPPET = """
import jax, jax.numpy as jnp
from ssl_jax import multiview, parallel
z = jnp.asarray(np.random.default_rng(12).normal(size=(16, 3, 8)), jnp.float32)
fns = {"poly_geo": lambda a, axis_name: multiview.polyview(a, 0.2, "geometric", axis_name),
       "poly_ari": lambda a, axis_name: multiview.polyview(a, 0.2, "arithmetic", axis_name),
       "cmc_core": lambda a, axis_name: multiview.cmc(a, 0.2, "core", axis_name),
       "cmc_full": lambda a, axis_name: multiview.cmc(a, 0.2, "full", axis_name),
       "infonce": lambda a, axis_name: multiview.mv_infonce(a, 0.2, axis_name),
       "dhel": lambda a, axis_name: multiview.mv_dhel(a, 0.2, axis_name)}
mesh = parallel.make_mesh()
out["devices"] = len(jax.devices())

def all_of_them(a):  # one jit for the six: one compilation
    res = {}
    for name, fn in fns.items():
        f = parallel.on_shards(fn, (True,))
        (res[name], metrics), res[name + "_grad"] = jax.value_and_grad(f, has_aux=True)(a)
        res.update({f"{name}_{k}": v for k, v in metrics.items()})
    return res
# CMC's NCE: z and each sample's bank rows side by side on the last axis (both per sample,
# sharded together); the drawn rows replicated; every Z estimated on this batch.
r = np.random.default_rng(13)
pos, neg = r.normal(size=(16, 3, 8)), r.normal(size=(5, 3, 8))

def nce(a, axis_name):
    return multiview.cmc_nce(a[..., :8], a[..., 8:], jnp.asarray(neg, jnp.float32),
                             jnp.full((3, 3), -jnp.inf), 0.2, 100, "full", axis_name)

def nce_all(a):
    (res, metrics), grad = jax.value_and_grad(parallel.on_shards(nce, (True,)), has_aux=True)(a)
    return {"nce": res, "nce_grad": grad[..., :8], **{f"nce_{k}": v for k, v in metrics.items()}}
with jax.set_mesh(mesh):
    out.update(jax.jit(all_of_them)(jax.device_put(z, parallel.batch_sharding(mesh))))
    zp = jnp.asarray(np.concatenate([z, pos], -1), jnp.float32)
    out.update(jax.jit(nce_all)(jax.device_put(zp, parallel.batch_sharding(mesh))))
"""


def test_global_batch_one_device_is_eight_devices(tmp_path_factory):
    one, eight = multidevice.run_one_and_eight(SNIPPET, tmp_path_factory)
    assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
    for key in set(one) - {"devices"}:
        np.testing.assert_allclose(eight[key], one[key], rtol=1e-5, atol=1e-7, err_msg=key)
    z = np.random.default_rng(12).normal(size=(16, 3, 8))
    expected = {"poly_geo": polyview_reference(z, 0.2, "geometric"),
                "poly_ari": polyview_reference(z, 0.2, "arithmetic"),
                "cmc_core": cmc_reference(z, 0.2, multiview.cmc_pairs(3, "core")),
                "cmc_full": cmc_reference(z, 0.2, multiview.cmc_pairs(3, "full")),
                "infonce": mv_infonce_reference(z, 0.2), "dhel": mv_dhel_reference(z, 0.2)}
    # CMC's NCE: the bank rows as NCEAverage reads them (rows 0-15 the samples', 16-20 drawn).
    r = np.random.default_rng(13)
    pos, neg = r.normal(size=(16, 3, 8)), r.normal(size=(5, 3, 8))
    banks = np.concatenate([pos, neg]).transpose(1, 0, 2)
    idx = np.concatenate([np.arange(16)[:, None], np.broadcast_to(np.arange(16, 21), (16, 5))], 1)
    expected["nce"], _, z_consts = nce_average_reference(z, banks, np.arange(16), idx, {}, 0.2,
                                                         0.5, 100, multiview.cmc_pairs(3, "full"))
    for key, value in expected.items():
        np.testing.assert_allclose(float(eight[key]), value, rtol=1e-5, err_msg=key)
    for (a, c), value in z_consts.items():  # one Z per term, from the whole global batch
        np.testing.assert_allclose(np.exp(float(eight["nce_log_z"][a, c])), value, rtol=1e-5)
    assert float(eight["poly_geo_logits"]) == 3 * (16 - 1) + 1
