"""Host-side decoding of datasets whose images vary in size (ImageNet, a folder
of photos): what the host does to each encoded image before batching.

Two policies, both picklable (grain worker processes run them):

- `ToCanvas(size)`, for training: the whole image, decoded into the top-left
  corner of a (size, size) canvas, its valid (h, w) beside it. An image that does
  not fit is shrunk to fit, aspect ratio kept, a JPEG by DCT scaling while it
  decodes (`Image.draft`: 1/2, 1/4, 1/8) where that is enough. The device then
  samples every view's crop from the valid region (views/canvas.py), so the crop
  distribution is the papers' (area fraction of the original image, aspect
  ratio) and decoding is the host's only per-image work. Pick `size` so that most
  images fit (ImageNet: 512 holds the common 500x375 whole).
- `CenterCrop(size, crop_fraction)`, for evaluation: the papers' protocol, the
  shorter side resized to size / crop_fraction (256 for 224 at 0.875), then the
  central (size, size) crop; done as one PIL resize of the crop box.

    pixels, (h, w) = ToCanvas(512)(jpeg_bytes, channels=3)  # (512, 512, 3), h, w <= 512
    crop, _ = CenterCrop(224)(jpeg_bytes, channels=3)        # (224, 224, 3)
    batch, hw = ToCanvas(512).decode_batch([jpeg, ...], 3)   # (b, 512, 512, 3), (b, 2)
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

_MODES = {1: "L", 3: "RGB"}


def _open(data: bytes) -> Image.Image:
    """Reads the header only: size and format, nothing decoded yet."""
    return Image.open(io.BytesIO(data))


def _decode(im: Image.Image, channels: int, at_least: tuple[int, int] | None) -> Image.Image:
    """An opened image -> decoded in `channels`' mode (greyscale, CMYK, palette and
    alpha images converted); a JPEG at the smallest DCT scale whose size stays >=
    at_least (w, h), when given."""
    if channels not in _MODES:
        raise ValueError(f"images with {channels} channels cannot be decoded; use 1 or 3")
    if at_least is not None and im.format == "JPEG":
        im.draft(_MODES[channels], at_least)
    if im.mode != _MODES[channels]:
        im = im.convert(_MODES[channels])
    return im


def _array(im: Image.Image, channels: int) -> np.ndarray:
    out = np.asarray(im, np.uint8)
    return out.reshape(out.shape[:2] + (channels,))


@dataclasses.dataclass(frozen=True)
class ToCanvas:
    """Encoded image -> ((size, size, C) uint8, zero outside the image, (h, w))."""
    size: int

    def decoded_bytes(self, channels: int) -> int:
        """Bytes per decoded image (pixels and valid size)."""
        return self.size * self.size * channels + 8

    def __call__(self, data: bytes, channels: int) -> tuple[np.ndarray, tuple[int, int]]:
        canvas = np.empty((self.size, self.size, channels), np.uint8)
        return canvas, self.into(data, channels, canvas)

    def decode_batch(self, datas: list[bytes], channels: int,
                     alloc=np.empty) -> tuple[np.ndarray, np.ndarray]:
        """b encoded images -> ((b, size, size, C) uint8, hw (b, 2) int32), decoded straight
        into one buffer, alloc(shape, dtype) (a worker's shared-memory slot:
        data/shm_slots.py): no canvas an image and no stacking, whose fresh 0.8 MB
        arrays cost a third of the host's time per image at 512 (benchmarks/RESULTS.md)."""
        out = alloc((len(datas), self.size, self.size, channels), np.uint8)
        hw = [self.into(d, channels, canvas) for d, canvas in zip(datas, out)]
        return out, np.array(hw, np.int32).reshape(len(datas), 2)

    def into(self, data: bytes, channels: int, canvas: np.ndarray) -> tuple[int, int]:
        """Decodes onto canvas (size, size, C) uint8, every pixel written (zero outside
        the image) -> the image's (h, w)."""
        im = _open(data)
        w, h = im.size
        scale = min(1.0, self.size / max(w, h))
        fit = (min(self.size, max(1, round(w * scale))), min(self.size, max(1, round(h * scale))))
        im = _decode(im, channels, fit if scale < 1.0 else None)
        if im.size != fit:  # antialiased: PIL's bilinear widens its support when shrinking
            im = im.resize(fit, Image.BILINEAR)
        w, h = fit
        canvas[:h, :w] = _array(im, channels)
        canvas[h:] = 0
        canvas[:h, w:] = 0
        return h, w


@dataclasses.dataclass(frozen=True)
class CenterCrop:
    """Encoded image -> ((size, size, C) uint8, None): the central square
    of crop_fraction of the shorter side, resized to size (shorter side to
    size / crop_fraction, then the central crop)."""
    size: int
    crop_fraction: float = 0.875

    def decoded_bytes(self, channels: int) -> int:
        return self.size * self.size * channels + 8

    def __call__(self, data: bytes, channels: int) -> tuple[np.ndarray, None]:
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction={self.crop_fraction} must be in (0, 1]")
        im = _open(data)
        w, h = im.size
        side = min(w, h) * self.crop_fraction  # the crop, in the original's pixels
        shrink = side / self.size
        # DCT scaling keeps at least `size` pixels across the crop.
        at_least = (max(1, int(w / shrink)), max(1, int(h / shrink))) if shrink >= 2 else None
        im = _decode(im, channels, at_least)
        k = im.size[0] / w  # the draft's scale (1 without one)
        left, top = (w - side) / 2 * k, (h - side) / 2 * k
        box = (left, top, left + side * k, top + side * k)
        im = im.resize((self.size, self.size), Image.BILINEAR, box=box)
        return _array(im, channels), None

    def decode_batch(self, datas: list[bytes], channels: int,
                     alloc=np.empty) -> tuple[np.ndarray, None]:
        """b encoded images -> ((b, size, size, C) uint8 from alloc(shape, dtype), None)."""
        out = alloc((len(datas), self.size, self.size, channels), np.uint8)
        for data, crop in zip(datas, out):
            crop[...] = self(data, channels)[0]
        return out, None


def for_training(config) -> ToCanvas:
    """Training's policy: whole images onto config.data.canvas (checked by the
    setup layer, experiment.canvas_size)."""
    return ToCanvas(config.data.get("canvas", 512))


def eval_crop_size(config) -> tuple[int, ...]:
    """The eval view's (H, W): config.eval.crop_size, default the training crop
    (config.aug.crop_size). The one statement of that rule: the eval view
    (eval/features.py) and the eval decode policy both read it here."""
    return tuple(config.get("eval", {}).get("crop_size") or config.aug.crop_size)


def for_eval(config) -> CenterCrop:
    """Evaluation's: the centre crop at the eval view's size (eval_crop_size),
    config.eval.crop_fraction of the shorter side."""
    return CenterCrop(int(max(eval_crop_size(config))),
                      config.eval.get("crop_fraction", 0.875))
