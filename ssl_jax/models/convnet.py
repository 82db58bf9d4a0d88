"""A small VGG-style ConvNet for 28x28 / 32x32 images (the demo encoder).

Each block: 3x3 conv (no bias) -> BN -> ReLU -> 2x2 max-pool, except that the
last block is not pooled (`last_pool=False`): with the default widths
(32, 64, 128, 256) on 28x28x1 the blocks give 14, 7, 3 and 3-pixel maps, and the
heads and probes average the last one globally. Pooling it 2x2 instead would
keep only its top-left 2x2 window (1 pixel) and drop 5 of its 9 positions. It is the encoder that fits a 15-minute CPU pretraining budget;
the ResNets are for accelerators.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.errors import UserError
from ssl_jax.models.conv import CONV_IMPLS
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
    """images (B, H, W, C) -> {"block1".."blockN": (B, h, w, c)} in `dtype`.

    conv: "xla" or "im2col_wgrad" (models/conv.py: ~2x faster training on CPUs).
    """
    widths: Sequence[int] = (32, 64, 128, 256)
    dtype: Any = jnp.float32
    bn_groups: int = 1
    conv: str = "xla"
    last_pool: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        if self.conv not in CONV_IMPLS:
            raise UserError(f"conv={self.conv!r}: use one of {sorted(CONV_IMPLS)}.")
        x = x.astype(self.dtype)
        feats = {}
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                        param_dtype=jnp.float32, conv_general_dilated=CONV_IMPLS[self.conv],
                        name=f"conv{i + 1}")(x)
            x = BatchNorm(groups=self.bn_groups, name=f"bn{i + 1}")(x, train)
            if self.last_pool or i + 1 < len(self.widths):
                # ReLU after the pool: max and ReLU commute, and the pooled map is 4x smaller.
                x = max_pool_2x2(x)
            x = nn.relu(x)
            feats[f"block{i + 1}"] = x
        return feats
