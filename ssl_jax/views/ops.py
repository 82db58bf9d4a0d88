"""Per-image augmentation ops: pure functions `op(rng, image, ...) -> image` on one
float32 image in [0, 1] of shape (H, W, C); views/augment.py composes them into
views and vmaps them over a batch.

"Apply with probability p" is a `jnp.where` on a uniform draw, so every op vmaps
and jits with static shapes. Geometry (crops, resizes, padded crops) is done as
two small matmuls with per-example (out x in) interpolation matrices,
`My @ image @ Mx^T`: exact, shape-static and far cheaper under vmap than
per-pixel gathers.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ssl_jax.errors import UserError

_HIGHEST = jax.lax.Precision.HIGHEST  # TPUs would otherwise multiply f32 pixels in bf16


# ---------------------------------------------------------------- geometry

def _resample(image, my, mx):
    """image: (H, W, C); my: (h, H); mx: (w, W) -> (h, w, C)."""
    out = jnp.einsum("oh,hwc->owc", my, image, precision=_HIGHEST)
    return jnp.einsum("pw,owc->opc", mx, out, precision=_HIGHEST)


def _interp_matrix(start, length, n_in: int, n_out: int):
    """(n_out, n_in) weights resizing the window [start, start+length) to n_out pixels.

    Antialiased bilinear (PIL-style triangle filter widened by the downscale
    factor), pixel centres at i + 0.5, weights renormalised inside the window so
    the border is replicated rather than mixed with pixels outside the crop.
    """
    scale = length / n_out
    centre = start + (jnp.arange(n_out) + 0.5) * scale - 0.5      # (n_out,)
    inv_support = 1.0 / jnp.maximum(scale, 1.0)
    i = jnp.arange(n_in, dtype=jnp.float32)
    w = jnp.maximum(0.0, 1.0 - jnp.abs(i[None, :] - centre[:, None]) * inv_support)
    w = jnp.where((i >= start) & (i < start + length), w, 0.0)
    return w * (1.0 / jnp.sum(w, axis=1, keepdims=True))


def crop_resize(image, box, out_size: tuple[int, int]):
    """Crops box = (y0, x0, h, w) (may be traced) and resizes it to out_size.

    image: (H, W, C) float32 -> (out_h, out_w, C) float32.
    """
    H, W, _ = image.shape
    y0, x0, h, w = box
    my = _interp_matrix(y0, h, H, out_size[0])
    mx = _interp_matrix(x0, w, W, out_size[1])
    return _resample(image, my, mx)


def center_crop_resize(image, out_size: tuple[int, int], crop_frac: float = 1.0, hw=None):
    """Deterministic eval view: central crop of crop_frac of each side, resized.

    With crop_frac=1 and out_size == (H, W) it is the identity. hw: the valid
    (h, w) of a canvas image (views/canvas.py), traced; the crop is then the
    central square of side crop_frac * min(h, w) of the valid region (resize the
    shorter side, centre crop: aspect ratio kept).
    """
    if hw is not None:
        side = jnp.maximum(1.0, jnp.round(jnp.minimum(*hw) * crop_frac))
        box = ((hw[0] - side) // 2, (hw[1] - side) // 2, side, side)
        return crop_resize(image, box, out_size)
    H, W, _ = image.shape
    h, w = max(1, round(H * crop_frac)), max(1, round(W * crop_frac))
    return crop_resize(image, ((H - h) // 2, (W - w) // 2, h, w), out_size)


def _sample_box(rng, H, W, scale, ratio, tries: int = 10):
    """torchvision RandomResizedCrop.get_params, vectorised over `tries` draws.

    H, W: the image's size, Python ints or traced scalars (a canvas image's
    valid size). Returns (y0, x0, h, w), float32 scalars holding integers.
    """
    # One draw for everything: each threefry call is a large graph, and many
    # small ones dominated both compile time and run time.
    u = jax.random.uniform(rng, (2, tries + 1))
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[0, :tries])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(lo + (hi - lo) * u[1, :tries])
    ws = jnp.round(jnp.sqrt(area * aspect))
    hs = jnp.round(jnp.sqrt(area / aspect))
    ok = (ws > 0) & (ws <= W) & (hs > 0) & (hs <= H)
    first = jnp.argmax(ok)
    # Fallback as torchvision: the whole image, clamped to the allowed ratios.
    in_ratio = W / H
    fw = jnp.where(in_ratio > ratio[1], jnp.round(H * ratio[1]), W)
    fh = jnp.where(in_ratio < ratio[0], jnp.round(W / ratio[0]), H)
    w = jnp.where(ok.any(), ws[first], fw)
    h = jnp.where(ok.any(), hs[first], fh)
    y0 = jnp.floor(u[0, tries] * (H - h + 1))
    x0 = jnp.floor(u[1, tries] * (W - w + 1))
    y0 = jnp.where(ok.any(), jnp.minimum(y0, H - h), (H - h) // 2)
    x0 = jnp.where(ok.any(), jnp.minimum(x0, W - w), (W - w) // 2)
    return y0, x0, h, w


def random_resized_crop(rng, image, out_size: tuple[int, int],
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hw=None):
    """Inception-style crop: area fraction ~ U(scale), aspect ratio log-uniform in
    ratio, integer box inside the image (10 tries, then torchvision's fallback),
    resized (antialiased bilinear) to out_size. hw: the valid (h, w) of a canvas
    image (views/canvas.py), traced: the box is drawn inside it, as from the
    whole decoded image.

    image: (H, W, C) float32 -> (out_h, out_w, C) float32.
    """
    H, W = image.shape[:2] if hw is None else hw
    return crop_resize(image, _sample_box(rng, H, W, scale, ratio), out_size)


def resize_random_crop(rng, image, out_size: tuple[int, int], resize: int, hw=None):
    """torchvision's Resize(resize) then RandomCrop(out_size): the shorter side scaled
    to `resize` (aspect kept), a window of out_size at a uniformly random integer
    position in the scaled image. Computed as one resize of the matching box of the
    original: out_size * min(h, w) / resize pixels of it. hw: a canvas image's valid
    (h, w) (views/canvas.py), traced.

    image: (H, W, C) float32 -> (out_h, out_w, C) float32.
    """
    if resize < max(out_size):
        raise UserError(f"resize={resize} is smaller than the crop {tuple(out_size)}: "
                        "RandomCrop would not fit.")
    H, W = image.shape[:2] if hw is None else hw
    shorter = jnp.minimum(jnp.asarray(H, jnp.float32), jnp.asarray(W, jnp.float32))
    scale = resize / shorter                      # original pixels -> resized pixels
    u = jax.random.uniform(rng, (2,))
    box = []
    for side, n, ui in ((H, out_size[0], u[0]), (W, out_size[1], u[1])):
        # torchvision's int(resize * long / short); + 1e-3 keeps the short side's 256.
        room = jnp.maximum(jnp.floor(side * scale + 1e-3) - n, 0.0)
        box.append(jnp.floor(ui * (room + 1)) / scale)
    return crop_resize(image, (box[0], box[1], out_size[0] / scale, out_size[1] / scale),
                       out_size)


def _index_matrix(src, n_in: int):
    """(n, n_in) one-hot rows selecting src[i]; out-of-range rows are all zero."""
    return (src[:, None] == jnp.arange(n_in)[None, :]).astype(jnp.float32)


def random_crop_with_padding(rng, image, pad: int, mode: str = "reflect"):
    """CIFAR-style: pad each side by `pad` (reflect or zero), take a random
    (H, W) window. image: (H, W, C) -> (H, W, C)."""
    if mode not in ("reflect", "zero"):
        raise UserError(f"mode must be 'reflect' or 'zero', got {mode!r}")
    H, W, _ = image.shape
    if mode == "reflect" and pad >= min(H, W):
        raise UserError(f"reflect padding needs pad < image side, got pad={pad}, image {H}x{W}")
    dy, dx = jax.random.randint(rng, (2,), 0, 2 * pad + 1) - pad

    def rows(n, d):
        src = jnp.arange(n) + d
        if mode == "reflect":   # padded index -> source index, mirrored without repeating the edge
            src = jnp.abs(src)
            src = jnp.where(src > n - 1, 2 * (n - 1) - src, src)
        return _index_matrix(src, n)

    return _resample(image, rows(H, dy), rows(W, dx))


def random_flip(rng, image, p: float = 0.5):
    """Horizontal flip with probability p. image: (H, W, C)."""
    return jnp.where(jax.random.uniform(rng) < p, image[:, ::-1], image)


def rotate90(image, k):
    """Rotates a square image by k * 90 degrees counter-clockwise; k may be traced.

    image: (H, H, C) -> (H, H, C).
    """
    if image.shape[0] != image.shape[1]:
        raise ValueError(f"rotate90 needs a square image to keep a static shape, got {image.shape}")
    branches = [lambda x, k=k_: jnp.rot90(x, k, axes=(0, 1)) for k_ in range(4)]
    return jax.lax.switch(jnp.asarray(k) % 4, branches, image)


def blur_kernel_size(side: int) -> int:
    """SimCLR's rule: an odd kernel of about 10% of the image side (>= 3)."""
    return max(3, 2 * (side // 10 // 2) + 1)


def gaussian_blur(rng, image, sigma=(0.1, 2.0), kernel_size: int | None = None, p: float = 0.5):
    """Separable Gaussian blur, sigma ~ U(sigma) in pixels, with probability p.

    kernel_size is static (default: blur_kernel_size(min(H, W))); borders are
    reflected, so a constant image stays constant. image: (H, W, C) -> (H, W, C).
    """
    if p <= 0:
        return image
    H, W, _ = image.shape
    k = kernel_size or blur_kernel_size(min(H, W))
    r = k // 2
    if k % 2 == 0 or r >= min(H, W):
        raise UserError(f"kernel_size must be odd and below the image side, got {k} for {H}x{W}")
    u = jax.random.uniform(rng, (2,))
    s = sigma[0] + (sigma[1] - sigma[0]) * u[1]
    taps = jnp.exp(-0.5 * (jnp.arange(-r, r + 1) / s) ** 2)
    taps = taps / jnp.sum(taps)
    # Shift-and-add over static slices of a reflect-padded image: no gathers, fuses.
    x = jnp.pad(image, ((r, r), (0, 0), (0, 0)), mode="reflect")
    out = sum(taps[i] * x[i:i + H] for i in range(k))
    x = jnp.pad(out, ((0, 0), (r, r), (0, 0)), mode="reflect")
    out = sum(taps[i] * x[:, i:i + W] for i in range(k))
    return jnp.where(u[0] < p, out, image)


def solarize(rng, image, threshold: float = 0.5, p: float = 0.2):
    """With probability p, inverts pixels >= threshold (x -> 1 - x)."""
    if p <= 0:
        return image
    out = jnp.where(image >= threshold, 1.0 - image, image)
    return jnp.where(jax.random.uniform(rng) < p, out, image)


def normalize(image, mean, std):
    """(image - mean) / std per channel; mean/std of length C or 1."""
    for name, v in (("mean", mean), ("std", std)):
        if jnp.size(jnp.asarray(v)) not in (1, image.shape[-1]):
            raise UserError(f"{name} has {jnp.size(jnp.asarray(v))} values for a {image.shape[-1]}-channel "
                             f"image: set the view config's mean/std for this dataset")
    return (image - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
