"""Multi-crop views (Caron et al. 2020, SwAV): G global crops at one size and L local
crops at a smaller one from each image, each crop with its own view recipe, made on
device inside the jitted step.

A `Spec` is a tuple of resolution groups. A `Group` is a name ("global", "local"),
one output size and one view config (views/augment.py) per crop: DINO's recipe
differs per crop (blur always on the first global crop, solarisation only on the
second), SimCLR's multi-crop uses one recipe for every crop.

    spec = multicrop.uniform_spec(config.aug, global_crops=2, local_crops=6, local_size=12)
    views = multicrop.make_views(rng, images, spec)        # {"global": (B, 2, 28, 28, C),
                                                           #  "local":  (B, 6, 12, 12, C)}
    out, carry = multicrop.encode_groups(fn, views, carry)  # fn once per group

Every view's leading axis is the image (B): a micro-batch of gradient accumulation
slices it per image, and each image's crops stay on the device that holds the image.
The encoder runs once per resolution group on (B * n, h, w, C), never once per crop
and never on local crops padded up to the global size; a network with batch norm then
normalises each group with that group's own batch statistics (as DINO's and SwAV's
multi-crop wrappers do: one forward per resolution).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ssl_jax.errors import UserError
from ssl_jax.views import augment, pair

# DINO's data augmentation (facebookresearch/dino main_dino.py DataAugmentationDINO),
# the fields every crop shares: flip 0.5; ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8;
# grayscale 0.2; Gaussian blur of radius U(0.1, 2); solarisation at 128 of 255.
DINO_SHARED = dict(crop="resized", flip_p=0.5, brightness=0.4, contrast=0.4, saturation=0.2,
                   hue=0.1, jitter_p=0.8, grayscale_p=0.2, grayscale_first=False,
                   photometric_p=0.0, blur_sigma=(0.1, 2.0), solarize_threshold=0.5)
# The per-crop part: (blur_p, solarize_p) of global crop 1, global crop 2, every local crop.
DINO_GLOBAL_1, DINO_GLOBAL_2, DINO_LOCAL = (1.0, 0.0), (0.1, 0.2), (0.5, 0.0)


@dataclasses.dataclass(frozen=True)
class Group:
    """name: the views' key; size: (h, w) of every crop; recipes: one view config
    (a dict of views/augment.py fields, crop size included) per crop."""
    name: str
    size: tuple[int, int]
    recipes: tuple[dict, ...]

    @property
    def crops(self) -> int:
        return len(self.recipes)


Spec = tuple  # of Group, the global one first
GROUPS = ("global", "local")  # the groups' names, in the order of a spec


def _pair(x, what: str) -> tuple[int, int]:
    x = (x, x) if isinstance(x, int) else tuple(x)
    if len(x) != 2 or not all(isinstance(v, int) and v > 0 for v in x):
        raise UserError(f"multi-crop {what}={x!r}: give a positive size in pixels (e.g. 12) "
                        "or (h, w).")
    return x


def _check_counts(global_crops, local_crops) -> None:
    for name, n, least in (("global_crops", global_crops, 1), ("local_crops", local_crops, 0)):
        if isinstance(n, bool) or not isinstance(n, int) or n < least:
            fix = ("set it to 1 or more (2: two full-size views, as SimCLR's)" if least
                   else "set it to 0 (no local crops) or more")
            raise UserError(f"multi-crop {name}={n!r} (config.multicrop.{name}): {fix}.")


def _spec(global_size, local_size, global_recipes, local_recipes) -> Spec:
    g = _pair(global_size, "global_size")
    l = _pair(local_size, "local_size") if local_recipes else None
    if l and (l[0] > g[0] or l[1] > g[1]):
        raise UserError(f"multi-crop local crops of {l[0]}x{l[1]} are larger than the global "
                        f"crops of {g[0]}x{g[1]}: set local_size (config.multicrop.local_size) "
                        "to at most the global size (DINO: 96 for 224, about 3/7 of it).")
    groups = [Group("global", g, tuple(dict(r, crop_size=g) for r in global_recipes))]
    if local_recipes:
        groups.append(Group("local", l, tuple(dict(r, crop_size=l) for r in local_recipes)))
    return tuple(groups)


def _fields(aug) -> dict:
    aug = aug.to_dict() if hasattr(aug, "to_dict") else dict(aug)
    unknown = sorted(set(aug) - set(augment.DEFAULTS))
    if unknown:
        raise UserError(f"unknown view config field(s) {unknown} in the multi-crop base recipe.")
    return dict(augment.DEFAULTS, **aug)


def dino_spec(base_aug, global_crops: int = 2, local_crops: int = 0, global_size=224,
              local_size=96, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)) -> Spec:
    """DINO's multi-crop: base_aug (a view config: the data's mean/std, crop_ratio,
    blur_kernel, ...) with DINO's shared recipe (DINO_SHARED) on top, then per crop:
    global crop 1 blur p 1.0; global crop 2 blur p 0.1 and solarisation p 0.2 (further
    global crops alternate the two); local crops blur p 0.5; crop scales global_scale
    / local_scale (DINO's ImageNet defaults)."""
    _check_counts(global_crops, local_crops)
    shared = dict(_fields(base_aug), **DINO_SHARED)

    def recipe(blur_solarize, scale):
        return dict(shared, blur_p=blur_solarize[0], solarize_p=blur_solarize[1],
                    crop_scale=tuple(scale))
    globals_ = [recipe((DINO_GLOBAL_1, DINO_GLOBAL_2)[i % 2], global_scale)
                for i in range(global_crops)]
    locals_ = [recipe(DINO_LOCAL, local_scale) for _ in range(local_crops)]
    return _spec(global_size, local_size, globals_, locals_)


def uniform_spec(aug, global_crops: int = 2, local_crops: int = 0, global_size=None,
                 local_size=None, global_scale=None, local_scale=(0.05, 0.14)) -> Spec:
    """The same recipe `aug` (a view config) for every crop; only the size and crop
    scale differ by group (SwAV's multi-crop for SimCLR). global_size / global_scale:
    aug's crop_size / crop_scale when None; local_size is required with local crops."""
    _check_counts(global_crops, local_crops)
    base = _fields(aug)
    if local_crops and local_size is None:
        raise UserError("multi-crop local_crops > 0 needs local_size (e.g. 96 for 224-pixel "
                        "global crops).")
    g_scale = tuple(base["crop_scale"] if global_scale is None else global_scale)
    globals_ = [dict(base, crop="resized", crop_scale=g_scale)] * global_crops
    locals_ = [dict(base, crop="resized", crop_scale=tuple(local_scale))] * local_crops
    return _spec(base["crop_size"] if global_size is None else global_size,
                 local_size, globals_, locals_)


def make_views(rng, images, spec: Spec) -> dict:
    """images: (B, H, W, C) uint8, or a canvas.Canvas of B images of varying size
    -> {group.name: (B, n, h, w, C) float32}, crop k of a group made by
    augment.batch_views with its own key and its own recipe. "local" is absent
    when there are no local crops."""
    if isinstance(images, pair.Pair):
        raise UserError("multi-crop takes crops of one image per example, and video positives "
                        "(config.video.positives) bring two: use positives=frame, or no "
                        "multi-crop (local_crops=0).")
    if not spec or spec[0].crops < 1:
        raise UserError("multi-crop needs at least one global crop: set global_crops to 1 or "
                        "more.")
    keys = iter(jax.random.split(rng, crops_per_image(spec)))  # one per crop, in spec order
    return {group.name: jnp.stack([augment.batch_views(next(keys), images, recipe)
                                   for recipe in group.recipes], axis=1)
            for group in spec}


def encode_groups(fn, groups: dict, carry=None):
    """Runs fn once per resolution group.

    fn(x, carry) -> (out, carry): x (B * n, h, w, C), image b's n crops in rows
    b * n .. b * n + n - 1 (so with the batch sharded over devices, each device's
    rows stay on it); out: a pytree of (B * n, ...) arrays; carry: what threads
    through the calls in order (a network's BN statistics), or None.
    groups: {name: (B, n, h, w, C)} -> ({name: out with leaves (B, n, ...)}, carry).
    """
    outs = {}
    for name, x in groups.items():
        b, n = x.shape[:2]
        out, carry = fn(x.reshape((b * n,) + x.shape[2:]), carry)
        outs[name] = jax.tree.map(lambda y: y.reshape((b, n) + y.shape[1:]), out)
    return outs, carry


def crops_per_image(spec: Spec) -> int:
    return sum(g.crops for g in spec)
