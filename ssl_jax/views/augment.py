"""Views: per-example augmentations composed from a view config, made on device
inside the jitted train step.

A view config (SimCLR's, MoCo v2's, NPID's, PIRL's, the eval view, or any
config.aug) says which ops of views/ops.py, views/colour.py and
views/photometric.py run, with which probability and strength; `view` applies
them to one image and `batch_views` vmaps it over per-example keys. The config
is static: an op whose probability is 0 is not traced at all.

Order: crop, flip, [grayscale if grayscale_first], colour jitter, photometric,
[grayscale], blur, solarize, normalise. Flips commute with every later op, so
where a reference flips last (torchvision pipelines) the result is the same.

Colour ops follow torchvision's semantics (multiplicative brightness, contrast
towards the mean grey level, saturation towards the grey image, hue shift in
HSV, luma weights 0.299/0.587/0.114), in a random order per example like
SimCLR's `color_jitter_rand` (colour.py). For C == 1 images saturation, hue and
grayscale are no-ops; brightness and contrast still apply.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax.config import nearest_keys
from ssl_jax.errors import UserError
from ssl_jax.views import canvas
from ssl_jax.views.colour import color_jitter, random_grayscale
from ssl_jax.views.ops import (center_crop_resize, gaussian_blur, normalize,
                               random_crop_with_padding, random_flip,
                               random_resized_crop, resize_random_crop, solarize)
from ssl_jax.views.photometric import random_photometric

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- recipes

DEFAULTS = dict(
    # "resized" (Inception crop), "padded" (CIFAR crop), "center" (eval),
    # "resize_crop" (torchvision Resize(resize) + RandomCrop(crop_size))
    crop="resized",
    crop_size=(224, 224),    # output (h, w) of "resized" / "center"; "padded" keeps the input size
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    crop_pad=4,              # "padded" only
    crop_pad_mode="reflect", # "padded" only: "reflect", or "zero" (torchvision's RandomCrop padding)
    crop_frac=1.0,           # "center" only: fraction of each side kept before resizing
    resize=256,              # "resize_crop" only: the shorter side before the random crop
    flip_p=0.5,
    # The recipes below tie brightness/contrast/saturation/hue to jitter_strength
    # (SimCLR's s); view() itself reads only the four fields.
    jitter_strength=1.0,
    brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
    jitter_p=0.8,
    grayscale_p=0.2,
    grayscale_first=False,   # grayscale before the jitter (NPID's ImageNet pipeline) or after
    photometric_p=0.0,       # PIRL's posterize/sharpness/solarize/autocontrast (photometric.py)
    blur_p=0.5,
    blur_sigma=(0.1, 2.0),
    blur_kernel=0,           # 0: about 10% of the crop side
    solarize_p=0.0,
    solarize_threshold=0.5,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
)


def _recipe(fields, jitter_scale, overrides):
    cfg = ml_collections.ConfigDict(dict(DEFAULTS, **fields))
    # The four jitter fields follow jitter_strength (also when it is overridden on
    # the command line) unless they are set themselves.
    s = cfg.get_ref("jitter_strength")
    b, c, sat, h = jitter_scale
    cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue = s * b, s * c, s * sat, s * h
    for key, value in overrides.items():
        if key not in cfg:
            raise UserError(f"unknown view config field {key!r}.{nearest_keys(key, cfg.keys())}")
        cfg[key] = value
    return cfg


def simclr_view_config(**overrides) -> ml_collections.ConfigDict:
    """SimCLR (Chen et al. 2020): crop (0.08, 1), flip 0.5, jitter p 0.8 with
    strength s=1 -> (0.8s, 0.8s, 0.8s, 0.2s), grayscale 0.2, blur p 0.5 sigma (0.1, 2)."""
    return _recipe(dict(jitter_strength=1.0), (0.8, 0.8, 0.8, 0.2), overrides)


def moco_v2_view_config(**overrides) -> ml_collections.ConfigDict:
    """MoCo v2 (Chen et al. 2020b): crop (0.2, 1), jitter p 0.8 with
    (0.4, 0.4, 0.4, 0.1) (= SimCLR's at s=0.5), grayscale 0.2, blur p 0.5
    sigma (0.1, 2), flip 0.5."""
    return _recipe(dict(crop_scale=(0.2, 1.0), jitter_strength=0.5), (0.8, 0.8, 0.8, 0.2),
                   overrides)


def npid_view_config(**overrides) -> ml_collections.ConfigDict:
    """NPID (Wu et al. 2018; lemniscate.pytorch main.py): crop (0.2, 1), grayscale 0.2,
    then ColorJitter(0.4, 0.4, 0.4, 0.4) always (p 1), flip 0.5; no blur."""
    return _recipe(dict(crop_scale=(0.2, 1.0), jitter_strength=1.0, jitter_p=1.0,
                        grayscale_first=True, blur_p=0.0), (0.4, 0.4, 0.4, 0.4), overrides)


def pirl_view_config(**overrides) -> ml_collections.ConfigDict:
    """PIRL's image (Misra & van der Maaten 2020; VISSL pirl_jigsaw_4node_resnet50.yaml):
    crop (0.08, 1), ColorJitter(0.4, 0.4, 0.4, 0.2) always (p 1), the photometric
    distortion with p 0.66, grayscale 0.2, flip 0.5; no blur."""
    return _recipe(dict(jitter_strength=1.0, jitter_p=1.0, photometric_p=0.66, blur_p=0.0),
                   (0.4, 0.4, 0.4, 0.2), overrides)


def eval_view_config(**overrides) -> ml_collections.ConfigDict:
    """Deterministic view for evaluation: center crop (crop_frac, crop_size) and
    normalise only."""
    return _recipe(dict(crop="center", flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                        blur_p=0.0, solarize_p=0.0), (0.8, 0.8, 0.8, 0.2), overrides)


def _fields(cfg) -> dict:
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    unknown = [k for k in cfg if k not in DEFAULTS]
    if unknown:
        raise UserError(f"unknown view config field(s) {unknown}.{nearest_keys(unknown[0], DEFAULTS)}")
    return dict(DEFAULTS, **cfg)


def view(rng, image, cfg):
    """One augmented view of one example.

    image: (H, W, C) or (H, W) uint8 (or float in [0, 1]), or a canvas.Canvas
    (pixels (S, S, C), hw (2,): an image of varying size, cropped from its valid
    region) -> (h, w, C) float32, normalised with cfg.mean / cfg.std. cfg: a view
    config (ConfigDict or dict); missing fields take DEFAULTS.
    """
    c = _fields(cfg)
    image, hw = canvas.split(image)
    x = image.astype(jnp.float32)
    if image.dtype == jnp.uint8:
        x = x / 255.0
    if x.ndim == 2:
        x = x[..., None]
    # One key per op, always the same split, so switching one op on or off does
    # not change the randomness of the others (the photometric key is folded in
    # beside the split, which so stays what it was before that op existed).
    k_crop, k_flip, k_jit, k_gray, k_blur, k_sol = jax.random.split(rng, 6)
    k_photo = jax.random.fold_in(rng, 6)
    out_size = tuple(c["crop_size"])
    if c["crop"] == "resized":
        x = random_resized_crop(k_crop, x, out_size, c["crop_scale"], c["crop_ratio"], hw)
    elif c["crop"] == "resize_crop":
        x = resize_random_crop(k_crop, x, out_size, c["resize"], hw)
    elif c["crop"] == "padded":
        if hw is not None:
            raise UserError("crop='padded' (the CIFAR crop) keeps the input's size, and this "
                            "dataset's images vary in size: use crop='resized' (set "
                            "--config.aug.crop=resized and crop_scale).")
        x = (random_crop_with_padding(k_crop, x, c["crop_pad"], c["crop_pad_mode"])
             if c["crop_pad"] else x)
    elif c["crop"] == "center":
        if hw is not None or c["crop_frac"] != 1.0 or out_size != x.shape[:2]:
            x = center_crop_resize(x, out_size, c["crop_frac"], hw)
    else:
        raise UserError(f"crop must be 'resized', 'resize_crop', 'padded' or 'center', "
                        f"got {c['crop']!r}")
    if c["flip_p"] > 0:
        x = random_flip(k_flip, x, c["flip_p"])
    if c["grayscale_first"]:
        x = random_grayscale(k_gray, x, c["grayscale_p"])
    x = color_jitter(k_jit, x, c["brightness"], c["contrast"], c["saturation"], c["hue"],
                     c["jitter_p"])
    x = random_photometric(k_photo, x, c["photometric_p"])
    if not c["grayscale_first"]:
        x = random_grayscale(k_gray, x, c["grayscale_p"])
    x = gaussian_blur(k_blur, x, c["blur_sigma"], c["blur_kernel"] or None, c["blur_p"])
    x = solarize(k_sol, x, c["solarize_threshold"], c["solarize_p"])
    return normalize(x, c["mean"], c["std"])


def batch_views(rng, images, cfg):
    """One view per example: images (B, H, W, C) or (B, H, W) uint8, or a
    canvas.Canvas of B images -> (B, h, w, C) float32, each example with its own
    key from split(rng, B)."""
    keys = jax.random.split(rng, images.shape[0])
    return jax.vmap(lambda k, x: view(k, x, cfg))(keys, images)
