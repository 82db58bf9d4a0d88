"""The PyTorch peer's views: per image, on the host, with PIL and NumPy, in
DataLoader workers, as VISSL, solo-learn and lightly make them.

Each op follows torchvision's PIL semantics (RandomResizedCrop's 10 tries and
fallback, bilinear resize with PIL's antialiasing, RandomCrop with reflect
padding, ColorJitter's four ops in a random order, RandomGrayscale, PIL's
GaussianBlur as MoCo v2's code uses it, solarize, then ToTensor + Normalize).
torchvision itself is not used: its wheel does not import beside the CPU torch
build here, and these few functions are what its transforms do on a PIL image.
Random numbers come from torch's generator, as torchvision draws them, so every
DataLoader worker has its own stream.

The recipes are not written twice: `item_maker` resolves a run's config with
ssl_jax's own recipe functions (the ones its methods call), so both sides read
the same crop scale, flip, jitter strengths and probabilities, blur, mean, std.

Left as they are (each the PyTorch way, none changes the work per image much):
PIL rounds to uint8 after every op where ssl_jax stays in float32; PIL's
contrast blends towards the integer-rounded mean; PIL's Gaussian blur is its
extended box filter, not ssl_jax's 3-tap kernel (no Fashion-MNIST config blurs).
On 1-channel ("L") images saturation, hue and grayscale change nothing, on both
sides; the peer still calls them, as torchvision would.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch.utils.data import Dataset


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


def _coin(p: float) -> bool:
    """True with probability p; draws nothing when p <= 0 (the op is off)."""
    return p > 0 and torch.rand(()).item() < p


# ---------------------------------------------------------------- geometry

def crop_box(width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, w, h): area ~ U(scale) of the image,
    log-uniform aspect ratio, 10 tries, then the whole image clamped to `ratio`."""
    for _ in range(10):
        area = width * height * _uniform(*scale)
        aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            return left, top, w, h
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(img: Image.Image, size, scale, ratio) -> Image.Image:
    """size: (h, w). One PIL resize of the box: crop + antialiased bilinear."""
    left, top, w, h = crop_box(img.width, img.height, scale, ratio)
    return img.resize((size[1], size[0]), Image.BILINEAR, box=(left, top, left + w, top + h))


def padded_crop(img: Image.Image, pad: int) -> Image.Image:
    """RandomCrop(size of img, padding=pad, padding_mode="reflect")."""
    a = np.asarray(img)
    widths = ((pad, pad), (pad, pad)) + ((0, 0),) * (a.ndim - 2)
    a = np.pad(a, widths, mode="reflect")
    top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
    return Image.fromarray(a[top:top + img.height, left:left + img.width])


# ---------------------------------------------------------------- colour

def adjust_hue(img: Image.Image, delta: float) -> Image.Image:
    """Hue shift through HSV, torchvision's way; grey images have no hue."""
    if img.mode == "L":
        return img
    h, s, v = img.convert("HSV").split()
    h = Image.fromarray((np.asarray(h).astype(np.int16) + round(delta * 255)).astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert(img.mode)


def colour_jitter(img: Image.Image, brightness, contrast, saturation, hue) -> Image.Image:
    """ColorJitter: factors ~ U(max(0, 1 - s), 1 + s), hue ~ U(-h, h), the four
    ops in a random order."""
    ops = []
    if brightness > 0:
        f = _uniform(max(0.0, 1 - brightness), 1 + brightness)
        ops.append(lambda x, f=f: ImageEnhance.Brightness(x).enhance(f))
    if contrast > 0:
        f = _uniform(max(0.0, 1 - contrast), 1 + contrast)
        ops.append(lambda x, f=f: ImageEnhance.Contrast(x).enhance(f))
    if saturation > 0:
        f = _uniform(max(0.0, 1 - saturation), 1 + saturation)
        ops.append(lambda x, f=f: ImageEnhance.Color(x).enhance(f))
    if hue > 0:
        d = _uniform(-hue, hue)
        ops.append(lambda x, d=d: adjust_hue(x, d))
    for i in torch.randperm(len(ops)).tolist():
        img = ops[i](img)
    return img


def to_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    """ToTensor + Normalize: (H, W[, C]) uint8 -> (C, H, W) float32."""
    a = np.asarray(img, np.float32) * (1.0 / 255.0)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    a = (a - mean[:, None, None]) / std[:, None, None]
    return torch.from_numpy(np.ascontiguousarray(a))


class View:
    """One augmented view of a PIL image -> (C, h, w) float32 tensor.

    cfg: a resolved ssl_jax view config (augment.DEFAULTS' fields), as a dict.
    """

    def __init__(self, cfg: dict):
        self.c = dict(cfg)

    def geometry(self, img: Image.Image) -> Image.Image:
        c = self.c
        size = tuple(c["crop_size"])
        if c["crop"] == "resized":
            return random_resized_crop(img, size, c["crop_scale"], c["crop_ratio"])
        if c["crop"] == "padded":
            return padded_crop(img, c["crop_pad"]) if c["crop_pad"] else img
        if c["crop_frac"] != 1.0 or size != (img.height, img.width):   # "center"
            h = max(1, round(img.height * c["crop_frac"]))
            w = max(1, round(img.width * c["crop_frac"]))
            top, left = (img.height - h) // 2, (img.width - w) // 2
            return img.resize((size[1], size[0]), Image.BILINEAR,
                              box=(left, top, left + w, top + h))
        return img

    def appearance(self, img: Image.Image) -> torch.Tensor:
        """Everything after the crop: flip, jitter, grayscale, blur, solarize, normalise."""
        c = self.c
        if _coin(c["flip_p"]):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if _coin(c["jitter_p"]):
            img = colour_jitter(img, c["brightness"], c["contrast"], c["saturation"], c["hue"])
        if _coin(c["grayscale_p"]):
            img = img.convert("L") if img.mode == "L" else img.convert("L").convert(img.mode)
        if _coin(c["blur_p"]):
            img = img.filter(ImageFilter.GaussianBlur(radius=_uniform(*c["blur_sigma"])))
        if _coin(c["solarize_p"]):
            img = ImageOps.solarize(img, math.ceil(c["solarize_threshold"] * 255))
        return to_tensor(img, c["mean"], c["std"])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.appearance(self.geometry(img))


# ---------------------------------------------------------------- per method

class TwoViews:
    """SimCLR, MoCo: img -> (view1, view2), each (C, h, w)."""

    def __init__(self, cfg: dict):
        self.view = View(cfg)

    def __call__(self, img):
        return self.view(img), self.view(img)


class FourRotations:
    """RotNet: one light view, then its four rotations -> ((4, C, h, w),); row k
    is rotated k x 90 degrees counter-clockwise (ssl_jax's order and direction)."""

    def __init__(self, cfg: dict):
        self.view = View(cfg)

    def __call__(self, img):
        x = self.view(img)
        return (torch.stack([torch.rot90(x, k, (1, 2)) for k in range(4)]),)


class ImageAndTiles:
    """PIRL: img -> (image view (C, h, w), 9 shuffled tiles (9, C, t, t)) of an
    independent crop: 3x3 cells, one tile_side tile per cell (random offset
    with tile_jitter), each tile flipped / jittered / normalised on its own,
    shuffled by one of the fixed permutations `perms` (P, 9)."""

    def __init__(self, image_cfg: dict, tile_cfg: dict, perms: np.ndarray):
        self.t, self.perms = dict(tile_cfg), torch.tensor(np.array(perms), dtype=torch.long)
        self.image, self.grid = View(image_cfg), View(self.t)
        size = self.t["tile_size"] or self.t["tile_side"]
        # Tiles are cut exactly: only the ops after the crop run per tile.
        self.tile = View(dict(self.t, crop="center", crop_frac=1.0, crop_size=(size, size)))

    def tiles(self, img) -> torch.Tensor:
        t = self.t
        crop = self.grid.geometry(img)
        cell_h, cell_w = crop.height // 3, crop.width // 3
        side, size = t["tile_side"], t["tile_size"] or t["tile_side"]
        out = []
        for r in range(9):
            if t["tile_jitter"]:
                dy = int(torch.randint(0, cell_h - side + 1, ()))
                dx = int(torch.randint(0, cell_w - side + 1, ()))
            else:
                dy, dx = (cell_h - side) // 2, (cell_w - side) // 2
            y0, x0 = r // 3 * cell_h + dy, r % 3 * cell_w + dx
            tile = crop.crop((x0, y0, x0 + side, y0 + side))
            if size != side:
                tile = tile.resize((size, size), Image.BILINEAR)
            out.append(self.tile.appearance(tile))
        x = torch.stack(out)
        if t["standardize"]:
            x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True).clamp_min(1e-3)
        return x[self.perms[int(torch.randint(0, len(self.perms), ()))]]

    def __call__(self, img):
        return self.image(img), self.tiles(img)


def item_maker(method: str, config):
    """The per-image callable of a method, its recipe resolved by ssl_jax's code.

    ssl_jax is imported here, not at the top: the step-only benchmark's PyTorch
    process then never loads JAX (its peak memory is the peer's own).
    """
    from ssl_jax.methods import pirl, rotnet, simclr
    from ssl_jax.views import augment, jigsaw

    def fields(cfg) -> dict:
        return dict(augment.DEFAULTS, **(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg))
    if method == "simclr":
        return TwoViews(fields(simclr.augment_config(config)))
    if method == "moco":   # methods/moco.py's recipe
        return TwoViews(fields(augment.moco_v2_view_config(**config.aug.to_dict())))
    if method == "rotnet":
        return FourRotations(fields(rotnet.view_config(config)))
    if method == "pirl":
        return ImageAndTiles(fields(pirl.image_view_config(config)),
                             pirl.tile_config(config).to_dict(),
                             # num_permutations 0 (all 9! orders, the preset) costs a
                             # peer what a fixed set does: one shuffle per image.
                             jigsaw.permutations(config.pirl.num_permutations or 1000))
    raise ValueError(f"No PyTorch peer for method {method!r}.")


class Items(Dataset):
    """images: (N, H, W, 1) uint8 -> item i = (*make(PIL image i), i)."""

    def __init__(self, images: np.ndarray, make):
        self.images, self.make = images, make

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        img = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        return (*self.make(img), i)
