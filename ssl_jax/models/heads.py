"""Heads on pooled features: MLP projection heads and linear classifiers."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.models.norm import BatchNorm


class MLPHead(nn.Module):
    """x: (B, D_in) -> (B, out) float32.

    num_layers Dense layers; every layer but the last is followed by BN + ReLU
    (SimCLR v1/v2 and MoCo v2 projection heads; num_layers=1 is a linear head).
    """
    hidden: int
    out: int
    num_layers: int = 2
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(jnp.float32)
        for _ in range(self.num_layers - 1):
            x = nn.Dense(self.hidden, use_bias=False)(x)
            x = BatchNorm(groups=self.bn_groups)(x, train)
            x = nn.relu(x)
        return nn.Dense(self.out)(x)


class LinearHead(nn.Module):
    """x: (B, D_in) -> logits (B, num_classes) float32."""
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        return nn.Dense(self.num_classes)(x.astype(jnp.float32))
