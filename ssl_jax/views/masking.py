"""Block masks for iBOT / DINOv2's masked-patch loss, drawn on device inside jit.

    masks = masking.block_masks(rng, batch, (gh, gw))     # (batch, gh * gw) bool, True = masked

As DINOv2 (dinov2/data/collate.py collate_data_and_cast, dinov2/data/masking.py
MaskingGenerator, itself BEiT's block masking):
- of the `batch` crops, the first int(batch * sample_prob) get a target count
  int(N * U(r_i, r_{i+1})), N = gh * gw, with r = linspace(ratio[0], ratio[1], n + 1):
  one bin each, so the batch spans the whole range evenly; the others get no mask;
- each masked crop's mask is a union of rectangles: while fewer than the target are
  masked, draw an area U(min_patches, m) with m = min(target - masked, max_patches),
  an aspect exp(U(log aspect[0], log aspect[1])), h = round(sqrt(area * aspect)),
  w = round(sqrt(area / aspect)); if h < gh and w < gw, a uniform position; the
  rectangle is kept when it adds between 1 and m new patches. Ten rejected rectangles
  in a row end the mask (so a mask may stop short of its target, as DINOv2's does);
  max_patches, the most one rectangle may add, defaults to 0.5 N, as DINOv2's train.py
  builds the generator.

Where this differs from DINOv2:
- fixed shapes for jit: a lax.fori_loop over `attempts` rectangle draws per crop (64 by
  default; the reference loop used at most 30 in 3000 draws at 16 x 16, 23 at 14 x 14),
  after which a mask stops where it is;
- the random numbers are jax.random's, four uniforms per attempt drawn whether used or
  not; `randint(0, gh - h)` is floor(U * (gh - h + 1));
- DINOv2 shuffles the finished list of masks; here the targets are permuted before the
  masks are drawn (the same distribution);
- DINOv2 draws per GPU over its local crops; the caller picks what `batch` spans
  (e.g. every global crop of the global batch, one call inside the jitted step).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_GIVE_UP = 10  # MaskingGenerator._mask's attempts per rectangle


def mask_targets(rng: jax.Array, batch: int, num_patches: int, ratio=(0.1, 0.5),
                 sample_prob: float = 0.5) -> jax.Array:
    """(batch,) int32: how many patches each crop should get masked; exactly
    int(batch * sample_prob) of them drawn one per bin of linspace(*ratio, n + 1),
    int(num_patches * U(bin)), the others 0, in a random order."""
    n = int(batch * sample_prob)
    edges = np.linspace(ratio[0], ratio[1], n + 1).astype(np.float32)
    k_draw, k_perm = jax.random.split(rng)
    u = jax.random.uniform(k_draw, (n,))
    t = jnp.floor(num_patches * (edges[:-1] + (edges[1:] - edges[:-1]) * u)).astype(jnp.int32)
    return jax.random.permutation(k_perm, jnp.concatenate([t, jnp.zeros(batch - n, jnp.int32)]))


def block_mask(uniforms: jax.Array, target: jax.Array, grid: tuple[int, int],
               min_patches: int = 4, max_patches: float | None = None,
               aspect=(0.3, 1 / 0.3)) -> jax.Array:
    """One crop's mask, (gh, gw) bool, from pre-drawn randomness.

    uniforms: (attempts, 4) in [0, 1): each attempt's area, log-aspect, top and left;
    target: () int, the number of patches to mask (0: none). The rectangles are
    MaskingGenerator's (module docstring); the randomness is a parameter so a test can
    drive a NumPy transcription of the reference with the same numbers.
    """
    gh, gw = grid
    max_patches = 0.5 * gh * gw if max_patches is None else max_patches
    lo, hi = math.log(aspect[0]), math.log(aspect[1])
    rows = jnp.arange(gh)[:, None]
    cols = jnp.arange(gw)[None, :]

    def attempt(i, state):
        mask, count, fails = state
        u = uniforms[i]
        active = (count < target) & (fails < _GIVE_UP)
        room = jnp.minimum(target - count, max_patches).astype(jnp.float32)
        area = min_patches + (room - min_patches) * u[0]
        ratio = jnp.exp(lo + (hi - lo) * u[1])
        h = jnp.round(jnp.sqrt(area * ratio)).astype(jnp.int32)
        w = jnp.round(jnp.sqrt(area / ratio)).astype(jnp.int32)
        fits = (h < gh) & (w < gw)
        top = jnp.minimum(jnp.floor(u[2] * (gh - h + 1)).astype(jnp.int32), gh - h)
        left = jnp.minimum(jnp.floor(u[3] * (gw - w + 1)).astype(jnp.int32), gw - w)
        rect = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        new = jnp.sum(rect & ~mask)
        keep = active & fits & (new > 0) & (new <= room)
        mask = jnp.where(keep, mask | rect, mask)
        count = count + jnp.where(keep, new, 0)
        fails = jnp.where(keep, 0, fails + active.astype(jnp.int32))
        return mask, count, fails

    init = (jnp.zeros(grid, bool), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    return jax.lax.fori_loop(0, uniforms.shape[0], attempt, init)[0]


def block_masks(rng: jax.Array, batch: int, grid: tuple[int, int], ratio=(0.1, 0.5),
                sample_prob: float = 0.5, min_patches: int = 4, aspect=(0.3, 1 / 0.3),
                max_patches: float | None = None, attempts: int = 64) -> jax.Array:
    """(batch, gh * gw) bool, True = the student sees the mask token there, row-major
    over the patch grid (the ViT's patch order). batch, grid, attempts are static."""
    gh, gw = grid
    k_targets, k_rects = jax.random.split(rng)
    targets = mask_targets(k_targets, batch, gh * gw, ratio, sample_prob)
    uniforms = jax.random.uniform(k_rects, (batch, attempts, 4))
    one = lambda u, t: block_mask(u, t, (gh, gw), min_patches, max_patches, aspect)
    return jax.vmap(one)(uniforms, targets).reshape(batch, gh * gw)
