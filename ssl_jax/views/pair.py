"""Positive pairs that come from the data: two images per example instead of one.

Two-view methods (SimCLR, MoCo) usually make both views from one image. With
video positives (Purushwalkam & Gupta 2020; data/video_pairs.py) the data
brings the pair -- two frames of one video, or the same tracked object in two
frames -- and each view is made from its own image, with the method's
augmentation on device as usual:

    images = pair.images_of(batch)      # a Pair when the batch carries "key_image"
    first, second = pair.sources(images)  # (query image, key image), or (x, x)
    v1 = augment.batch_views(r1, first, cfg); v2 = augment.batch_views(r2, second, cfg)

A `Pair` goes where a batch of images goes in a method's `views` and `init`;
code that needs one image per example (an online probe) takes `first`.
"""
from __future__ import annotations

import dataclasses

import jax

from ssl_jax.views import canvas


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pair:
    """query, key: (B, H, W, C) uint8 each (or canvas.Canvas): example i's two images."""
    query: object
    key: object

    @property
    def shape(self) -> tuple:
        return self.query.shape

    @property
    def dtype(self):
        return self.query.dtype


def images_of(batch: dict):
    """A batch's images: canvas.images_of(batch), or a Pair of it and the batch's
    "key_image" (with "key_image_hw" for canvases) when the data brings the positives."""
    query = canvas.images_of(batch)
    if "key_image" not in batch:
        return query
    key = {"image": batch["key_image"]}
    if "key_image_hw" in batch:
        key["image_hw"] = batch["key_image_hw"]
    return Pair(query, canvas.images_of(key))


def sources(images) -> tuple:
    """-> (the images the first view is made from, the second's): a Pair's query and key,
    else the same images twice (two views of one image)."""
    if isinstance(images, Pair):
        return images.query, images.key
    return images, images


def first(images):
    """One image per example: a Pair's query, else the images themselves."""
    return images.query if isinstance(images, Pair) else images
