"""Methods through the network: the same loss and gradients on 1 and 8 devices
for the same global batch (BN over the global batch, global negatives,
shuffle-BN groups independent of the device count); and the loss's value
against NumPy, from embeddings of plain forward passes of the method's network."""
import numpy as np
import pytest

from ssl_jax.config import load_file
from tests import multidevice

SNIPPET = """
import jax, jax.numpy as jnp
jax.config.update("jax_threefry_partitionable", False)  # as fast_prng (conftest.py)
from ssl_jax import methods, parallel
from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec
from ssl_jax.methods import network
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
    if out["devices"] > 1:
        continue
    # For the NumPy references (one device): head outputs of plain forward passes.
    if name == "simclr":  # both views in one batch, BN over all 2B images (any order)
        z = jax.jit(lambda p, s, x: network.apply(network.make_network(c), p, s, x)[1])(
            params, state["batch_stats"], jnp.concatenate([views["view1"], views["view2"]]))
        out["ref_simclr_z1"], out["ref_simclr_z2"] = z[:32], z[32:]
    else:  # shuffle-BN by hand: BN over each group of 8 alone (a net with one BN group)
        z = jax.jit(lambda p, s, x: network.apply(network.make_network(c, bn_groups=1), p, s, x)[1])
        n = 32 // c.moco.bn_groups
        out["ref_moco_q"] = np.concatenate(  # queries: contiguous groups, the batch's order
            [z(params, state["batch_stats"], views["query"][i:i + n]) for i in range(0, 32, n)])
        perm = np.asarray(jax.random.permutation(jax.random.key(3), 32))  # the step's shuffle
        k = np.zeros_like(out["ref_moco_q"])
        for i in range(0, 32, n):  # keys: the groups of the shuffled batch, put back
            rows = perm[i:i + n]
            k[rows] = z(state["key_params"], state["key_batch_stats"], views["key"][rows])
        out["ref_moco_k"], out["ref_moco_queue"] = k, state["queue"]
        out["ref_moco_new_queue"] = new_state["queue"]
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
    # The loss's value: test_loss_is_the_papers_loss_of_the_networks_embeddings.


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax_at(logits, labels):
    """log softmax(logits)[i, labels[i]] per row, float64, overflow-free."""
    top = logits.max(1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(1))
    return logits[np.arange(len(logits)), labels] - log_norm


def _nt_xent(z1, z2, t):
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1): the 2B cosine-similarity
    anchors, each a cross-entropy against its other view among the 2B - 1 other
    embeddings (never itself), at temperature t; the mean over the 2B anchors."""
    z = _unit(np.concatenate([z1, z2]))
    b = len(z1)
    logits = z @ z.T / t
    np.fill_diagonal(logits, -np.inf)  # k != i
    positive = np.concatenate([np.arange(b, 2 * b), np.arange(b)])
    return float(-np.mean(_log_softmax_at(logits, positive)))


def _info_nce(q, k, queue, t):
    """MoCo's InfoNCE (He et al. 2020, eq. 1): each normalised query against its
    own key (the positive) and the K queued keys, at temperature t; the mean."""
    q, k = _unit(q), _unit(k)
    queue = np.asarray(queue, np.float64)
    logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue.T], 1)
    return float(-np.mean(_log_softmax_at(logits / t, np.zeros(len(q), int))))


def test_loss_is_the_papers_loss_of_the_networks_embeddings(one_and_eight):
    """SimCLR's loss from the two views' embeddings; MoCo's from queries and keys
    normalised in BN groups of 8 (contiguous for the queries, of the step's
    shuffle for the keys) and the queue before this batch. test_meaning_moco.py
    pins MoCo with one BN group (FIFO queue, momentum); this pins the groups."""
    one, _ = one_and_eight
    simclr, moco = (load_file(f"configs/{m}.py:runlocal") for m in ("simclr", "moco"))
    want = _nt_xent(one["ref_simclr_z1"], one["ref_simclr_z2"], simclr.simclr.temperature)
    np.testing.assert_allclose(one["simclr_loss"], want, rtol=1e-4)
    # A wrong pairing of the views would move the loss far beyond rtol.
    shifted = np.roll(one["ref_simclr_z2"], 1, axis=0)
    assert abs(_nt_xent(one["ref_simclr_z1"], shifted, simclr.simclr.temperature) - want) > 1e-2

    q, k = one["ref_moco_q"], one["ref_moco_k"]
    want = _info_nce(q, k, one["ref_moco_queue"], moco.moco.temperature)
    np.testing.assert_allclose(one["moco_loss"], want, rtol=1e-4)
    # The method enqueued these keys (normalised) in the first 32 of its 64 rows.
    np.testing.assert_allclose(one["ref_moco_new_queue"][:32], _unit(k), atol=2e-5)
    np.testing.assert_array_equal(one["ref_moco_new_queue"][32:], one["ref_moco_queue"][32:])
    # A key paired with another image's query would move the loss far beyond rtol.
    assert abs(_info_nce(q, np.roll(k, 1, axis=0), one["ref_moco_queue"], moco.moco.temperature)
               - want) > 1e-2
