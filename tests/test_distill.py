"""Self-distillation losses (ssl_jax/distill.py) against NumPy recomputations of DINO's,
DINOv2's and iBOT's definitions on fixed inputs, and the same values and gradients on 1
and 8 devices (one subprocess pair for every function)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import distill
from tests import multidevice


# Jitted once each: one compile per shape is ~5x faster than running the ops eagerly.
_dino = jax.jit(distill.dino_loss)
_center = jax.jit(distill.update_center)
_sinkhorn = jax.jit(distill.sinkhorn_knopp, static_argnames="iterations")
_koleo = jax.jit(distill.koleo)
_ibot = jax.jit(distill.ibot_patch_loss)
_patch_center = jax.jit(distill.update_patch_center)
_probs = jax.jit(distill.teacher_probs)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ------------------------------------------------------------------ DINO

def _np_dino(student, teacher, center, ts, tt):
    """DINOLoss.forward, one (teacher crop, student crop) pair at a time, float64."""
    student, teacher = student.astype(np.float64), teacher.astype(np.float64)
    pt = _softmax((teacher - center) / tt)                      # centre, then sharpen
    total, pairs, kls = 0.0, 0, 0.0
    for g in range(teacher.shape[1]):
        for s in range(student.shape[1]):
            if s == g:
                continue
            logps = _log_softmax(student[:, s] / ts)
            ce = -(pt[:, g] * logps).sum(-1)                    # (b,)
            total += ce.mean()
            kls += (pt[:, g] * (np.log(pt[:, g]) - logps)).sum(-1).mean()
            pairs += 1
    h = -(pt * np.log(pt)).sum(-1)                              # (b, G)
    mean_p = pt.mean((0, 1))
    return total / pairs, {"teacher_entropy": h.mean(), "kl": kls / pairs,
                           "teacher_batch_entropy": -(mean_p * np.log(mean_p)).sum()}


def _dino_inputs(b=5, g=2, local=2, k=7, seed=0):
    r = _rng(seed)
    return (r.normal(size=(b, g + local, k)).astype(np.float32),
            r.normal(size=(b, g, k)).astype(np.float32),
            r.normal(size=(k,)).astype(np.float32) * 0.5)


def test_dino_loss_two_global_two_local_crops_matches_numpy():
    """2 global + 2 local crops: 6 pairs (0 with 1, 2, 3; 1 with 0, 2, 3), never (0, 0) or
    (1, 1); the centre subtracted before the temperature; a mean over the batch."""
    student, teacher, center = _dino_inputs()
    loss, metrics = _dino(student, teacher, center, 0.1, 0.04)
    want, want_metrics = _np_dino(student, teacher, center, 0.1, 0.04)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    for key, value in want_metrics.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-4, atol=1e-6, err_msg=key)


def test_dino_loss_with_no_local_crops_is_the_two_swapped_pairs():
    """G = S = 2: loss = (CE(t0, s1) + CE(t1, s0)) / 2, by hand."""
    student, teacher, center = _dino_inputs(b=3, local=0, k=5, seed=1)
    loss, _ = _dino(student, teacher, center, 0.1, 0.07)
    pt = _softmax((teacher.astype(np.float64) - center) / 0.07)
    lp = _log_softmax(student.astype(np.float64) / 0.1)
    want = (-(pt[:, 0] * lp[:, 1]).sum(-1).mean() - (pt[:, 1] * lp[:, 0]).sum(-1).mean()) / 2
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_dino_loss_sends_no_gradient_to_the_teacher_or_centre_and_takes_given_targets():
    student, teacher, center = _dino_inputs(seed=2)
    grads = jax.jit(jax.grad(lambda s, t, c: distill.dino_loss(s, t, c, 0.1, 0.04)[0],
                             argnums=(0, 1, 2)))(student, teacher, center)
    grads = [np.abs(np.asarray(g)).max() for g in grads]
    assert grads[0] > 0 and grads[1] == 0 and grads[2] == 0
    probs = _probs(teacher, center, 0.04)
    given, _ = _dino(student, None, None, 0.1, None, teacher_probs=probs)
    np.testing.assert_allclose(float(given),
                               float(_dino(student, teacher, center, 0.1, 0.04)[0]),
                               rtol=1e-6)


def test_dino_metrics_read_collapse():
    """A uniform teacher: both entropies ln K. Every image on prototype 3: ~0 both.
    Each image on its own prototype: per-row entropy ~0, batch entropy ln b."""
    k, b = 6, 4
    student, center = np.zeros((b, 3, k), np.float32), np.zeros(k, np.float32)
    _, uniform = _dino(student, np.zeros((b, 2, k), np.float32), center, 0.1, 0.04)
    np.testing.assert_allclose(float(uniform["teacher_entropy"]), np.log(k), rtol=1e-5)
    np.testing.assert_allclose(float(uniform["teacher_batch_entropy"]), np.log(k), rtol=1e-5)
    np.testing.assert_allclose(float(uniform["kl"]), 0.0, atol=1e-6)
    one = np.zeros((b, 2, k), np.float32)
    one[:, :, 3] = 10.0
    _, collapsed = _dino(student, one, center, 0.1, 0.04)
    assert float(collapsed["teacher_entropy"]) < 1e-3
    assert float(collapsed["teacher_batch_entropy"]) < 1e-3
    own = np.zeros((b, 2, k), np.float32)
    own[np.arange(b), :, np.arange(b)] = 10.0
    _, spread = _dino(student, own, center, 0.1, 0.04)
    assert float(spread["teacher_entropy"]) < 1e-3
    np.testing.assert_allclose(float(spread["teacher_batch_entropy"]), np.log(b), rtol=1e-4)


def test_update_center_is_the_ema_of_the_batch_mean_over_images_and_crops():
    _, teacher, center = _dino_inputs(b=5, k=7, seed=3)
    got = _center(center, teacher, 0.9)
    want = center * 0.9 + teacher.astype(np.float64).reshape(-1, 7).mean(0) * 0.1
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ DINOv2's Sinkhorn-Knopp

def _np_sinkhorn(teacher, temp, iterations=3):
    """sinkhorn_knopp_teacher on one GPU, float64."""
    q = np.exp(teacher.astype(np.float64) / temp).T     # (K, B)
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(1, keepdims=True)
        q /= k
        q /= q.sum(0, keepdims=True)
        q /= b
    return (q * b).T


def test_sinkhorn_matches_numpy_columns_sum_to_one_prototypes_near_b_over_k():
    teacher = _rng(4).normal(size=(12, 5)).astype(np.float32) * 0.3
    got = np.asarray(_sinkhorn(teacher, 0.1))
    np.testing.assert_allclose(got, _np_sinkhorn(teacher, 0.1), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)          # each sample: a distribution
    # Each prototype: ~ B / K, nearer than a softmax's, and equal as iterations grow.
    off = lambda p: np.abs(p.sum(0) - 12 / 5).max()
    assert off(got) < 0.5 * off(_softmax(teacher / 0.1))
    assert off(np.asarray(_sinkhorn(teacher, 0.1, iterations=30))) < 1e-3


def test_sinkhorn_mask_is_sinkhorn_on_the_masked_rows_alone():
    teacher = _rng(5).normal(size=(10, 4)).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], bool)
    got = np.asarray(_sinkhorn(teacher, 0.1, mask=jnp.asarray(mask)))
    assert np.all(got[~mask] == 0)
    np.testing.assert_allclose(got[mask], _np_sinkhorn(teacher[mask], 0.1), rtol=1e-4, atol=1e-7)
    # A constant added to every logit cancels, even past exp's float32 range (DINOv2 overflows).
    shifted = np.asarray(_sinkhorn(teacher + 20.0, 0.1, mask=jnp.asarray(mask)))
    np.testing.assert_allclose(shifted, got, rtol=1e-4, atol=1e-7)
    none = _sinkhorn(teacher, 0.1, mask=jnp.zeros(10, bool))
    assert np.abs(np.asarray(none)).max() == 0


# ------------------------------------------------------------------ KoLeo

def _np_koleo(x):
    x = x.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    total = 0.0
    for i in range(len(x)):
        d = [np.linalg.norm(x[i] - x[j] + 1e-8) if j != i else np.inf for j in range(len(x))]
        total += -np.log(min(d) + 1e-8)
    return total / len(x)


def test_koleo_matches_numpy_nearest_other_point():
    x = _rng(6).normal(size=(9, 4)).astype(np.float32)
    np.testing.assert_allclose(float(_koleo(jnp.asarray(x))), _np_koleo(x), rtol=1e-5)
    # By hand: three unit vectors at 0, 90 and 180 degrees (scaled: normalised first).
    # Nearest other point: sqrt(2) for each -> -log(sqrt(2)).
    pts = jnp.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    np.testing.assert_allclose(float(_koleo(pts)), -np.log(np.sqrt(2)), rtol=1e-5)


# ------------------------------------------------------------------ iBOT

def _np_ibot(student, teacher, masks, center, ts, tt):
    """forward_masked with its masks_weight, one masked patch at a time, float64."""
    pt = _softmax((teacher.astype(np.float64) - center) / tt)
    lp = _log_softmax(student.astype(np.float64) / ts)
    total = 0.0
    for i in range(len(masks)):
        n_i = max(masks[i].sum(), 1)
        for n in np.flatnonzero(masks[i]):
            total += -(pt[i, n] * lp[i, n]).sum() / n_i
    return total / len(masks)


def _ibot_inputs(seed=7, b=4, n=6, k=5):
    r = _rng(seed)
    masks = np.array([[1, 1, 0, 0, 1, 0], [0] * 6, [0, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    normal = lambda *shape: r.normal(size=shape).astype(np.float32)
    return normal(b, n, k), normal(b, n, k), masks, normal(k) * 0.5


def test_ibot_patch_loss_matches_numpy_on_masked_patches_only():
    student, teacher, masks, center = _ibot_inputs()
    loss, metrics = _ibot(student, teacher, masks, center, 0.1, 0.04)
    np.testing.assert_allclose(float(loss), _np_ibot(student, teacher, masks, center, 0.1, 0.04),
                               rtol=1e-5)
    np.testing.assert_allclose(float(metrics["masked_fraction"]), masks.mean(), rtol=1e-6)
    # Unmasked patches, in the student or the teacher, change nothing (value or gradient).
    s2, t2 = student.copy(), teacher.copy()
    s2[~masks] += 5.0 * _rng(8).normal(size=s2[~masks].shape)
    t2[~masks] -= 3.0
    again, _ = _ibot(s2, t2, masks, center, 0.1, 0.04)
    np.testing.assert_allclose(float(again), float(loss), rtol=1e-6)
    loss_of = lambda s: distill.ibot_patch_loss(s, teacher, masks, center, 0.1, 0.04)[0]
    grad = np.abs(np.asarray(jax.jit(jax.grad(loss_of))(student))).max(-1)  # (b, N)
    assert grad[~masks].max() == 0 and grad[masks].min() > 0
    probs = _probs(teacher, center, 0.04)
    given, _ = _ibot(student, None, masks, None, 0.1, None, teacher_probs=probs)
    np.testing.assert_allclose(float(given), float(loss), rtol=1e-6)


def test_update_patch_center_averages_masked_patches_only():
    _, teacher, masks, center = _ibot_inputs(seed=9)
    got = _patch_center(center, teacher, masks, 0.9)
    want = center * 0.9 + teacher.astype(np.float64)[masks].mean(0) * 0.1
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    same = _patch_center(center, teacher, np.zeros_like(masks), 0.9)
    np.testing.assert_array_equal(np.asarray(same), center)


# ------------------------------------------------------------------ 1 device == 8

SNIPPET = """
import jax, jax.numpy as jnp
from ssl_jax import distill, parallel
r = np.random.default_rng(0)
b, k, n = 16, 6, 5
normal = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)
student, teacher, center, emb = normal(b, 4, k), normal(b, 2, k), normal(k) * 0.3, normal(b, 3)
sp, tp, masks = normal(b, n, k), normal(b, n, k), jnp.asarray(r.random((b, n)) < 0.4)
rows, row_mask = teacher.reshape(2 * b, k), jnp.arange(2 * b) % 3 > 0
shard = lambda fn, batch_args, **kw: jax.value_and_grad(parallel.on_shards(fn, batch_args, **kw),
                                                        has_aux=True)
dino = shard(lambda s, t, c, axis_name: distill.dino_loss(s, t, c, 0.1, 0.04, axis_name),
             (True, True, False))
ko = shard(lambda x, axis_name: (distill.koleo(x, axis_name), {}), (True,))
ibot = shard(lambda s, t, m, c, axis_name: distill.ibot_patch_loss(s, t, m, c, 0.1, 0.04,
                                                                   axis_name),
             (True, True, True, False))
center_fn = parallel.on_shards(lambda c, t, axis_name: distill.update_center(c, t, 0.9, axis_name),
                               (False, True))
sk = parallel.on_shards(lambda t, m, axis_name: distill.sinkhorn_knopp(t, 0.1, 3, axis_name,
                                                                     mask=m),
                        (True, True), batch_out=True)
pc = parallel.on_shards(lambda c, t, m, axis_name: distill.update_patch_center(c, t, m, 0.9,
                                                                               axis_name),
                        (False, True, True))


@jax.jit
def everything(student, teacher, emb, sp, tp, masks, rows, row_mask):
    res = {}
    (res["dino"], met), res["dino_g"] = dino(student, teacher, center)
    res.update({"dino_" + key: value for key, value in met.items()})
    (res["koleo"], _), res["koleo_g"] = ko(emb)
    (res["ibot"], met), res["ibot_g"] = ibot(sp, tp, masks, center)
    res.update({"ibot_" + key: value for key, value in met.items()})
    res["center"] = center_fn(center, teacher)
    res["sk"] = sk(rows, row_mask)
    res["patch_center"] = pc(center, tp, masks)
    return res


mesh = parallel.make_mesh()
out["devices"] = len(jax.devices())
with jax.set_mesh(mesh):
    sh = parallel.batch_sharding(mesh)
    args = (student, teacher, emb, sp, tp, masks, rows, row_mask)
    out.update(everything(*(jax.device_put(a, sh) for a in args)))
"""


@pytest.fixture(scope="module")
def one_and_eight(tmp_path_factory):
    return multidevice.run_one_and_eight(SNIPPET, tmp_path_factory)


def test_distill_equal_on_one_and_eight_devices(one_and_eight):
    one, eight = one_and_eight
    assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
    keys = sorted(k for k in one if k != "devices")
    assert len(keys) == 14, keys
    for key in keys:
        np.testing.assert_allclose(eight[key], one[key], rtol=2e-5, atol=1e-6, err_msg=key)
    for key in ("dino_g", "koleo_g", "ibot_g"):
        assert np.abs(one[key]).max() > 0, key  # gradients are not trivially zero
