"""Jigsaw puzzles (Noroozi & Favaro 2016; the tiles of PIRL, Misra & van der Maaten 2020).

An image becomes a 3x3 grid of tiles, made on device like every other view:

  crop of the image -> (S_h, S_w)                          e.g. ImageNet 255x255:
      crop "resized" (random resized crop, scale (0.6, 1)   PIRL's; "resize_crop"
      in PIRL's VISSL config) or "resize_crop" (shorter     Jigsaw's (Goyal et al.
      side to 256, random 255 window) or "center"           2019, VISSL)
  3x3 grid of cells (S_h // 3, S_w // 3)                    85x85
  one tile of tile_side per cell at a random offset          64x64: any of the 22
      inside its cell ("jitter": a gap between tiles, so       offsets 0..21 that fit
      edges and continued lines cannot solve the puzzle)       (VISSL draws 0..20)
  resized to tile_size (0: keep tile_side)
  flip and colour ops (augment.view's) drawn per tile (per_tile=True, PIRL: VISSL
      applies its transforms to each patch) or once on the whole grid crop before it
      is cut (per_tile=False, Jigsaw: VISSL's flip and grayscale precede the cut);
      normalised; optionally standardised per tile and channel (Noroozi's
      per-tile normalisation against low-level shortcuts)

`tiles` makes the 9 tiles of one image in reading order; `batch_jigsaw` vmaps it
over per-example keys and shuffles each example's tiles by a permutation drawn
from the fixed set of `permutations` (maximal Hamming distance), whose index is
the label of the pretext task; `batch_any_order` draws each example's order
uniformly from all 9! permutations instead (PIRL's code: no label, any order).

Small images. Fashion-MNIST (28x28) has ~9 px cells: configs/jigsaw.py upsamples
the crop to 64x64 (cells 21, tiles 16 with up to 5 px jitter), so the default
4-block ConvNet (2x2 pools, 16 -> 8 -> 4 -> 2) still has a final map of a few
pixels, and the tiles are cut without a second interpolation. (Tiles of the
native ~7 px would leave it nothing; methods/jigsaw.py raises on an empty map.)
"""
from __future__ import annotations

import functools
import itertools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssl_jax.config import nearest_keys
from ssl_jax.errors import UserError
from ssl_jax.views import augment, canvas, ops

GRID = 3
NUM_TILES = GRID * GRID
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "ssl_jax")
_VERSION = 1  # in the cache file name: bump when the algorithm's output changes


# ---------------------------------------------------------------- permutations

@functools.lru_cache(maxsize=1)
def _all_permutations() -> np.ndarray:
    """(9!, 9) int8, lexicographic order."""
    return np.array(list(itertools.permutations(range(NUM_TILES))), np.int8)


def _greedy_max_hamming(num: int, seed: int) -> np.ndarray:
    """Noroozi & Favaro's greedy selection, maximin form: from a random first
    permutation, repeatedly add the one of all 9! whose *minimum* Hamming distance
    to those chosen is largest, ties broken by the seeded RNG.

    (Their released code ranks candidates by the *mean* distance; the minimum
    gives the set's guarantee directly: every pair differs in >= min positions.
    Its mean distance is the same, 8.0 for 1000 permutations.) ~2 s for 1000.
    """
    perms = _all_permutations()
    columns = np.ascontiguousarray(perms.T)                 # (9, n): fast row compares
    n = perms.shape[0]
    rng = np.random.default_rng(seed)
    min_dist = np.full(n, NUM_TILES + 1, np.int8)           # to the chosen set
    dist = np.empty(n, np.int8)
    chosen = [int(rng.integers(n))]
    for _ in range(num - 1):
        last = perms[chosen[-1]]
        dist[:] = 0
        for k in range(NUM_TILES):
            dist += columns[k] != last[k]
        np.minimum(min_dist, dist, out=min_dist)            # chosen ones drop to 0
        ties = np.flatnonzero(min_dist == min_dist.max())
        chosen.append(int(ties[rng.integers(len(ties))]))
    return perms[chosen].astype(np.int32)


def _is_permutation_set(p, num: int) -> bool:
    return (p.shape == (num, NUM_TILES)
            and bool((np.sort(p, axis=1) == np.arange(NUM_TILES)).all())
            and len(np.unique(p, axis=0)) == num)


@functools.lru_cache(maxsize=16)
def permutations(num: int, seed: int = 0, cache_dir: str | None = None) -> np.ndarray:
    """The fixed permutation set of the jigsaw task: (num, 9) int32, read-only.

    Row i is a permutation of 0..8; deterministic for (num, seed), and the set
    for num is the first num rows of the set for any larger num (same seed).
    Cached in memory and on disk (cache_dir, default ~/.cache/ssl_jax), since
    every trace of a train step asks for it.
    """
    if not 1 <= num <= math.factorial(NUM_TILES):
        raise UserError(f"num_perms={num}: use 1..{math.factorial(NUM_TILES)} (9!).")
    path = os.path.join(cache_dir or CACHE_DIR, f"jigsaw_perms_v{_VERSION}_{num}_{seed}.npy")
    p = None
    if os.path.exists(path):
        try:
            p = np.load(path)
        except (OSError, ValueError):   # a torn or foreign file: recompute
            p = None
        if p is not None and not _is_permutation_set(p, num):
            p = None
    if p is None:
        p = _greedy_max_hamming(num, seed)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp.npy"   # np.save would append .npy otherwise
            np.save(tmp, p)
            os.replace(tmp, path)   # atomic: concurrent processes never read half a file
        except OSError:
            pass   # a read-only home only costs recomputing next time
    p = np.asarray(p, np.int32)
    p.flags.writeable = False   # shared through lru_cache
    return p


# ---------------------------------------------------------------- tiles

TILE_DEFAULTS = dict(
    tile_side=64,       # tile side in crop pixels; must fit in a cell (crop_size // 3)
    tile_size=0,        # output side; 0 keeps tile_side (no second interpolation)
    tile_jitter=True,   # random offset of each tile inside its cell; False: centred
    standardize=False,  # per-tile, per-channel zero mean / unit std after normalising
    per_tile=True,      # flip / colour ops per tile (True) or once on the whole grid crop
)


def _tile_config(recipe, overrides) -> ml_collections.ConfigDict:
    unknown = [k for k in overrides if k not in augment.DEFAULTS and k not in TILE_DEFAULTS]
    if unknown:
        raise UserError(f"unknown tile config field {unknown[0]!r}."
                       f"{nearest_keys(unknown[0], list(augment.DEFAULTS) + list(TILE_DEFAULTS))}")
    view = dict(crop_size=(255, 255), crop_scale=(0.6, 1.0), blur_p=0.0)
    view.update({k: v for k, v in overrides.items() if k in augment.DEFAULTS})
    cfg = recipe(**view)
    for key, default in TILE_DEFAULTS.items():
        cfg[key] = overrides.get(key, default)
    return cfg


def tile_view_config(**overrides) -> ml_collections.ConfigDict:
    """A tile config with VISSL's geometry (crop scale (0.6, 1) -> 255x255, 85 px
    cells, 64 px tiles with jitter) and, per tile, flip 0.5 and SimCLR's colour
    distortion (s=1: jitter (0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale 0.2), no
    blur: a base that configs override (configs/jigsaw.py sets its own colour ops;
    PIRL's tiles are `pirl_tile_view_config`).

    Fields: those of augment's view configs (crop "resized", "resize_crop" or
    "center", crop_size = the grid crop's (h, w), crop_scale, crop_ratio, resize,
    crop_frac, and the flip / colour ops, mean, std) plus TILE_DEFAULTS.
    """
    return _tile_config(augment.simclr_view_config, overrides)


def pirl_tile_view_config(**overrides) -> ml_collections.ConfigDict:
    """PIRL's tiles (VISSL pirl_jigsaw_4node_resnet50.yaml, ImgPilToPatchesAndImage):
    crop scale (0.6, 1) -> 255x255, 85 px cells, 64 px tiles with jitter; per tile
    ColorJitter(0.4, 0.4, 0.4, 0.2) always, the photometric distortion with p 0.66,
    grayscale 0.2 and flip 0.5 (augment.pirl_view_config's ops); no blur."""
    return _tile_config(augment.pirl_view_config, overrides)


def tile_geometry(cfg) -> tuple[tuple[int, int], int, int]:
    """-> ((cell_h, cell_w), tile_side, tile_size); raises if a tile cannot fit."""
    crop_h, crop_w = cfg["crop_size"]
    cell = (crop_h // GRID, crop_w // GRID)
    side = cfg["tile_side"]
    if not 0 < side <= min(cell):
        raise UserError(f"tile_side={side} must be in 1..{min(cell)}: crop_size={tuple(cfg['crop_size'])} "
                         f"gives {cell[0]}x{cell[1]} cells. Lower tile_side or raise crop_size.")
    if cfg["crop"] not in ("resized", "resize_crop", "center"):
        raise UserError(f"tile config crop={cfg['crop']!r}: use 'resized', 'resize_crop' "
                        "or 'center'.")
    return cell, side, cfg["tile_size"] or side


def tiles(rng, image, cfg):
    """The 9 tiles of one image, in reading order (row-major over the 3x3 grid).

    image: (H, W, C) or (H, W) uint8 (or float in [0, 1]), or a canvas.Canvas
    (the crop then comes from its valid region); cfg: tile_view_config.
    Returns (9, t, t, C) float32, t = cfg.tile_size or cfg.tile_side.
    """
    # Missing fields take the defaults; unknown ones raise.
    cfg = tile_view_config(**(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)).to_dict()
    (cell_h, cell_w), side, size = tile_geometry(cfg)
    image, hw = canvas.split(image)
    x = image.astype(jnp.float32)
    if image.dtype == jnp.uint8:
        x = x / 255.0
    if x.ndim == 2:
        x = x[..., None]
    k_crop, k_offset, k_aug = jax.random.split(rng, 3)
    crop_size = tuple(cfg["crop_size"])
    if cfg["crop"] == "resized":
        crop = ops.random_resized_crop(k_crop, x, crop_size, cfg["crop_scale"], cfg["crop_ratio"],
                                       hw)
    elif cfg["crop"] == "resize_crop":
        crop = ops.resize_random_crop(k_crop, x, crop_size, cfg["resize"], hw)
    else:
        crop = ops.center_crop_resize(x, crop_size, cfg["crop_frac"], hw)
    view_cfg = {k: v for k, v in cfg.items() if k in augment.DEFAULTS}
    if not cfg["per_tile"]:
        # The flip / colour ops once on the whole crop (identity crop, no normalising
        # yet); the tiles are then only normalised.
        crop = augment.view(k_aug, crop, dict(view_cfg, crop="center", crop_size=crop_size,
                                              crop_frac=1.0, mean=(0.0,), std=(1.0,)))

    # Integer offsets inside the cells; pixels past 3 * cell (crop side not a
    # multiple of 3) are never used.
    room = np.array([cell_h - side, cell_w - side])
    if cfg["tile_jitter"]:
        offset = jax.random.randint(k_offset, (NUM_TILES, 2), 0, jnp.asarray(room) + 1)
    else:
        offset = jnp.broadcast_to(jnp.asarray(room // 2), (NUM_TILES, 2))
    rows, cols = np.divmod(np.arange(NUM_TILES), GRID)
    y0 = rows * cell_h + offset[:, 0]
    x0 = cols * cell_w + offset[:, 1]
    # crop_resize with an integer box of the output's size is an exact selection
    # (one-hot interpolation rows), and a resize when tile_size != tile_side.
    cut = jax.vmap(lambda y, x_: ops.crop_resize(crop, (y, x_, side, side), (size, size)))
    out = cut(y0.astype(jnp.float32), x0.astype(jnp.float32))          # (9, t, t, C)

    if cfg["per_tile"]:
        # Each tile its own flip / colour: the view ops with an identity centre crop.
        view_cfg.update(crop="center", crop_size=(size, size), crop_frac=1.0)
        out = jax.vmap(lambda k, t: augment.view(k, t, view_cfg))(
            jax.random.split(k_aug, NUM_TILES), out)
    else:
        out = ops.normalize(out, cfg["mean"], cfg["std"])
    if cfg["standardize"]:
        mean = jnp.mean(out, axis=(1, 2), keepdims=True)
        std = jnp.std(out, axis=(1, 2), keepdims=True)
        out = (out - mean) / jnp.maximum(std, 1e-3)   # floor: flat tiles stay finite
    return out


def _shuffled(rng, images, cfg, draw):
    """Each example's tiles (its own key from split(rng, B)) in the order draw(key)
    gives: draw(key) -> (order (9,) int32, label)."""
    def one(key, image):
        k_tiles, k_perm = jax.random.split(key)
        order, label = draw(k_perm)
        return tiles(k_tiles, image, cfg)[order], label
    return jax.vmap(one)(jax.random.split(rng, images.shape[0]), images)


def batch_jigsaw(rng, images, cfg, perms):
    """Shuffled tiles of a batch and the index of each example's permutation.

    images: (B, H, W, C) or (B, H, W) uint8, or a canvas.Canvas of B images;
    cfg: tile_view_config; perms: (P, 9)
    int (a constant, e.g. `permutations(P)`). Returns tiles (B, 9, t, t, C)
    float32 and perm_index (B,) int32, with tiles[b, j] the original tile
    perms[perm_index[b], j] of example b (tile j of the puzzle shows grid cell
    perms[perm_index[b], j]). Each example uses its own key from split(rng, B).
    """
    perms = jnp.asarray(perms, jnp.int32)

    def draw(key):
        index = jax.random.randint(key, (), 0, perms.shape[0])
        return perms[index], index
    return _shuffled(rng, images, cfg, draw)


def batch_any_order(rng, images, cfg):
    """Tiles of a batch, each example's in an order drawn uniformly from all 9!
    permutations (PIRL's code: VISSL ImgPilToPatchesAndImage's np.random.permutation).

    Same arguments as batch_jigsaw without perms. Returns tiles (B, 9, t, t, C)
    float32 and order (B, 9) int32, tiles[b, j] being the original tile order[b, j].
    """
    def draw(key):
        order = jax.random.permutation(key, NUM_TILES).astype(jnp.int32)
        return order, order
    return _shuffled(rng, images, cfg, draw)
