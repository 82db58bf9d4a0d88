"""Heads on pooled features: MLP projection heads and linear classifiers."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.models.norm import BatchNorm


class MLPHead(nn.Module):
    """x: (B, D_in) -> (B, out) float32.

    num_layers Dense layers with ReLU between them (num_layers=1: a linear head).
    hidden_bn: BN after every hidden Dense, before its ReLU (the Dense then has no
    bias: BN's shift replaces it). out_bn: BN with a scale and no shift after the
    last Dense (which then has no bias either). The projection heads:
      SimCLR (model_util.projection_head): hidden_bn=True, out_bn=True;
      MoCo v2 (builder.py, --mlp: Linear -> ReLU -> Linear): hidden_bn=False, out_bn=False;
      NPID / PIRL: num_layers=1.
    """
    hidden: int
    out: int
    num_layers: int = 2
    bn_groups: int = 1
    hidden_bn: bool = True
    out_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(jnp.float32)
        for _ in range(self.num_layers - 1):
            x = nn.Dense(self.hidden, use_bias=not self.hidden_bn)(x)
            if self.hidden_bn:
                x = BatchNorm(groups=self.bn_groups)(x, train)
            x = nn.relu(x)
        x = nn.Dense(self.out, use_bias=not self.out_bn)(x)
        if self.out_bn:
            x = BatchNorm(groups=self.bn_groups, use_bias=False, name="out_bn")(x, train)
        return x


def projection_head(head_cfg, bn_groups: int = 1) -> MLPHead:
    """config.head (hidden, dim, layers, and optionally hidden_bn, out_bn) -> MLPHead."""
    return MLPHead(hidden=head_cfg.hidden, out=head_cfg.dim, num_layers=head_cfg.layers,
                   bn_groups=bn_groups, hidden_bn=head_cfg.get("hidden_bn", True),
                   out_bn=head_cfg.get("out_bn", False))


class LinearHead(nn.Module):
    """x: (B, D_in) -> logits (B, num_classes) float32."""
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        return nn.Dense(self.num_classes)(x.astype(jnp.float32))
