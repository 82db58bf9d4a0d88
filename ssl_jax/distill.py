"""Self-distillation losses (DINO, DINOv2, iBOT), pure, on one device's rows of the batch.

As in losses.py, each function takes `axis_name`: None on one device, or the mesh axis
under `parallel.on_shards` (shard_map), and then every mean, sum and neighbour covers
the *global* batch, so the value does not depend on the device count (tests pin 1 == 8).
All math in float32; the teacher's targets are constants (stop_gradient).

  teacher_probs      softmax((teacher - center) / teacher_temp): DINO's centring
  dino_loss          CE of every teacher global crop against every other student crop
  update_center      the centre's EMA with the teacher's global-batch mean
  sinkhorn_knopp     DINOv2's alternative to centring: balanced targets
  koleo              DINOv2's KoLeo spreading regulariser on class embeddings
  ibot_patch_loss    iBOT's CE on the masked patches only
  update_patch_center  the patch centre's EMA over the masked patches

The centre is updated *after* the loss with the same teacher outputs (DINO's
DINOLoss.forward calls update_center last): a caller computes the loss with the old
centre and stores update_center(old centre, teacher, m) for the next step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from ssl_jax.losses import _gather, _global_mean, l2_normalize

_HI = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes in float32 contractions
_TINY = 1e-30  # a floor for sums that may be exactly 0 (nothing masked, an underflow)


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _entropy(p: jax.Array) -> jax.Array:
    """p: (..., K) probabilities -> (...,) entropy in nats; 0 log 0 = 0."""
    return -jnp.sum(xlogy(p, p), axis=-1)


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def teacher_probs(teacher: jax.Array, center: jax.Array, teacher_temp) -> jax.Array:
    """teacher: (..., K) logits; center: (K,) -> (..., K) float32 targets
    softmax((teacher - center) / teacher_temp), a constant (no gradient into the teacher).
    Centring before sharpening, as DINO's DINOLoss.forward."""
    z = (_f32(teacher) - _f32(center)) / teacher_temp
    return jax.lax.stop_gradient(jax.nn.softmax(z, axis=-1))


_centred = teacher_probs  # the losses' keyword of the same name shadows it inside them


def dino_loss(student: jax.Array, teacher: jax.Array | None, center: jax.Array | None,
              student_temp, teacher_temp, axis_name: str | None = None, *,
              teacher_probs: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """DINO's multi-crop self-distillation loss (facebookresearch/dino main_dino.py,
    DINOLoss.forward).

    student: (b, S, K) the student head's logits of each image's S crops, the G global
      crops first, then the locals; teacher: (b, G, K) the teacher's logits of the
      global crops (teacher crop g is the view of student crop g); center: (K,).
    With p_t = softmax((teacher - center) / teacher_temp) and
    log p_s = log_softmax(student / student_temp), for every pair (g, s) with s != g:
      CE(g, s) = mean over the global batch of sum_k -p_t[i, g, k] log p_s[i, s, k];
    loss = the mean of CE over the G (S - 1) pairs (the same view is never its own target).
    teacher_probs: (b, G, K) targets made elsewhere (sinkhorn_knopp); then teacher,
      center and teacher_temp are not used.

    metrics, float32 scalars over the global batch (collapse shows in them):
      teacher_entropy        the mean entropy of each row of p_t (ln K = uniform)
      teacher_batch_entropy  the entropy of p_t averaged over images and crops
                             (near 0 = every image on the same prototype)
      kl                     the mean over the same pairs of KL(p_t || p_s) = CE - H(p_t)
    """
    b, s, _ = student.shape
    if teacher_probs is None:
        pt = _centred(teacher, center, teacher_temp)
    else:
        pt = jax.lax.stop_gradient(_f32(teacher_probs))
    g = pt.shape[1]
    logps = jax.nn.log_softmax(_f32(student) / student_temp, axis=-1)
    ce = -jnp.einsum("bgk,bsk->bgs", pt, logps, precision=_HI)  # (b, G, S)
    pairs = ~jnp.eye(g, s, dtype=bool)  # (G, S): False where the student crop is the same view
    n_pairs = g * s - g
    loss = _global_mean(jnp.sum(jnp.where(pairs, ce, 0.0)), b * n_pairs, axis_name)
    h = _entropy(pt)  # (b, G)
    kl = _global_mean(jnp.sum(jnp.where(pairs, ce - h[:, :, None], 0.0)), b * n_pairs, axis_name)
    mean_p = _global_mean(jnp.sum(pt, axis=(0, 1)), b * g, axis_name)  # (K,)
    metrics = {"teacher_entropy": _global_mean(jnp.sum(h), b * g, axis_name),
               "teacher_batch_entropy": _entropy(mean_p),
               "kl": jax.lax.stop_gradient(kl)}
    return loss, metrics


def update_center(center: jax.Array, teacher: jax.Array, momentum,
                  axis_name: str | None = None) -> jax.Array:
    """center: (K,); teacher: (b, G, K) (or (n, K)) logits -> (K,) float32
    center * momentum + mean * (1 - momentum), the mean over every row of the global batch
    and its G crops (DINO's update_center: a sum, all_reduce, / the global count)."""
    t = jax.lax.stop_gradient(_f32(teacher))
    t = t.reshape(-1, t.shape[-1])
    mean = _global_mean(jnp.sum(t, axis=0), t.shape[0], axis_name)
    return _f32(center) * momentum + mean * (1 - momentum)


def sinkhorn_knopp(teacher: jax.Array, teacher_temp, iterations: int = 3,
                   axis_name: str | None = None, *, mask: jax.Array | None = None) -> jax.Array:
    """DINOv2's Sinkhorn-Knopp targets (dinov2/loss/dino_clstoken_loss.py,
    DINOLoss.sinkhorn_knopp_teacher), the batch sums taken across all devices.

    teacher: (n, K) this device's rows of logits -> (n, K) float32 targets (constants).
    Q = exp(teacher / temp)^T (K, B) normalised to sum 1 over the global batch; then
    `iterations` times: each prototype's row divided by its global sum and by K; each
    sample's column divided by its sum and by B; finally * B, so that every sample's
    column sums to 1 and (before the last column step) every prototype holds 1/K of the
    mass: prototype sums over the batch come out near B / K.
    mask: (n,) bool, the rows that count (iBOT's masked patches, as
      iBOTPatchLoss.sinkhorn_knopp_teacher with B = the global number of masked patches);
      the other rows get zeros. Default: every row.
    Differences, none in value: exp is taken after subtracting the global max (a
    constant factor, cancelled by the first normalisation; DINOv2 would overflow past
    logits / temp = 88); sums of exactly 0 are floored at 1e-30 (zeros, not NaN).
    """
    x = _f32(jax.lax.stop_gradient(teacher)) / teacher_temp
    n, k = x.shape
    valid = jnp.ones((n,), bool) if mask is None else mask.astype(bool)
    m = jnp.max(jnp.where(valid[:, None], x, -jnp.inf))
    m = m if axis_name is None else jax.lax.pmax(m, axis_name)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # nothing valid anywhere: Q is all zeros
    q = jnp.where(valid[:, None], jnp.exp(x - m), 0.0).T  # (K, n)
    count = _psum(jnp.sum(valid.astype(jnp.float32)), axis_name)  # B
    q = q / jnp.maximum(_psum(jnp.sum(q), axis_name), _TINY)
    def step(_, q):
        rows = _psum(jnp.sum(q, axis=1, keepdims=True), axis_name)  # (K, 1) over all samples
        q = q / jnp.maximum(rows, _TINY) / k
        cols = jnp.sum(q, axis=0, keepdims=True)  # (1, n): each sample is on one device
        return q / jnp.maximum(cols, _TINY) / jnp.maximum(count, 1.0)

    return (jax.lax.fori_loop(0, iterations, step, q) * count).T


def koleo(x: jax.Array, axis_name: str | None = None) -> jax.Array:
    """DINOv2's KoLeo regulariser (dinov2/loss/koleo_loss.py, KoLeoLoss; Sablayrolles
    et al. 2019): x (b, D) the student's class embeddings of one global crop ->
    scalar float32  -mean_i log(||x_i - x_nn(i) + 1e-8|| + 1e-8), on L2-normalised rows
    (eps 1e-8), nn(i) the row of largest dot product other than i itself; the +1e-8 in
    the norm is torch's PairwiseDistance(eps=1e-8), which adds it to the difference.
    DINOv2 searches neighbours in each GPU's batch only, so its value changes with the
    GPU count; here they come from the GLOBAL batch (all_gather over axis_name), so the
    value is the same on any number of devices (and equals DINOv2's on one GPU).
    """
    eps = 1e-8
    x = l2_normalize(x, eps=eps * eps)  # F.normalize(eps=1e-8): x / max(||x||, 1e-8)
    g = _gather(x, axis_name)  # (B, D)
    b = x.shape[0]
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
    dots = jnp.einsum("id,jd->ij", x, g, precision=_HI)  # (b, B)
    is_self = jnp.arange(g.shape[0])[None, :] == (jnp.arange(b) + offset)[:, None]
    nn_index = jnp.argmax(jnp.where(is_self, -jnp.inf, dots), axis=1)
    dist = jnp.linalg.norm(x - g[nn_index] + eps, axis=-1)
    return _global_mean(-jnp.sum(jnp.log(dist + eps)), b, axis_name)


def ibot_patch_loss(student_patches: jax.Array, teacher_patches: jax.Array | None,
                    masks: jax.Array, center: jax.Array | None, student_temp, teacher_temp,
                    axis_name: str | None = None, *,
                    teacher_probs: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """iBOT's masked-patch loss as DINOv2's iBOTPatchLoss.forward_masked
    (dinov2/loss/ibot_patch_loss.py).

    student_patches: (b, N, K) the student head's logits of its (masked) input's patches;
    teacher_patches: (b, N, K) the teacher's, of the whole crop; masks: (b, N) bool,
    True where the student saw the mask token; center: (K,).
    CE(i, n) = sum_k -p_t log_softmax(student / student_temp), p_t as teacher_probs();
      loss = (1 / B) sum_i sum_{n masked in i} CE(i, n) / max(#masked(i), 1),
    B the global number of rows (images with no masked patch count in B, add nothing).
    Unmasked patches do not enter at all. teacher_probs: (b, N, K) targets made
    elsewhere (sinkhorn_knopp with mask=); then teacher_patches, center, teacher_temp
    are unused.
    metrics: masked_fraction (of the global batch's patches), patch_teacher_entropy
    (the mean entropy of p_t over the masked patches).
    """
    b, n, _ = student_patches.shape
    if teacher_probs is None:
        pt = _centred(teacher_patches, center, teacher_temp)
    else:
        pt = jax.lax.stop_gradient(_f32(teacher_probs))
    masks = masks.astype(bool)
    logps = jax.nn.log_softmax(_f32(student_patches) / student_temp, axis=-1)
    ce = -jnp.sum(pt * logps, axis=-1)  # (b, N)
    per_image = jnp.maximum(jnp.sum(masks, axis=1, keepdims=True), 1).astype(jnp.float32)
    loss = _global_mean(jnp.sum(jnp.where(masks, ce / per_image, 0.0)), b, axis_name)
    n_masked = jnp.sum(masks.astype(jnp.float32))
    h = jnp.where(masks, _entropy(pt), 0.0)
    total = _psum(n_masked, axis_name)
    metrics = {"masked_fraction": _global_mean(n_masked, b * n, axis_name),
               "patch_teacher_entropy": _psum(jnp.sum(h), axis_name) / jnp.maximum(total, 1.0)}
    return loss, metrics


def update_patch_center(center: jax.Array, teacher: jax.Array, masks: jax.Array, momentum,
                        axis_name: str | None = None) -> jax.Array:
    """center: (K,); teacher: (b, N, K) patch logits; masks: (b, N) bool -> (K,) float32
    center * momentum + mean * (1 - momentum), the mean of the teacher's logits over
    every masked patch of the global batch (each patch weighs the same).

    DINOv2's iBOTPatchLoss.update_center takes the mean over a GPU's masked patches and
    then the mean of those over GPUs: the same on one GPU; here the patches of the global
    batch weigh alike, so the value does not depend on the device count. With no masked
    patch anywhere the centre is returned unchanged (DINOv2 would average an empty set).
    """
    t = jax.lax.stop_gradient(_f32(teacher))
    masks = masks.astype(bool)
    total = _psum(jnp.sum(jnp.where(masks[..., None], t, 0.0), axis=(0, 1)), axis_name)
    count = _psum(jnp.sum(masks.astype(jnp.float32)), axis_name)
    mean = total / jnp.maximum(count, 1.0)
    new = _f32(center) * momentum + mean * (1 - momentum)
    return jnp.where(count > 0, new, _f32(center))
