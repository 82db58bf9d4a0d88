"""Images of varying size on device: each decoded into the top-left corner of a
fixed square canvas, with its valid height and width beside it.

ImageNet-style datasets hold images of every size. The host decodes each one
(shrunk only when it does not fit the canvas, aspect ratio kept: data/decode.py)
and the device samples the crops of every view from the valid region, exactly
as torchvision's RandomResizedCrop samples them from the whole decoded image --
so the papers' crop distribution (area fraction of the original image, aspect
ratio) is kept, and decoding is the host's only per-image work.

A `Canvas` goes wherever a (B, H, W, C) uint8 batch of images goes (a method's
`views`, the eval view, jigsaw tiles): the crops in views/ops.py take the valid
size from it, and `shape`/`dtype` read like the pixels' for code that only looks.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Canvas:
    """pixels: (..., S, S, C) uint8, zero outside the image; hw: (..., 2) int32, the
    image's valid (height, width), 1 <= hw <= S. Leading axes: batch (or none)."""
    pixels: jax.Array
    hw: jax.Array

    @property
    def shape(self) -> tuple:
        return self.pixels.shape

    @property
    def dtype(self):
        return self.pixels.dtype

    @property
    def ndim(self) -> int:
        return self.pixels.ndim


def images_of(batch: dict):
    """A batch's images: batch["image"] (B, H, W, C), or a Canvas when the batch
    carries "image_hw" (B, 2) (a dataset whose image sizes vary)."""
    if "image_hw" in batch:
        return Canvas(batch["image"], batch["image_hw"])
    return batch["image"]


def split(image):
    """-> (pixels, valid (h, w) as float32 scalars, or None for a plain image)."""
    if isinstance(image, Canvas):
        hw = jnp.asarray(image.hw, jnp.float32)
        return image.pixels, (hw[..., 0], hw[..., 1])
    return image, None
