"""A convolution whose weight gradient is one matmul (for XLA:CPU).

XLA computes a convolution's weight gradient as another convolution, whose
"kernel" is the output gradient (as large as the feature map) and whose output is
the small k x k kernel. XLA:CPU runs that shape through Eigen poorly: on the demo
ConvNet it was over half of all convolution time (benchmarks/step.py). The same
quantity is a single matmul of the im2col patches of the input with the output
gradient,

    dW[(kh, kw, cin), cout] = sum over (b, h, w) of patches[b, h, w, (kh, kw, cin)] * dy[b, h, w, cout],

which runs at matmul speed. The forward pass and the input gradient stay XLA's
own convolutions (they are fast). Values and gradients equal lax's up to float
rounding (tests/test_models.py).

Use it through `flax.linen.Conv(..., conv_general_dilated=conv_general_dilated)`;
cases it does not cover (dilation, feature groups, other layouts) fall back to
`lax.conv_general_dilated` unchanged. The patches cost kh*kw times the input's
memory during the backward pass, which is why this is an option
(`config.model.conv="im2col_wgrad"`), meant for CPUs, not the default on
accelerators, where cuDNN / the TPU compiler already do well.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, w, strides, pads, precision=None):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                    precision=precision)


def patches(x: jax.Array, kernel: tuple[int, int], strides: tuple[int, int],
            pads: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """x: (B, H, W, C) -> (B, Ho, Wo, kh * kw * C), ordered (kh, kw, C) like an HWIO kernel.

    Built from kh * kw strided slices of the padded input: no gathers.
    """
    (kh, kw), (sh, sw) = kernel, strides
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    cols = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]
    return jnp.concatenate(cols, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, precision):
    return _lax_conv(x, w, strides, pads, precision)


def _conv_fwd(x, w, strides, pads, precision):
    return _lax_conv(x, w, strides, pads, precision), (x, w)


def _conv_bwd(strides, pads, precision, res, dy):
    x, w = res
    _, input_vjp = jax.vjp(lambda x_: _lax_conv(x_, w, strides, pads, precision), x)
    dx, = input_vjp(dy)
    p = patches(x, w.shape[:2], strides, pads)
    dw = jnp.dot(p.reshape(-1, p.shape[-1]).T, dy.reshape(-1, dy.shape[-1]),
                 precision=precision, preferred_element_type=jnp.float32)
    return dx, dw.reshape(w.shape).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
    """Drop-in for lax.conv_general_dilated (the signature flax.linen.Conv calls).

    NHWC inputs, HWIO kernels, any strides and padding: the matmul weight
    gradient. Anything else: lax.conv_general_dilated itself.
    """
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    simple = (lhs.ndim == 4 and dims == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
              and feature_group_count == 1 and not kwargs
              and all(d == 1 for d in (lhs_dilation or (1, 1)))
              and all(d == 1 for d in (rhs_dilation or (1, 1))))
    if not simple:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        precision=precision, **kwargs)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    pads = tuple(tuple(int(p) for p in pair) for pair in padding)
    return _conv(lhs, rhs, tuple(window_strides), pads, precision)


CONV_IMPLS = {"xla": None, "im2col_wgrad": conv_general_dilated}
