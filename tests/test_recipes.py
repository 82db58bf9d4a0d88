"""The presets are the recipes RECIPES.md says they are, and the behaviours the
recipe audit fixed stay fixed.

RECIPES.md has one table per method x dataset preset. Every row whose config
cell names a field and whose "ours" cell starts with a Python literal is checked
against the loaded preset; every row marked "same" must have that literal as its
reference value too. Editing a preset without its row (or the reverse) fails here.
"""
from __future__ import annotations

import ast
import itertools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from ssl_jax import optim
from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec
from ssl_jax.methods import jigsaw as jigsaw_method
from ssl_jax.methods import moco, network, pirl, rotnet, simclr
from ssl_jax.views import augment, canvas, jigsaw, ops, photometric

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("simclr", "moco", "npid", "pirl", "jigsaw", "rotnet", "dino", "supervised",
           "polyview", "cmc")
DATASETS = ("fashion_mnist", "cifar10", "imagenet2012")
KEY = jax.random.key(0)

pytestmark = pytest.mark.usefixtures("fast_prng")  # conftest.py


# ---------------------------------------------------------------- RECIPES.md's tables

def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _literal(cell: str):
    """The cell's first `backticked` Python literal, or None (prose, a field name)."""
    m = re.match(r"`([^`]+)`", cell)
    if not m:
        return None
    try:
        return ast.literal_eval(m[1])
    except (ValueError, SyntaxError):
        return None


def tables() -> dict[str, list[list[str]]]:
    """{config spec ('configs/simclr.py:dataset=cifar10'): [row cells, ...]} of RECIPES.md."""
    out, spec = {}, None
    with open(os.path.join(ROOT, "RECIPES.md")) as f:
        for line in f:
            if line.startswith("#"):
                m = re.search(r"`(configs/\w+\.py:dataset=\w+)`", line)
                spec = m[1] if m and line.startswith("### ") else None
                if spec:
                    out[spec] = []
            elif spec and line.startswith("|") and not re.match(r"\|\s*-", line):
                cells = _cells(line)
                if cells[0] != "setting":
                    out[spec].append(cells)
    return out


def resolve(c, key: str):
    """A field of the preset: a dotted config path; `view.F` (the method's image view
    with its recipe's defaults filled in); `tiles.F` (its tile view); `bn_groups`."""
    if key == "bn_groups":
        return c.model.get("bn_groups", 1)
    if key.startswith("view."):
        return _view(c)[key[5:]]
    if key.startswith("tiles."):
        cfg = pirl.tile_config(c) if c.method == "pirl" else jigsaw_method.tile_config(c)
        return cfg[key[6:]]
    node = c
    for part in key.split("."):
        node = node[part]
    return node


def _view(c) -> dict:
    if c.method == "simclr":
        cfg = simclr.augment_config(c)
    elif c.method == "moco":
        cfg = augment.moco_v2_view_config(**c.aug.to_dict())
    elif c.method in ("npid", "pirl"):
        cfg = pirl.image_view_config(c)
    elif c.method == "rotnet":
        cfg = rotnet.view_config(c)
    else:
        cfg = c.aug
    return dict(augment.DEFAULTS, **(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg))


def _equal(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-3)
    return a == b


def test_every_preset_has_a_table():
    have = tables()
    want = {f"configs/{m}.py:dataset={d}" for m in METHODS for d in DATASETS}
    assert want <= set(have), sorted(want - set(have))


@pytest.mark.parametrize("spec", [f"configs/{m}.py:dataset={d}"
                                  for m in METHODS for d in DATASETS])
def test_table_rows_are_the_preset(spec):
    rows = tables()[spec]
    c = load_file(spec)
    checked = 0
    for row in rows:
        assert len(row) == 5, (spec, row)
        setting, field, reference, ours, status = row
        key = re.fullmatch(r"`([\w.]+)`", field)
        value = _literal(ours)
        if not key or value is None:
            continue
        got = resolve(c, key[1])
        assert _equal(got, value), f"{spec} {setting}: RECIPES.md says {value!r}, preset has {got!r}"
        if status == "same":
            ref = _literal(reference)
            assert ref is not None and _equal(ref, value), \
                f"{spec} {setting}: 'same', but the reference is {reference!r}"
        checked += 1
    # The papers' presets pin their numbers; ours (Fashion-MNIST, the supervised
    # reference) at least say what they are.
    ours = "fashion_mnist" in spec or "supervised" in spec
    assert checked >= (5 if ours else 10), (spec, checked)


# ---------------------------------------------------------------- heads

def _params(method, config, x):
    params, state = method.init(KEY, {"view1": x, "query": x, "key": x}, config,
                                DataSpec(num_examples=64, image_shape=x.shape[1:]))
    return params, state


def test_moco_head_is_linear_relu_linear_without_bn():
    c = load_file("configs/moco.py:runlocal")
    c.model.widths, c.model.conv = (4, 8), "xla"
    c.moco.update(queue_size=64, bn_groups=4)
    params, state = _params(moco.METHOD, c, jnp.zeros((8, 8, 8, 1)))
    head = jax.tree.map(jnp.shape, params["head"])
    assert head == {"Dense_0": {"kernel": (8, 64), "bias": (64,)},
                    "Dense_1": {"kernel": (64, 32), "bias": (32,)}}
    assert "head" not in state["batch_stats"]


def test_simclr_head_normalises_every_layer_the_output_without_a_shift():
    c = load_file("configs/simclr.py:runlocal")
    c.model.widths, c.model.conv = (4, 8), "xla"
    params, state = _params(simclr.METHOD, c, jnp.zeros((8, 8, 8, 1)))
    head = jax.tree.map(jnp.shape, params["head"])
    assert head == {"Dense_0": {"kernel": (8, 64)}, "BatchNorm_0": {"scale": (64,), "bias": (64,)},
                    "Dense_1": {"kernel": (64, 32)}, "out_bn": {"scale": (32,)}}
    assert set(state["batch_stats"]["head"]) == {"BatchNorm_0", "out_bn"}
    # The output BN normalises over the batch: the projections' per-dimension
    # batch mean is 0 (no shift) in training.
    x = jax.random.normal(KEY, (8, 8, 8, 1))
    _, z, _ = network.apply(simclr._net(c), params, state["batch_stats"], x)
    np.testing.assert_allclose(np.asarray(z).mean(0), 0.0, atol=1e-5)


def test_decay_mask_follows_each_methods_flags():
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 4))}, "bn": {"scale": jnp.ones(4),
              "bias": jnp.ones(4)}, "dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
              "out_bn": {"scale": jnp.ones(2)}}
    for bn, bias in itertools.product((False, True), repeat=2):
        m = optim.decay_mask(params, decay_bn=bn, decay_bias=bias)
        assert m == {"conv": {"kernel": True}, "bn": {"scale": bn, "bias": bn},
                     "dense": {"kernel": True, "bias": bias}, "out_bn": {"scale": bn}}
    # Through the optimizer: SGD's decay moves a BN scale only when asked.
    for flag in (False, True):
        cfg = load_file("configs/moco.py:dataset=cifar10").optimizer
        cfg.update(decay_bn=flag, decay_bias=flag)
        tx = optim.make_optimizer(cfg, lambda step: 1.0)
        zero = jax.tree.map(jnp.zeros_like, params)
        upd, _ = tx.update(zero, tx.init(params), params)
        assert bool(jnp.any(upd["bn"]["scale"] != 0)) is flag
        assert bool(jnp.any(upd["dense"]["bias"] != 0)) is flag
        assert bool(jnp.all(upd["conv"]["kernel"] != 0))


# ---------------------------------------------------------------- views

def _landscape_canvas(n, h=48, w=64, size=64):
    """n copies of one 4:3 (h, w) RGB image with distinct pixels, on size x size canvases."""
    rng = np.random.default_rng(0)
    pix = np.zeros((n, size, size, 3), np.uint8)
    pix[:, :h, :w] = rng.integers(0, 256, (h, w, 3))
    return canvas.Canvas(jnp.asarray(pix), jnp.asarray([[h, w]] * n, jnp.int32))


def test_rotnet_imagenet_crop_varies_on_a_4_3_image():
    """The old fixed-area, fixed-ratio crop failed on every try for any image wider
    than ~1.31:1 and fell back to one centre square: flips were all that varied."""
    c = load_file("configs/rotnet.py:dataset=imagenet2012")
    c.aug.update(crop_size=(16, 16))
    images = _landscape_canvas(8)
    v = np.asarray(jax.jit(lambda r, x: rotnet.views(r, x, c))(KEY, images)["image"])
    upright = v[::rotnet.NUM_ROTATIONS]                       # (8, 16, 16, 3), k = 0
    canon = [min(x.tobytes(), x[:, ::-1].tobytes()) for x in upright]   # a flip is not a new crop
    assert len(set(canon)) == len(canon)


def test_resize_crop_is_torchvisions_resize_then_random_crop():
    """Resize(24) + RandomCrop(21) of a 48x64 image: a 42x42 window of the original
    (21 x 48/24) at a random position, resized to 21; a horizontal ramp shows it."""
    h, w = 48, 64
    ramp = np.broadcast_to(np.arange(w, dtype=np.float32)[None, :, None], (h, w, 1)) / 255.0
    pix = np.zeros((64, 64, 1), np.float32)
    pix[:h, :w] = ramp
    hw = (jnp.float32(h), jnp.float32(w))
    crops = np.asarray(jax.jit(jax.vmap(lambda k: ops.resize_random_crop(
        k, jnp.asarray(pix), (21, 21), 24, hw)))(jax.random.split(KEY, 32))) * 255.0
    mid = crops[:, 10, 5:16, 0]                               # interior columns: exact
    np.testing.assert_allclose(np.diff(mid, axis=1), 2.0, atol=1e-3)   # 42 px over 21
    x0 = crops[:, 10, 10, 0] - 2.0 * 10.5 + 0.5               # left edge of the window
    np.testing.assert_allclose(x0, np.round(x0 / 2) * 2, atol=1e-3)    # whole resized pixels
    assert x0.min() >= 0 and x0.max() <= w - 42 and len(set(np.round(x0))) > 5


def _cells_image(c=1):
    """A 24x24 image whose 3x3 cells of 8 px hold the grey levels 10, 20, ..., 90."""
    img = np.repeat(np.repeat(np.arange(1, 10).reshape(3, 3) * 10, 8, 0), 8, 1)
    return np.repeat(img[..., None], c, -1).astype(np.uint8)


def test_pirl_draws_tile_orders_from_all_9_factorial():
    c = load_file("configs/pirl.py:runlocal")
    assert c.pirl.num_permutations == 0                       # the preset's: all 9!
    c.aug.update(crop_size=(24, 24))
    c.pirl.tiles.update(crop="center", crop_size=(24, 24), tile_side=8, tile_jitter=False,
                        flip_p=0.0, jitter_p=0.0, photometric_p=0.0, grayscale_p=0.0,
                        mean=(0.0,), std=(1.0,))
    n = 2048
    images = jnp.broadcast_to(jnp.asarray(_cells_image()), (n, 24, 24, 1))
    orders = {}
    for num in (0, 24):
        c.pirl.num_permutations = num
        t = jax.jit(lambda r, x: pirl.views(r, x, c)["tiles"])(KEY, images)
        cell = np.rint(np.asarray(t).mean(axis=(2, 3, 4)) * 255 / 10).astype(int) - 1   # (n, 9)
        assert (np.sort(cell, 1) == np.arange(9)).all()       # every tile once: a permutation
        orders[num] = {tuple(o) for o in cell}
    # 2048 draws from 9! = 362880 orders are nearly all distinct; from a set of 24, 24.
    assert len(orders[0]) > 2000 and len(orders[24]) == 24


def test_jigsaw_imagenet_tiles_are_grey_or_not_as_a_whole():
    """Goyal et al. / VISSL grey the whole image before cutting it (p 0.66): an
    image's 9 tiles are all grey or all in colour, never mixed."""
    c = load_file("configs/jigsaw.py:dataset=imagenet2012")
    c.jigsaw.tiles.update(crop_size=(24, 24), resize=24, tile_side=6)
    c.aug.update(mean=(0.0,), std=(1.0,))                      # grey stays equal channels
    cfg = jigsaw_method.tile_config(c)
    assert cfg.crop == "resize_crop" and not cfg.per_tile and cfg.grayscale_p == 0.66
    rng = np.random.default_rng(1)
    pix = np.zeros((32, 40, 40, 3), np.uint8)
    pix[:, :30, :40] = rng.integers(0, 256, (30, 40, 3))
    images = canvas.Canvas(jnp.asarray(pix), jnp.asarray([[30, 40]] * 32, jnp.int32))
    t, _ = jax.jit(lambda r, x: jigsaw.batch_jigsaw(r, x, cfg, jigsaw.permutations(4)))(KEY, images)
    t = np.asarray(t)
    grey = np.abs(t[..., 0] - t[..., 1]).max(axis=(2, 3)) < 1e-4      # (B, 9)
    assert (grey.all(1) | ~grey.any(1)).all()
    assert 0.4 < grey.all(1).mean() < 0.95


def test_npid_view_greys_before_its_jitter():
    """NPID's ImageNet pipeline greys, then jitters (a hue shift of a grey image is
    grey); greying after a hue shift gives another grey level."""
    x = (jax.random.uniform(KEY, (16, 16, 3)) * 255).astype(jnp.uint8)
    fields = dict(crop="center", crop_size=(16, 16), flip_p=0.0, jitter_p=1.0, brightness=0.0,
                  contrast=0.0, saturation=0.0, hue=0.4, grayscale_p=1.0, mean=(0.0,), std=(1.0,))
    grey = augment.view(KEY, x, augment.npid_view_config(**dict(fields, jitter_p=0.0)))
    first = augment.view(KEY, x, augment.npid_view_config(**fields))
    last = augment.view(KEY, x, augment.npid_view_config(**fields, grayscale_first=False))
    np.testing.assert_allclose(first, grey, atol=1e-5)
    assert not np.allclose(last, grey, atol=1e-3)
    cfg = augment.npid_view_config()
    assert (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) == (0.4, 0.4, 0.4, 0.4)


def test_photometric_ops_are_pils():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)
    u8[..., 2] = u8[..., 2] // 2 + 40                         # a channel short of 0..255
    x = jnp.asarray(u8, jnp.float32) / 255.0
    pil = Image.fromarray(u8)
    ours = lambda y: np.asarray(y) * 255.0
    for bits in (4, 6, 8):
        np.testing.assert_allclose(ours(photometric.posterize(x, bits)),
                                   ImageOps.posterize(pil, bits), atol=1e-3)
    for t in (0, 100, 256):
        np.testing.assert_allclose(ours(photometric.solarize_at(x, t)),
                                   ImageOps.solarize(pil, t), atol=1e-3)
    # PIL rounds to 8 bits between its steps; we do not: within a step or so.
    np.testing.assert_allclose(ours(photometric.autocontrast(x)), ImageOps.autocontrast(pil),
                               atol=1.0)
    for f in (0.1, 1.0, 1.9):
        np.testing.assert_allclose(ours(photometric.sharpness(x, f)),
                                   ImageEnhance.Sharpness(pil).enhance(f), atol=1.5)
    # Applied with probability p, in [0, 1]; p 0 is not traced.
    y = jax.vmap(lambda k: photometric.random_photometric(k, x, 0.66))(jax.random.split(KEY, 64))
    changed = np.abs(np.asarray(y) - np.asarray(x)).max(axis=(1, 2, 3)) > 1e-6
    assert 0.4 < changed.mean() < 0.9 and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert photometric.random_photometric(KEY, x, 0.0) is x
