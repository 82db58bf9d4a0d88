"""Where a ViT looks: its last block's class-token attention over the patches, per head,
as DINO shows it (Caron et al. 2021, Fig. 1 and visualize_attention.py; drawn by
figures.attention_grid for `python -m ssl_jax.evaluate --plot`).

A ViT (models.Tokens contract) sows that attention into its "intermediates" as
"cls_attention": (B, heads, gh, gw) float32, the softmax row of the class token's
query restricted to the patch tokens. A ConvNet sows none, and gets no figure.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.views import augment

SOWN = "cls_attention"
MASS = 0.6  # DINO's figures keep the patches that hold 60% of a head's attention


def find_sown(intermediates, name: str = SOWN):
    """The first array sown under `name` anywhere in an intermediates tree (flax keeps a
    sown value as a tuple: its first entry), or None when nothing is."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
        if any(getattr(k, "key", None) == name for k in path):
            return leaf
    return None


def cls_attention(encoder, variables, view_cfg, images) -> tuple[np.ndarray, np.ndarray] | None:
    """images (N, H, W, C) uint8 -> (views (N, h, w, C) float32 in [0, 1], the eval view
    the encoder saw, un-normalised for display; attention (N, heads, gh, gw) float32), or
    None when the encoder sows no class-token attention (a ConvNet)."""
    def run(v, images):
        x = augment.batch_views(jax.random.key(0), images, view_cfg)
        _, state = encoder.apply(v, x, train=False, mutable=["intermediates"])
        shown = x * jnp.asarray(view_cfg["std"]) + jnp.asarray(view_cfg["mean"])
        return jnp.clip(shown, 0.0, 1.0), find_sown(state.get("intermediates", {}))
    if jax.eval_shape(run, variables, images)[1] is None:  # traced only: nothing compiled
        return None
    views, attention = jax.device_get(jax.jit(run)(variables, images))
    return np.asarray(views, np.float32), np.asarray(attention, np.float32)


def mass_mask(attention: np.ndarray, mass: float = MASS) -> np.ndarray:
    """attention (..., gh, gw) >= 0 -> bool (..., gh, gw): per map, its largest weights
    down to the one that brings their share of the map's total to `mass` (DINO's
    --threshold: sorted ascending, a patch is kept when the cumulative share up to and
    including it exceeds 1 - mass)."""
    a = np.asarray(attention, np.float64)
    flat = a.reshape(-1, a.shape[-2] * a.shape[-1])
    order = np.argsort(flat, axis=-1, kind="stable")
    ranked = np.take_along_axis(flat, order, -1)
    share = np.cumsum(ranked, -1) / np.maximum(ranked.sum(-1, keepdims=True), 1e-30)
    keep = np.zeros(flat.shape, bool)
    np.put_along_axis(keep, order, share > 1.0 - mass, -1)
    return keep.reshape(a.shape)


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """maps (..., gh, gw) -> (..., *size) by nearest neighbour: each patch's value over the
    pixels it covers (DINO: interpolate(scale_factor=patch_size, mode='nearest'))."""
    rows = np.arange(size[0]) * maps.shape[-2] // size[0]
    cols = np.arange(size[1]) * maps.shape[-1] // size[1]
    return maps[..., rows[:, None], cols[None, :]]
