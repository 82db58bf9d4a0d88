"""Network-in-network for small images, as RotNet uses it (Gidaris et al. 2018).

Each block is a k x k conv then two 1x1 convs, every conv without bias and
followed by BN + ReLU. The official CIFAR widths (width=1):

  block1: 5x5 192, 1x1 160, 1x1 96, then 3x3/2 max-pool
  block2: 5x5 192, 1x1 192, 1x1 192, then 3x3/2 average pool
  block3..N: 3x3 192, 1x1 192, 1x1 192 (no pool; RotNet's CIFAR runs set
             use_avg_on_conv3=False)

On 32x32 inputs the blocks give 16, 8, 8, 8-pixel maps; on 28x28, 14, 7, 7, 7.
`width` multiplies every channel count, so a Fashion-MNIST run fits a CPU.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.errors import UserError
from ssl_jax.models.conv import CONV_IMPLS
from ssl_jax.models.norm import BatchNorm

# (kernel, channels) of the three convs of block1, block2 and every later block.
BLOCKS = (((5, 192), (1, 160), (1, 96)),
          ((5, 192), (1, 192), (1, 192)),
          ((3, 192), (1, 192), (1, 192)))


def pool_3x3_s2(x, kind: str):
    """3x3 pooling, stride 2, one pixel of padding on every side, as PyTorch's
    MaxPool2d / AvgPool2d(3, 2, padding=1) in the paper's code (the average
    counts the zero padding, PyTorch's default). (B, H, W, C) -> (B, ceil(H/2),
    ceil(W/2), C), the same sizes as padding "SAME".

    The max (or sum) of nine strided slices rather than `nn.max_pool`: XLA's CPU
    reduce-window and its select-and-scatter gradient are slow (see
    convnet.max_pool_2x2); slices fuse into elementwise ops.
    """
    if kind not in ("max", "avg"):
        raise ValueError(f"pool kind must be 'max' or 'avg', got {kind!r}")
    b, h, w, c = x.shape
    oh, ow = (h + 1) // 2, (w + 1) // 2
    fill = -jnp.inf if kind == "max" else 0
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=fill)
    parts = [xp[:, dy:dy + 2 * oh - 1:2, dx:dx + 2 * ow - 1:2]
             for dy in range(3) for dx in range(3)]
    if kind == "max":
        out = parts[0]
        for p in parts[1:]:
            out = jnp.maximum(out, p)
        return out
    return (sum(parts[1:], parts[0]) * (1.0 / 9.0)).astype(x.dtype)


def _conv(x, channels: int, k: int, dtype, conv_impl, name: str):
    """k x k conv, stride 1, SAME, no bias. (B, H, W, C) -> (B, H, W, channels).

    A 1x1 conv is a matmul over the flattened pixels: XLA's CPU convolution ran a
    28x28 48->40 1x1 conv (forward + backward, B=512) ~4x slower than the same
    product as a 2-D dot, and two of every block's three convs are 1x1.
    """
    # The paper's init: N(0, sqrt(2 / (k * k * out_channels))), i.e. He fan-out.
    init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    if k == 1:
        b, h, w, c = x.shape
        y = nn.Dense(channels, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                     kernel_init=init, name=name)(x.reshape(b * h * w, c))
        return y.reshape(b, h, w, channels)
    return nn.Conv(channels, (k, k), padding="SAME", use_bias=False, dtype=dtype,
                   param_dtype=jnp.float32, kernel_init=init, conv_general_dilated=conv_impl,
                   name=name)(x)


class NIN(nn.Module):
    """images (B, H, W, C) -> {"block1".."block{num_blocks}": (B, h, w, c)} in `dtype`.

    c = round(192 * width) for every block but block1 (round(96 * width)).
    Parameters are float32; BN statistics stay float32 (norm.py). conv: "xla" or
    "im2col_wgrad" for the k x k convs (models/conv.py, for CPUs).
    """
    num_blocks: int = 4
    width: float = 1.0
    dtype: Any = jnp.float32
    bn_groups: int = 1
    conv: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool):
        if self.num_blocks < 1:
            raise UserError(f"NIN num_blocks must be >= 1, got {self.num_blocks}.")
        if self.conv not in CONV_IMPLS:
            raise UserError(f"conv={self.conv!r}: use one of {sorted(CONV_IMPLS)}.")
        x = x.astype(self.dtype)
        feats = {}
        for i in range(self.num_blocks):
            for j, (k, ch) in enumerate(BLOCKS[min(i, 2)]):
                x = _conv(x, max(1, round(ch * self.width)), k, self.dtype, CONV_IMPLS[self.conv],
                          f"block{i + 1}_conv{j + 1}")
                x = nn.relu(BatchNorm(groups=self.bn_groups, name=f"block{i + 1}_bn{j + 1}")(x, train))
            if i < 2:
                x = pool_3x3_s2(x, "max" if i == 0 else "avg")
            feats[f"block{i + 1}"] = x
        return feats
