"""The transformations of the invariance sets (datasets/invariance_sets.py), as pure functions.

Purushwalkam & Gupta, "Demystifying Contrastive Self-Supervised Learning"
(2020), measure how much an encoder's features stay put when one image is
occluded, seen from another viewpoint or under other light. Each function here
turns one image into such a set:

    frames, strengths = occlusion_frames(image, rng, set_size)

image: (H, W, C) uint8, C in {1, 3}; rng: a numpy Generator, the only source
of randomness (the same draws give the same frames, byte for byte); frames:
(set_size, H, W, C) uint8, frame 0 the image itself and the transformation
growing with the frame index; strengths: (set_size,) float32, how strongly each
frame is transformed (0 for frame 0). Every random parameter is drawn before
the image is looked at, so one rng state gives every image the same
parameters (tests use this to know the direction of a gradient).
Host-side NumPy and PIL (bilinear warps), no JAX.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

OBJECT_THRESHOLD = 16  # a pixel brighter than this (any channel) is part of the object
MAX_OCCLUSION = 0.6  # the last frame's occluded fraction of the object's box
MAX_OCCLUDERS = 3  # rectangles per set: 1 to this many
MAX_ROTATION = 45.0  # degrees, in-plane, reached by the last frame
MAX_TILT = 50.0  # degrees the object turns about a vertical or horizontal axis
SCALE_RANGE = (0.7, 1.2)  # the last frame's scale, drawn per set
CAMERA_DISTANCE = 2.0  # in image sizes: how strong the perspective of a tilt is
MAX_GRADIENT = 0.8  # last frame: gain 1 +- 0.8 from the dark to the bright side
MAX_INTENSITY = 1.5  # last frame: global gain in [1/1.5, 1.5]
MAX_COLOUR = 1.25  # last frame (RGB): per-channel gains in [1/1.25, 1.25], mean 1


def _check(image: np.ndarray, set_size: int) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W, 1|3) uint8 image, got {image.shape} {image.dtype}")
    if set_size < 1:
        raise ValueError(f"set_size={set_size} must be >= 1")


def ramp(set_size: int) -> np.ndarray:
    """(set_size,) float64: each frame's share of the full transformation, 0 -> 1."""
    return np.linspace(0.0, 1.0, set_size) if set_size > 1 else np.zeros(1)


def object_box(image: np.ndarray, threshold: int = OBJECT_THRESHOLD) -> tuple[int, int, int, int]:
    """(top, left, bottom, right), bottom/right exclusive: the bounding box of the pixels
    above `threshold` (Fashion-MNIST: the garment on black), or the whole image if none."""
    rows, cols = np.nonzero(image.max(axis=-1) > threshold)
    if not len(rows):
        return 0, 0, image.shape[0], image.shape[1]
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def occluder_entry(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(h, w) float64: for each pixel of a box of `shape`, the size sigma at which random
    rectangles growing about fixed centres first cover it; the occluders of size sigma
    are the pixels whose entry is below sigma, so bigger occluders hold the smaller.

    1 to MAX_OCCLUDERS rectangles, centres uniform in the box, aspect ratios in [1/2, 2]
    and relative sizes in [1/2, 1]: at sigma = 1 the largest spans about the box.
    """
    count = int(rng.integers(1, MAX_OCCLUDERS + 1))
    # Drawn for every rectangle there may be, so that rng moves the same for any count.
    centre = rng.uniform(0.0, 1.0, (2, MAX_OCCLUDERS))[:, :count]
    aspect = np.exp(rng.uniform(-np.log(2.0), np.log(2.0), MAX_OCCLUDERS))[:count]
    size = rng.uniform(0.5, 1.0, MAX_OCCLUDERS)[:count]
    h, w = shape
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5  # pixel centres
    # Pixel (y, x) is in rectangle i of size sigma when |y - cy| < sigma ry and |x - cx| < sigma rx.
    dy = np.abs(ys[:, None] - centre[0] * h) / (size * np.sqrt(aspect) * h / 2)  # (h, count)
    dx = np.abs(xs[:, None] - centre[1] * w) / (size / np.sqrt(aspect) * w / 2)  # (w, count)
    return np.maximum(dy[:, None, :], dx[None, :, :]).min(axis=-1)


def occlusion_frames(image: np.ndarray, rng: np.random.Generator,
                     set_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image under growing occluders -> frames (set_size, H, W, C) uint8, strengths
    (set_size,) float32: the fraction of the object's box actually covered.

    Random rectangles inside the object's box (object_box) grow about fixed centres
    until they cover a target fraction growing linearly from 0 to MAX_OCCLUSION, so a
    frame's occluders hold the previous frame's. Pixels enter a row or column of a
    rectangle at a time: each frame takes the size whose coverage is nearest its target.
    """
    _check(image, set_size)
    top, left, bottom, right = object_box(image)
    # The draws do not depend on the image: its box only scales the rectangles.
    entry = occluder_entry((bottom - top, right - left), rng).ravel()
    order = np.sort(entry)
    # Fill: a flat patch of the image's mean colour, not noise. It adds no texture and
    # no edges but its outline and keeps the image's mean, so the frames differ by the
    # object content they hide; noise would add high-frequency texture, which moves
    # features by itself and confounds occlusion with a texture change.
    fill = np.round(image.reshape(-1, image.shape[-1]).mean(axis=0)).astype(np.uint8)
    frames = np.repeat(image[None], set_size, axis=0)
    strengths = np.zeros(set_size, np.float32)
    for t, s in enumerate(ramp(set_size)):
        target = int(round(s * MAX_OCCLUSION * entry.size))
        if target == 0:
            continue
        edge = order[target - 1]  # pixels tied with it enter together (a rectangle's row)
        over, under = entry <= edge, entry < edge
        mask = over if over.sum() - target <= target - under.sum() else under
        frames[t, top:bottom, left:right][mask.reshape(bottom - top, right - left)] = fill
        strengths[t] = mask.mean()
    return frames, strengths


def border_value(image: np.ndarray) -> np.ndarray:
    """(C,) uint8: the per-channel median of the image's outermost pixels (0 on black)."""
    edge = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(edge, axis=0).astype(np.uint8)


def homography(h: int, w: int, *, angle: float, scale: float, tilt: float,
               axis: int) -> np.ndarray:
    """(3, 3): input pixel coordinates -> output ones, about the image centre: scale, then
    rotate in-plane by `angle` degrees, then turn the (planar) object by `tilt` degrees
    about the vertical (axis 0) or horizontal (axis 1) axis, seen by a pinhole camera
    CAMERA_DISTANCE image sizes away whose focal length keeps the centre's scale."""
    a, t = np.deg2rad(angle), np.deg2rad(tilt)
    d = CAMERA_DISTANCE * max(h, w)
    centre = np.array([[1, 0, w / 2], [0, 1, h / 2], [0, 0, 1]])
    uncentre = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]])
    rotate = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    zoom = np.diag([scale, scale, 1.0])
    # A point (x, y, 0) turned about the y axis is at x cos t, depth x sin t; projected
    # at focal length d from distance d: (x cos t, y) / (1 + x sin t / d).
    if axis == 0:
        turn = np.array([[np.cos(t), 0, 0], [0, 1, 0], [np.sin(t) / d, 0, 1]])
    else:
        turn = np.array([[1, 0, 0], [0, np.cos(t), 0], [0, np.sin(t) / d, 1]])
    return centre @ turn @ rotate @ zoom @ uncentre


def warp(image: np.ndarray, forward: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """image (H, W, C) uint8 seen through the homography `forward` (input -> output
    pixel coordinates), bilinear, `fill` (C,) outside it -> (H, W, C) uint8."""
    h, w, c = image.shape
    inverse = np.linalg.inv(forward)  # PIL maps each output pixel back to the input
    inverse = inverse / inverse[2, 2]
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    out = pil.transform((w, h), Image.Transform.PERSPECTIVE, tuple(inverse.ravel()[:8]),
                        Image.Resampling.BILINEAR,
                        fillcolor=int(fill[0]) if c == 1 else tuple(int(v) for v in fill))
    return np.asarray(out, np.uint8).reshape(h, w, c)


def viewpoint_frames(image: np.ndarray, rng: np.random.Generator,
                     set_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A proxy for viewpoint change: one image rotated in-plane (0 -> +-MAX_ROTATION),
    scaled (1 -> a scale drawn in SCALE_RANGE) and turned in depth (0 -> +-MAX_TILT
    about a vertical or horizontal axis), composed; the background shown is the image's
    border value. -> frames (set_size, H, W, C) uint8, strengths (set_size,) float32:
    each frame's share of the set's full warp, 0 -> 1."""
    _check(image, set_size)
    rotation = float(rng.choice([-1.0, 1.0])) * MAX_ROTATION
    scale = float(rng.uniform(*SCALE_RANGE))
    tilt = float(rng.choice([-1.0, 1.0])) * MAX_TILT
    axis = int(rng.integers(2))
    h, w, _ = image.shape
    fill = border_value(image)
    frames = np.repeat(image[None], set_size, axis=0)
    steps = ramp(set_size)
    for t, s in enumerate(steps):
        if t:  # frame 0 stays the image itself, not an identity resampling of it
            frames[t] = warp(image, homography(h, w, angle=s * rotation,
                                               scale=1 + s * (scale - 1), tilt=s * tilt,
                                               axis=axis), fill)
    return frames, steps.astype(np.float32)


def illumination_frames(image: np.ndarray, rng: np.random.Generator,
                        set_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image under changing light: a linear brightness gradient in a direction drawn
    per set (gain 1 +- s * MAX_GRADIENT from one side to the other), times a global
    intensity gain (1 -> [1/MAX_INTENSITY, MAX_INTENSITY]) and, for RGB, per-channel
    gains (1 -> [1/MAX_COLOUR, MAX_COLOUR], geometric mean 1); clipped to [0, 255].
    -> frames (set_size, H, W, C) uint8, strengths (set_size,) float32: s, 0 -> 1."""
    _check(image, set_size)
    direction = rng.uniform(0.0, 2 * np.pi)
    intensity = np.exp(rng.uniform(-np.log(MAX_INTENSITY), np.log(MAX_INTENSITY)))
    colour = rng.uniform(-np.log(MAX_COLOUR), np.log(MAX_COLOUR), 3)  # log gains
    colour -= colour.mean()  # a colour shift only; brightness is `intensity`'s
    h, w, c = image.shape
    y, x = np.mgrid[0:h, 0:w] + 0.5
    along = (x - w / 2) * np.cos(direction) + (y - h / 2) * np.sin(direction)
    along /= max(np.abs(along).max(), 1e-6)  # -1 (dark side) .. 1 (bright side)
    frames = np.repeat(image[None], set_size, axis=0)
    steps = ramp(set_size)
    for t, s in enumerate(steps):
        if t:
            gain = (1 + s * MAX_GRADIENT * along)[..., None] * intensity ** s
            if c == 3:
                gain = gain * np.exp(s * colour)
            frames[t] = np.clip(np.round(image * gain), 0, 255).astype(np.uint8)
    return frames, steps.astype(np.float32)
