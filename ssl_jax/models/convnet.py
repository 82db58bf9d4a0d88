"""A small VGG-style ConvNet for 28x28 / 32x32 images (the demo encoder).

Each block: 3x3 conv (no bias) -> BN -> ReLU -> 2x2 max-pool. With the
default widths (32, 64, 128, 256) on 28x28x1 the blocks give 14, 7, 3 and
1-pixel maps. It is the encoder that fits a 15-minute CPU pretraining budget;
the ResNets are for accelerators.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.models.norm import BatchNorm


def max_pool_2x2(x):
    """(B, H, W, C) -> (B, H//2, W//2, C), floor like 'VALID' pooling.

    A reshape + max instead of `nn.max_pool`: XLA's CPU reduce-window and its
    gradient (select-and-scatter) are slow; this measured ~22% faster on the
    ConvNet's forward + backward here.
    """
    b, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    x = x[:, :2 * h2, :2 * w2]
    return x.reshape(b, h2, 2, w2, 2, c).max(axis=(2, 4))


class ConvNet(nn.Module):
    """images (B, H, W, C) -> {"block1".."blockN": (B, h, w, c)} in `dtype`."""
    widths: Sequence[int] = (32, 64, 128, 256)
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(self.dtype)
        feats = {}
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                        param_dtype=jnp.float32, name=f"conv{i + 1}")(x)
            x = BatchNorm(groups=self.bn_groups, name=f"bn{i + 1}")(x, train)
            # ReLU after the pool: max and ReLU commute, and the pooled map is 4x smaller.
            x = nn.relu(max_pool_2x2(x))
            feats[f"block{i + 1}"] = x
        return feats
