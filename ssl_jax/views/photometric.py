"""PIRL's photometric distortion (VISSL ImgPilRandomPhotometric) on one float32
image in [0, 1], (H, W, C), C = 1 or 3.

With probability p the image goes through all four, in this order, each with its
own random strength (vissl/data/ssl_transforms/pil_photometric_transforms_lib.py):

  posterize     keep the top b bits of each 8-bit value, b uniform in {4, ..., 8}
  sharpness     PIL ImageEnhance.Sharpness, factor uniform in [0.1, 1.9]
  solarize      invert the 8-bit values >= t, t uniform in {0, ..., 256}
  autocontrast  stretch each channel's [min, max] to [0, 1]

PIL's semantics, on floats: the values are not rounded to 8 bits between ops
(posterize and solarize round only to decide; they keep the float's precision
otherwise), so results match PIL's to within a rounding step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def posterize(image, bits):
    """Keeps the top `bits` (4..8, may be traced) of each 8-bit value."""
    v = jnp.floor(image * 255.0 + 0.5)
    step = 2.0 ** (8 - bits)
    return (v - jnp.mod(v, step)) / 255.0


def _smooth(image):
    """PIL's ImageFilter.SMOOTH (3x3, centre 5, others 1, / 13) with the 1-pixel
    border left as it was, as PIL (and torchvision's adjust_sharpness) do."""
    h, w, _ = image.shape
    x = image
    inner = sum(x[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    inner = (inner + 4.0 * x[1:h - 1, 1:w - 1]) / 13.0
    return x.at[1:h - 1, 1:w - 1].set(inner)


def sharpness(image, factor):
    """factor 1: the image; 0: PIL's smoothed image; > 1 sharper. Clipped to [0, 1]."""
    if min(image.shape[:2]) < 3:
        return image
    degenerate = _smooth(image)
    return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 1.0)


def solarize_at(image, threshold):
    """Inverts the pixels whose 8-bit value is >= threshold (0..256, may be traced)."""
    return jnp.where(jnp.floor(image * 255.0 + 0.5) >= threshold, 1.0 - image, image)


def autocontrast(image):
    """Each channel's [min, max] stretched to [0, 1]; a flat channel is left as it is."""
    lo = jnp.min(image, axis=(0, 1), keepdims=True)
    hi = jnp.max(image, axis=(0, 1), keepdims=True)
    span = hi - lo
    return jnp.where(span > 0, (image - lo) / jnp.where(span > 0, span, 1.0), image)


def random_photometric(rng, image, p: float = 0.66):
    """With probability p: posterize, sharpness, solarize, autocontrast (module docstring)."""
    if p <= 0:
        return image
    k_apply, k_bits, k_sharp, k_sol = jax.random.split(rng, 4)
    x = posterize(image, jax.random.randint(k_bits, (), 4, 9).astype(jnp.float32))
    x = sharpness(x, jax.random.uniform(k_sharp, (), minval=0.1, maxval=1.9))
    x = solarize_at(x, jax.random.randint(k_sol, (), 0, 257).astype(jnp.float32))
    x = autocontrast(x)
    return jnp.where(jax.random.uniform(k_apply) < p, x, image)
