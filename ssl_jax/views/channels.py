"""Colour-space views of an image: CMC's L and ab channels of CIE Lab (Tian, Krishnan &
Isola, "Contrastive Multiview Coding", 2019; HobbitLong/CMC dataset.py `RGB2Lab`,
train_CMC.py `get_train_loader`).

    lab = rgb_to_lab(rgb)                 # (..., 3) in [0, 1] -> L in [0, 100], a, b
    x = normalize_lab(lab)                # CMC's per-channel constants: each in [-1, 1]
    l, ab = split_lab(x)                  # (..., 1), (..., 2)

rgb_to_lab is scikit-image's `color.rgb2lab` (what RGB2Lab calls), written in jnp so that
it runs on device after the augmentation: sRGB's gamma undone, linear RGB -> XYZ (sRGB
primaries, D65), XYZ / the D65 white of the 2-degree observer, then CIE's cube root with
its linear segment near black.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# skimage.color.colorconv: xyz_from_rgb (sRGB, D65) and the D65 2-degree white point.
XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                (0.212671, 0.715160, 0.072169),
                (0.019334, 0.119193, 0.950227))
WHITE_D65 = (0.95047, 1.0, 1.08883)

# train_CMC.py get_train_loader, view 'Lab': the mid-point and half-range of each
# channel's values over the sRGB gamut (L in [0, 100], a in [-86.183, 98.233], b in
# [-107.857, 94.478]), so every channel lands in [-1, 1].
LAB_MEAN = ((0 + 100) / 2, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
LAB_STD = ((100 - 0) / 2, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)


def _linear_rgb(rgb: jax.Array) -> jax.Array:
    """sRGB's transfer function undone (IEC 61966-2-1), as skimage's rgb2xyz."""
    # The power of the clipped value: the branch jnp.where discards still runs, and a
    # negative base would put NaN there.
    curve = ((jnp.maximum(rgb, 0.04045) + 0.055) / 1.055) ** 2.4
    return jnp.where(rgb > 0.04045, curve, rgb / 12.92)


def _f(t: jax.Array) -> jax.Array:
    """CIE's f: the cube root above (6/29)^3, its tangent line 7.787 t + 16/116 below."""
    return jnp.where(t > 0.008856, jnp.cbrt(t), 7.787 * t + 16.0 / 116.0)


def rgb_to_lab(rgb: jax.Array) -> jax.Array:
    """rgb: (..., 3) sRGB in [0, 1] (clipped to it) -> (..., 3) float32 CIE Lab: L in
    [0, 100], a in about [-86, 98], b in about [-108, 94]; skimage.color.rgb2lab with its
    defaults (illuminant D65, observer 2 degrees)."""
    rgb = jnp.clip(rgb.astype(jnp.float32), 0.0, 1.0)
    # HIGHEST: a TPU would round the float32 matmul's inputs to bfloat16 (~3 bits of L).
    xyz = jnp.einsum("...c,kc->...k", _linear_rgb(rgb), jnp.asarray(XYZ_FROM_RGB),
                     precision=jax.lax.Precision.HIGHEST)
    fx, fy, fz = jnp.moveaxis(_f(xyz / jnp.asarray(WHITE_D65)), -1, 0)
    return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def normalize_lab(lab: jax.Array) -> jax.Array:
    """(..., 3) Lab -> (..., 3) (lab - LAB_MEAN) / LAB_STD, CMC's normalisation."""
    return (lab - jnp.asarray(LAB_MEAN)) / jnp.asarray(LAB_STD)


def split_lab(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(..., 3) -> (L (..., 1), ab (..., 2)): train_CMC's `torch.split(x, [1, 2], dim=1)`
    on the channels-last layout."""
    return x[..., :1], x[..., 1:]
