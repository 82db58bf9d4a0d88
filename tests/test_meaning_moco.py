"""MoCo's meaning, against references computed here (NumPy), not against itself:
the queue holds the keys of earlier batches, first in first out, its pointer
wrapping; each query's positive is its own image's key (the keys are put back in
the batch's order after shuffle-BN); negatives come from the queue as it was
before this batch is enqueued; the key encoder moves toward the query encoder
by (1 - m). test_methods.py pins 1 vs 8 devices and test_accumulate.py the
once-per-step momentum inside the train loop; these pin the values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec
from ssl_jax.methods import moco, network

B, K, T, M = 8, 24, 0.2, 0.9  # batch, queue (3 batches), temperature, momentum (m != 1 - m)
SPEC = DataSpec(num_examples=64, image_shape=(8, 8, 1))

pytestmark = pytest.mark.usefixtures("fast_prng")  # conftest.py; nothing compares PRNG modes


def small_config():
    c = load_file("configs/moco.py:runlocal")
    c.model.widths, c.model.conv = (4, 8), "xla"
    c.head.hidden, c.head.dim = 16, 8
    # bn_groups = 1: BN over the whole batch does not depend on the rows' order, so the
    # keys the loss computes after its shuffle must equal an unshuffled forward pass.
    c.moco.update(queue_size=K, bn_groups=1, momentum=M, temperature=T)
    c.batch_size = B
    return c


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _info_nce(q, k, queue):
    """Mean over rows of -log softmax([q.k, q.queue] / T)[0], float64."""
    q, k = _unit(q), _unit(k)
    logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ np.asarray(queue, np.float64).T],
                            1) / T
    return float(np.mean(np.log(np.exp(logits).sum(1)) - logits[:, 0]))


@pytest.fixture(scope="module")
def setup():
    c = small_config()
    rng = np.random.default_rng(0)
    views = lambda: {k: jnp.asarray(rng.normal(size=(B, 8, 8, 1)), jnp.float32)
                     for k in ("query", "key")}
    params, state = moco.init(jax.random.key(0), views(), c, SPEC)
    # A key encoder unlike the query encoder, so that a key and a query of the same
    # image differ (a loss that paired queries with queries would show).
    state = dict(state, key_params=jax.tree.map(
        lambda p: p + 0.3 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params))
    loss = jax.jit(lambda p, s, v, r: moco.loss(p, s, v, {"index": jnp.arange(B)}, r, c, SPEC))
    return c, params, state, loss, [views() for _ in range(4)]


def _reference_keys_and_queries(c, params, state, views):
    """Keys and queries in the batch's order, from plain forward passes (no shuffle)."""
    net = moco._net(c)  # the method's network (encoder + head), run plainly
    _, q, _ = network.apply(net, params, state["batch_stats"], views["query"])
    _, k, _ = network.apply(net, state["key_params"], state["key_batch_stats"], views["key"])
    return np.asarray(q), _unit(k)


def test_queue_is_fifo_of_unpermuted_keys_and_loss_uses_the_old_queue(setup):
    c, params, state, loss, batches = setup
    queue = np.asarray(state["queue"], np.float64).copy()   # the reference FIFO
    ptr = 0
    for step, views in enumerate(batches):  # 4 batches of 8 in a queue of 24: wraps once
        rng = jax.random.key(10 + step)
        perm = np.asarray(jax.random.permutation(rng, B))
        # The shuffle must not be its own inverse, or a missing argsort would pass.
        assert not np.array_equal(perm[perm], np.arange(B)), step
        q, k = _reference_keys_and_queries(c, params, state, views)
        value, (metrics, new) = loss(params, state, views, rng)
        # Each query's positive is its own image's key; the negatives are the queue
        # before this batch's keys enter it.
        np.testing.assert_allclose(float(value), _info_nce(q, k, queue), rtol=1e-4, err_msg=step)
        queue[ptr:ptr + B] = k
        ptr = (ptr + B) % K
        np.testing.assert_allclose(np.asarray(new["queue"]), queue, atol=2e-5, err_msg=step)
        assert int(new["queue_ptr"]) == ptr, step
        state = new
    assert ptr == B  # wrapped: rows [0, 8) now hold the 4th batch, [8, 24) the 2nd and 3rd


def test_key_encoder_moves_toward_the_query_encoder_by_one_minus_m():
    rng = np.random.default_rng(1)
    tree = lambda: {"encoder": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
                    "head": {"b": rng.normal(size=(5,)).astype(np.float32)}}
    params, key_params = tree(), tree()
    state = {"key_params": key_params, "queue": np.zeros((K, 8), np.float32)}
    new = moco.before_step(params, state, small_config())
    for part, name in (("encoder", "w"), ("head", "b")):
        k, p = key_params[part][name].astype(np.float64), params[part][name]
        np.testing.assert_allclose(new["key_params"][part][name], M * k + (1 - M) * p,
                                   rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(new["queue"], state["queue"])  # nothing else moves
