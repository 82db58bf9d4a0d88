"""What a transformer stage is: its tokens, split by kind.

A ConvNet stage is a map (B, h, w, c). A ViT block's output is a class token, the
patch tokens on their grid and, optionally, register tokens (Darcet et al. 2024,
as DINOv2); `Tokens` keeps the three apart so that each consumer takes the one it
means: the projection heads and the default probes the class token, the spatial
probes (avg{s}x{s}) and the invariance measurement the patch grid, nobody the
registers (they exist to absorb attention, not to be read).

Encoders return {stage: array | Tokens}; `summary` is the one place that decides
what a head reads from either.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tokens:
    """cls: (B, D); patches: (B, gh, gw, D) row-major over the image; registers: (B, R, D),
    R >= 0. All in the encoder's compute dtype."""
    cls: jax.Array
    patches: jax.Array
    registers: jax.Array

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patches.shape[1:3])

    @property
    def width(self) -> int:
        return self.patches.shape[-1]


def summary(feature) -> jax.Array:
    """One stage's output -> (B, D) float32, the vector a projection head reads:
    a Tokens' class token, a map's global average (B, h, w, c) -> (B, c)."""
    if isinstance(feature, Tokens):
        return feature.cls.astype(jnp.float32)
    return jnp.mean(feature.astype(jnp.float32), axis=(1, 2))
