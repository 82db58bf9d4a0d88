"""ResNet-18/34/50/101 (He et al. 2016), returning every stage's features.

Two stems: "imagenet" (7x7/2 conv + 3x3/2 max-pool, for 224px inputs) and
"small" (3x3/1 conv, no pool, for 32px inputs as in SimCLR's CIFAR setup).
`width` multiplies every stage's channels (SimCLR's ResNet-50 (2x) is
width=2). Parameters are float32; `dtype` is the compute dtype (bfloat16 on
accelerators); BN statistics stay float32 (norm.py).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.errors import UserError
from ssl_jax.models.conv import CONV_IMPLS
from ssl_jax.models.norm import BatchNorm

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class BasicBlock(nn.Module):
    """Two 3x3 convs; (B, H, W, C) -> (B, H/s, W/s, filters)."""
    filters: int
    strides: int
    conv: Any
    norm: Any

    @nn.compact
    def __call__(self, x, train: bool):
        y = self.conv(self.filters, (3, 3), (self.strides,) * 2)(x)
        y = nn.relu(self.norm()(y, train))
        y = self.conv(self.filters, (3, 3))(y)
        # Zero-init the last BN scale: each block starts as the identity (Goyal et al. 2017).
        y = self.norm(scale_init=nn.initializers.zeros)(y, train)
        if x.shape != y.shape:
            x = self.norm(name="proj_bn")(self.conv(self.filters, (1, 1), (self.strides,) * 2,
                                                     name="proj_conv")(x), train)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, as torchvision "v1.5") -> 1x1 with 4x expansion."""
    filters: int
    strides: int
    conv: Any
    norm: Any

    @nn.compact
    def __call__(self, x, train: bool):
        y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x), train))
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), (self.strides,) * 2)(y), train))
        y = self.conv(self.filters * 4, (1, 1))(y)
        y = self.norm(scale_init=nn.initializers.zeros)(y, train)
        if x.shape != y.shape:
            x = self.norm(name="proj_bn")(self.conv(self.filters * 4, (1, 1), (self.strides,) * 2,
                                                     name="proj_conv")(x), train)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """images (B, H, W, C) -> {"stem", "stage1".."stage4": (B, h, w, c)} in `dtype`."""
    depth: int = 50
    width: float = 1.0
    stem: str = "imagenet"
    dtype: Any = jnp.float32
    bn_groups: int = 1
    conv: str = "xla"  # or "im2col_wgrad": models/conv.py, for CPUs

    @nn.compact
    def __call__(self, x, train: bool):
        if self.conv not in CONV_IMPLS:
            raise UserError(f"conv={self.conv!r}: use one of {sorted(CONV_IMPLS)}.")
        if self.depth not in STAGE_SIZES:
            raise UserError(f"ResNet depth {self.depth}: use one of {sorted(STAGE_SIZES)}.")
        if self.stem not in ("imagenet", "small"):
            raise UserError(f"ResNet stem {self.stem!r}: use 'imagenet' or 'small'.")
        conv = lambda *a, **k: nn.Conv(*a, use_bias=False, padding="SAME", dtype=self.dtype,
                                       param_dtype=jnp.float32,
                                       kernel_init=nn.initializers.he_normal(),
                                       conv_general_dilated=CONV_IMPLS[self.conv], **k)
        norm = lambda **k: BatchNorm(groups=self.bn_groups, **k)
        block = Bottleneck if self.depth >= 50 else BasicBlock
        base = int(64 * self.width)

        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = nn.relu(norm(name="stem_bn")(conv(base, (7, 7), (2, 2), name="stem_conv")(x), train))
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        else:
            x = nn.relu(norm(name="stem_bn")(conv(base, (3, 3), name="stem_conv")(x), train))
        feats = {"stem": x}
        for i, n in enumerate(STAGE_SIZES[self.depth]):
            for j in range(n):
                strides = 2 if i > 0 and j == 0 else 1
                x = block(base * 2 ** i, strides, conv, norm, name=f"stage{i + 1}_block{j + 1}")(x, train)
            feats[f"stage{i + 1}"] = x
        return feats
