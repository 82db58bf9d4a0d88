"""Colour augmentations of one float32 image in [0, 1], (H, W, C) with C = 1 or 3.

torchvision's semantics: multiplicative brightness, contrast towards the mean
grey level, saturation towards the grey image, hue shift in HSV, luma weights
0.299/0.587/0.114. `color_jitter` applies them in a random order per example
(SimCLR's `color_jitter_rand`); for C == 1, saturation, hue and grayscale are
no-ops. Written for XLA:CPU: channel slices instead of reductions over the
channel axis, floor instead of fmod (see the comments at each).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LUMA = (0.299, 0.587, 0.114)


def _gray(image):
    """(H, W, 3) -> (H, W, 1) luma."""
    # Channel slices, not a dot or a sum over the last axis: XLA:CPU runs those
    # ~10x slower than this fused elementwise form (and a dot may go bf16 on TPU).
    return image[..., 0:1] * LUMA[0] + image[..., 1:2] * LUMA[1] + image[..., 2:3] * LUMA[2]


def _blend(a, b, factor):
    return jnp.clip(factor * a + (1.0 - factor) * b, 0.0, 1.0)


def _factor(u, strength):
    """u ~ U(0, 1) -> factor ~ U(max(0, 1 - strength), 1 + strength)."""
    lo = max(0.0, 1.0 - strength)
    return lo + (1.0 + strength - lo) * u


def adjust_brightness(image, factor):
    return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
    # Luma of the mean colour = mean luma (linear), and reducing the image itself
    # is ~5x faster on XLA:CPU than reducing a fused luma image.
    mean = jnp.mean(image, axis=(0, 1), keepdims=True)    # (1, 1, C)
    return _blend(image, _gray(mean) if image.shape[-1] == 3 else mean, factor)


def adjust_saturation(image, factor):
    return _blend(image, _gray(image), factor) if image.shape[-1] == 3 else image


def _frac(x):
    """x mod 1. Not `%`: that lowers to fmod, a scalar libm call on CPU that
    made the hue op ~10x slower than everything else."""
    return x - jnp.floor(x)


def rgb_to_hsv(rgb):
    """(..., 3) in [0, 1] -> (..., 3) hue, saturation, value all in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = jnp.maximum(jnp.maximum(r, g), b)   # elementwise, not max(axis=-1): see _gray
    c = v - jnp.minimum(jnp.minimum(r, g), b)
    safe_c = jnp.where(c > 0, c, 1.0)
    h = jnp.where(v == r, (g - b) / safe_c,
                  jnp.where(v == g, (b - r) / safe_c + 2.0, (r - g) / safe_c + 4.0)) / 6.0
    h = jnp.where(c > 0, _frac(h), 0.0)
    s = jnp.where(v > 0, c / jnp.where(v > 0, v, 1.0), 0.0)
    return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv):
    """Inverse of rgb_to_hsv, branch-free: channel n uses k = (n + 6h) mod 6."""
    h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
    k = 6.0 * _frac((jnp.asarray([5.0, 3.0, 1.0]) + 6.0 * h) / 6.0)
    return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_hue(image, delta):
    """Shifts hue by delta (fraction of the colour circle, in [-0.5, 0.5])."""
    if image.shape[-1] != 3:
        return image
    hsv = rgb_to_hsv(image)
    hsv = hsv.at[..., 0].set(_frac(hsv[..., 0] + delta))
    return jnp.clip(hsv_to_rgb(hsv), 0.0, 1.0)


def color_jitter(rng, image, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, p=0.8):
    """torchvision ColorJitter applied with probability p, ops in random order.

    brightness/contrast/saturation s: factor ~ U(max(0, 1-s), 1+s); hue h: shift
    ~ U(-h, h). Ops with strength 0 are skipped; for C == 1, saturation and hue
    are no-ops. image: (H, W, C) -> (H, W, C).
    """
    u = jax.random.uniform(rng, (9,))   # apply, 4 strengths, 4 sort keys for the order
    ops = []
    if brightness > 0:
        ops.append(lambda x: adjust_brightness(x, _factor(u[1], brightness)))
    if contrast > 0:
        ops.append(lambda x: adjust_contrast(x, _factor(u[2], contrast)))
    if image.shape[-1] == 3 and saturation > 0:
        ops.append(lambda x: adjust_saturation(x, _factor(u[3], saturation)))
    if image.shape[-1] == 3 and hue > 0:
        ops.append(lambda x: adjust_hue(x, hue * (2.0 * u[4] - 1.0)))
    if not ops or p <= 0:
        return image
    out = image
    if len(ops) == 1:
        out = ops[0](out)
    else:
        # Under vmap a traced switch index evaluates every branch: len(ops)^2 op
        # applications per image, cheap next to the network.
        for i in jnp.argsort(u[5:5 + len(ops)]):   # a uniformly random order
            out = jax.lax.switch(i, ops, out)
    return jnp.where(u[0] < p, out, image)


def random_grayscale(rng, image, p: float = 0.2):
    """With probability p, replaces all channels by the luma; no-op for C == 1."""
    if image.shape[-1] != 3 or p <= 0:
        return image
    gray = jnp.broadcast_to(_gray(image), image.shape)
    return jnp.where(jax.random.uniform(rng) < p, gray, image)
