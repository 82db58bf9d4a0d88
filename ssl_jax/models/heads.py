"""Heads on pooled features: MLP projection heads and linear classifiers."""
from __future__ import annotations

import flax.linen as nn
import jax
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


class WeightNormDense(nn.Module):
    """x (B, d) -> (B, out) = x @ (g * v / ||v||), no bias: torch's weight_norm(Linear(d,
    out, bias=False)), the norm of each output column of v (B, d) @ (d, out).

    learn_norm=False: g fixed at 1 and no parameter (DINO's norm_last_layer=True, where
    weight_g has requires_grad=False); True: g (1, out), initialised to 1, trained and,
    being 2-d as DINO's (out, 1) weight_g, weight-decayed like it. v starts as torch's
    Linear default, U(-1/sqrt(d), 1/sqrt(d)) (DINO leaves the last layer out of its
    trunc_normal init).
    """
    out: int
    learn_norm: bool = False

    @nn.compact
    def __call__(self, x):
        v = self.param("v", nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                       (x.shape[-1], self.out), jnp.float32)
        w = v * jax.lax.rsqrt(jnp.sum(v * v, axis=0, keepdims=True))
        if self.learn_norm:
            w = w * self.param("g", nn.initializers.ones, (1, self.out), jnp.float32)
        return x @ w


class DINOHead(nn.Module):
    """x (B, d) -> logits (B, out) float32: DINO's head (Caron et al. 2021,
    vision_transformer.py DINOHead, use_bn=False). layers Dense layers d -> hidden ->
    ... -> bottleneck with exact GELU between them (trunc-normal std 0.02, zero bias),
    the bottleneck L2-normalised (F.normalize, eps 1e-12), then a weight-normalised
    linear layer to `out` prototypes without bias, "last_layer" (norm_last_layer=True:
    its norm fixed at 1)."""
    out: int = 65536
    hidden: int = 2048
    bottleneck: int = 256
    layers: int = 3
    norm_last_layer: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no BN, no dropout
        dense = lambda n: nn.Dense(n, kernel_init=nn.initializers.truncated_normal(0.02),
                                   bias_init=nn.initializers.zeros)
        x = x.astype(jnp.float32)
        for _ in range(self.layers - 1):
            x = jax.nn.gelu(dense(self.hidden)(x), approximate=False)
        x = dense(self.bottleneck)(x)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return WeightNormDense(self.out, learn_norm=not self.norm_last_layer,
                               name="last_layer")(x)
