"""Batch normalisation with optional ghost batches (MoCo's shuffle-BN).

`groups=1` is ordinary BN over the whole (global, under jit) batch and matches
`flax.linen.BatchNorm` exactly. `groups=G` splits the batch into G contiguous
groups and normalises each with its own statistics: with the batch sharded
over G devices this is per-device BN, which MoCo's shuffle-BN needs to stop the
query and key of one image from sharing statistics. The running averages
are updated with the mean over groups of the group statistics.

Statistics are always computed in float32, whatever the compute dtype: bf16
sums over 100k+ activations lose the variance.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.errors import UserError


class BatchNorm(nn.Module):
    """x: (B, ..., C) -> same shape and x's dtype. Parameters scale/bias (C,), float32;
    use_bias=False: no shift (SimCLR's projection output)."""
    momentum: float = 0.9
    epsilon: float = 1e-5
    groups: int = 1
    scale_init: Any = nn.initializers.ones
    dtype: Any = None
    use_bias: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = (self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
                if self.use_bias else jnp.zeros((c,), jnp.float32))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        dtype = self.dtype or x.dtype

        if train:
            g = self.groups
            if x.shape[0] % g:
                raise UserError(f"BatchNorm groups={g} must divide the batch size {x.shape[0]}.")
            xf = x.astype(jnp.float32).reshape((g, x.shape[0] // g) + x.shape[1:])
            axes = tuple(range(1, xf.ndim - 1))
            mean = jnp.mean(xf, axes, keepdims=True)
            # E[x^2] - E[x]^2 as flax does (one pass), clipped against rounding.
            var = jnp.maximum(jnp.mean(jnp.square(xf), axes, keepdims=True) - jnp.square(mean), 0.0)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean.reshape(g, c).mean(0)
                ra_var.value = m * ra_var.value + (1 - m) * var.reshape(g, c).mean(0)
        else:
            xf = x.astype(jnp.float32)[None]
            mean, var = ra_mean.value, ra_var.value

        # Fold normalisation and affine into one multiply-add per element.
        mul = scale * jnp.reciprocal(jnp.sqrt(var + self.epsilon))
        y = xf * mul + (bias - mean * mul)
        return y.reshape(x.shape).astype(dtype)
