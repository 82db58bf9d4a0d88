"""Small ImageNet-layout archives and image folders, written at test time.

    info = make_ilsvrc(manual_dir)          # ILSVRC2012_img_{train,val}.tar + validation_labels.txt
    info = make_image_folder(folder)        # folder/{train,val}/<class>/*.{jpg,png}

Each class is a colour and a stripe pattern (orientation and frequency) under
noise, at a random size (150-600 px, aspect 0.5-2): a linear probe on raw
pixels or simple features tells the classes apart, so a pipeline that mixes up
labels shows. As in the real archive, a few images are greyscale JPEGs, a few
CMYK JPEGs and one a PNG under a .JPEG name; tar members are written in a
shuffled order (preparation must sort them).
"""
from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Mapping

import numpy as np
from PIL import Image

from ssl_jax.datasets import imagenet


def class_image(rng: np.random.Generator, label: int, num_classes: int) -> Image.Image:
    """An RGB image of class `label`: its hue and stripes, plus noise."""
    w = int(rng.integers(150, 601))
    h = int(np.clip(w / rng.uniform(0.5, 2.0), 150, 600))
    # Drawn at 1/4 size and upscaled: fast.
    sh, sw = max(h // 4, 8), max(w // 4, 8)
    angle = np.pi * label / num_classes
    freq = 0.15 + 0.35 * (label % 3) / 2
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32)
    stripes = np.sin(freq * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 6.3))
    hue = np.array([np.cos(2 * np.pi * (label / num_classes + k / 3)) for k in range(3)])
    image = 128 + 60 * hue * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 20, (sh, sw, 3))
    small = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return small.resize((w, h), Image.NEAREST)  # 10x faster than BILINEAR upscaling here


def encode(image: Image.Image | np.ndarray, kind: str = "rgb") -> bytes:
    """JPEG bytes (quality 90) of an RGB image as `kind`: rgb, grey, cmyk, or png (PNG bytes)."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    if kind == "png":
        pil.save(buf, format="PNG")
    else:
        pil = {"rgb": pil, "grey": pil.convert("L"), "cmyk": pil.convert("CMYK")}[kind]
        pil.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tar_bytes(files: Mapping[str, bytes], order: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in order:
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


def make_ilsvrc(manual_dir, *, synsets: int = 10, train_per_class: int = 30, val: int = 100,
                seed: int = 0, edit: Mapping[str, Callable[[bytes], bytes]] | None = None
                ) -> dict:
    """Writes a small ILSVRC2012 archive in manual_dir.

    The first `synsets` synsets of TFDS's labels.txt, train_per_class JPEGs
    each (<synset>_<k>.JPEG in <synset>.tar in ILSVRC2012_img_train.tar), `val`
    images ILSVRC2012_val_<8 digits>.JPEG in ILSVRC2012_img_val.tar, and a
    validation_labels.txt for them. edit: {file name: f(bytes) -> bytes} to
    damage chosen images. Returns {"synsets", "train": {file: synset}, "val":
    {file: synset}, "grey", "cmyk", "png": [file names], "rgb": {file: the
    (h, w, 3) image before encoding, for the cmyk and png ones}, "data": {file:
    the bytes written}}.
    """
    rng = np.random.default_rng(seed)
    names = imagenet.label_names()[:synsets]
    os.makedirs(manual_dir, exist_ok=True)
    kinds = {}  # file name -> special kind
    train = {f"{s}_{k + 1}.JPEG": s for s in names for k in range(train_per_class)}
    val_files = [f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(val)]
    val_labels = {f: names[int(rng.integers(synsets))] for f in val_files}
    tr = sorted(train)
    for f in tr[3::max(len(tr) // 3, 1)][:3]:
        kinds[f] = "grey"
    kinds[tr[1]] = kinds[tr[-2]] = "cmyk"
    kinds[tr[len(tr) // 2 + 1]] = "png"
    if val_files:
        kinds[val_files[2 % val]] = "cmyk"
        kinds[val_files[5 % val]] = "grey"
    rgb, data = {}, {}
    for f, s in {**train, **val_labels}.items():
        image = class_image(rng, names.index(s), synsets)
        data[f] = encode(image, kinds.get(f, "rgb"))
        if kinds.get(f) in ("cmyk", "png"):
            rgb[f] = np.asarray(image)
        if edit and f in edit:
            data[f] = edit[f](data[f])
    inner = {}
    for s in names:
        files = [f for f in train if train[f] == s]
        inner[f"{s}.tar"] = _tar_bytes(data, list(rng.permutation(files)))
    with open(os.path.join(manual_dir, imagenet.TRAIN_TAR), "wb") as out:
        out.write(_tar_bytes(inner, list(rng.permutation(list(inner)))))
    with open(os.path.join(manual_dir, imagenet.VAL_TAR), "wb") as out:
        out.write(_tar_bytes(data, list(rng.permutation(val_files))))
    with open(os.path.join(manual_dir, imagenet.VAL_LABELS), "w") as out:
        out.write("".join(val_labels[f] + "\n" for f in sorted(val_files)))
    return {"synsets": names, "train": train, "val": val_labels,
            "grey": sorted(f for f, k in kinds.items() if k == "grey"),
            "cmyk": sorted(f for f, k in kinds.items() if k == "cmyk"),
            "png": sorted(f for f, k in kinds.items() if k == "png"), "rgb": rgb,
            "data": data}


def make_image_folder(folder, *, classes=("cat", "dog", "eel"), train_per_class: int = 6,
                      val_per_class: int = 2, seed: int = 0, splits: bool = True) -> dict:
    """Writes folder/train/<class>/<k>.jpg (+ folder/val/...), or folder/<class>/... with
    splits=False; every third image is a PNG. Returns {"classes": sorted,
    "train": {relative path: class}, "val": {...}}."""
    rng = np.random.default_rng(seed)
    out = {"classes": sorted(classes), "train": {}, "val": {}}
    counts = {"train": train_per_class, "val": val_per_class if splits else 0}
    for split, n in counts.items():
        for c in classes:
            base = os.path.join(folder, split, c) if splits else os.path.join(folder, c)
            os.makedirs(base, exist_ok=True)
            for k in range(n):
                ext = "png" if k % 3 == 2 else "jpg"
                image = class_image(rng, sorted(classes).index(c), len(classes))
                with open(os.path.join(base, f"{k:04d}.{ext}"), "wb") as f:
                    f.write(encode(image, "png" if ext == "png" else "rgb"))
                out[split][f"{c}/{k:04d}.{ext}"] = c
    return out
