"""Gradient accumulation's gradient, computed by hand (accumulate.grads_fn's docstring):

(a) Multi-crop SimCLR (2 global + 2 local crops, a tiny ConvNet with BatchNorm) with
    accumulate_steps = 2 is the mean of the gradients of the two half-batches, each a
    loss with only its own half's negatives and BN statistics (micro-batch j: images
    j B/2 .. (j+1) B/2 - 1 on one device), the method state threaded from the first
    half to the second. It is not the whole-batch gradient: the documented
    approximation (a smaller effective batch for the contrastive loss), shown to differ.
(b) A loss without batch coupling (supervised and RotNet on a ViT: no BatchNorm, a mean
    over examples) with accumulate_steps = 2 equals accumulate_steps = 1 to float32
    rounding. (With BatchNorm, tests/test_accumulate.py pins the matching ghost groups.)
One fixed batch and rng, one device; grads_fn is called directly, jitted.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from ssl_jax import accumulate, experiment, methods, parallel
from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec

pytestmark = pytest.mark.usefixtures("fast_prng")

B = 8
SPEC = DataSpec(num_examples=64, image_shape=(28, 28, 1), num_classes=10)


def _config(spec_str: str, a: int):
    c = load_file(spec_str)
    c.batch_size, c.accumulate_steps = B, a
    if c.model.name == "convnet":
        c.model.update(widths=(4, 8), conv="xla")  # two small blocks: compiling dominates
    else:
        c.model.update(width=16, heads=2, depth=1)
    if "head" in c:
        c.head.hidden, c.head.dim = 16, 8
    return c


def _inputs(c):
    """(method, params, method_state, views, facts, rng, state sharding, mesh) of a
    fixed batch."""
    mesh = parallel.make_mesh()
    exp = experiment.Experiment(c, SPEC, mesh)
    state = exp.initial_state()
    method = methods.get(c.method)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (B, 28, 28, 1)).astype(np.uint8)
    views = jax.jit(lambda r, x: method.views(r, x, c))(jax.random.key(1), images)
    facts = {"index": np.arange(B, dtype=np.int32)}
    if method.uses_labels:
        facts["label"] = rng.integers(0, 10, B).astype(np.int32)
    return (method, state["params"], state["method_state"], views, facts,
            jax.random.key(2), exp.state_sharding["method_state"], mesh)


def _grads(c, a, inputs):
    method, params, ms, views, facts, rng, sharding, mesh = inputs
    f = jax.jit(accumulate.grads_fn(method, c, SPEC, mesh, sharding, a))
    with jax.set_mesh(mesh):
        loss, _, _, grads = f(params, ms, views, facts, rng)
    return float(loss), jax.device_get(grads)


def _close(a, b, rtol) -> bool:
    """Leaf-wise |a - b| <= rtol * max|b|: each leaf to its own scale."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    return all(np.all(np.abs(x - y) <= rtol * np.abs(y).max()) for x, y in zip(la, lb))


def test_multicrop_simclr_accumulated_gradient_is_the_mean_of_the_half_batch_gradients():
    c = _config("configs/simclr.py:runlocal,local_crops=2", a=2)
    inputs = _inputs(c)
    method, params, ms, views, facts, rng, _, mesh = inputs
    assert set(views) == {"global", "local"} and views["local"].shape[:2] == (B, 2)
    loss, grads = _grads(c, 2, inputs)

    grad_fn = jax.jit(jax.value_and_grad(
        lambda p, s, v, f, r: method.loss(p, s, v, f, r, c, SPEC), has_aux=True))
    half = lambda j: lambda x: x[j * B // 2:(j + 1) * B // 2]
    losses, parts, state = [], [], ms
    with jax.set_mesh(mesh):
        for j in range(2):
            (lj, (_, state)), gj = grad_fn(params, state, jax.tree.map(half(j), views),
                                           jax.tree.map(half(j), facts),
                                           jax.random.fold_in(rng, j))
            losses.append(float(lj))
            parts.append(jax.device_get(gj))
    by_hand = jax.tree.map(lambda g0, g1: (g0 + g1) / 2, *parts)
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-6)
    # 1e-5 of each leaf's scale: the same sums, only the mean taken in a scan.
    assert _close(grads, by_hand, 1e-5)
    # The whole batch (2B - 2 negatives per view pair, BN over all B) is another gradient.
    whole_loss, whole = _grads(_config("configs/simclr.py:runlocal,local_crops=2", a=1),
                               1, inputs)
    assert not _close(grads, whole, 1e-2) and abs(whole_loss - loss) > 1e-3


@pytest.mark.parametrize("method", ["supervised", "rotnet"])
def test_a_loss_without_batch_coupling_accumulates_to_the_whole_batch_gradient(method):
    spec_str = f"configs/{method}.py:model=vit_tiny,runlocal"
    c1, c2 = _config(spec_str, a=1), _config(spec_str, a=2)
    inputs = _inputs(c1)
    loss1, g1 = _grads(c1, 1, inputs)
    loss2, g2 = _grads(c2, 2, inputs)
    np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
    # float32 rounding of a mean of two half means against one mean: measured <= 1e-6.
    assert _close(g2, g1, 1e-5)
