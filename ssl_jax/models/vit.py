"""A Vision Transformer (Dosovitskiy et al. 2021) as DINO builds it (Caron et al. 2021,
facebookresearch/dino vision_transformer.py), with DINOv2's register tokens and LayerScale.

images (B, H, W, C) -> {"block1".."block{depth}": models.Tokens}: every block's tokens
through the one final LayerNorm (shared parameters), as DINO's get_intermediate_layers,
so a probe can read any block; XLA drops the blocks nobody reads.

  patch embedding   a conv, kernel = stride = patch -> grid (gh, gw) = (H / patch, W / patch),
                    computed as a reshape and a matmul (PatchEmbed: XLA:CPU's strided conv is slow)
  mask token        optional (mask_token=True): masked patches' embeddings replaced by a
                    learned token before the position is added (DINOv2, for iBOT)
  position          "learned": a (1, gh0, gw0, D) table for the grid of img_size, resampled in
                    the graph to the input's grid (DINO's bicubic, `resample_matrix`);
                    "sincos": big_vision's fixed 2-D sin-cos at the input's grid (MoCo v3's
                    steps its frequencies by 1/(D/4), not 1/(D/4 - 1))
  tokens            [class, registers, patches]; the class token and the patches carry a
                    position, the registers none (DINOv2: they are added after it). DINO's
                    class token also has a learned position vector: a constant added to a
                    learned constant, so it is left out here (the same function class).
  blocks            pre-norm: x + drop_path(ls(attn(LN(x)))), x + drop_path(ls(mlp(LN(x))));
                    LN eps 1e-6, qkv with bias, MLP ratio 4 with exact GELU (torch's nn.GELU)

Initialisation is DINO's (_init_weights): Dense kernels, the position table and the class
token N(0, 0.02) (torch's trunc_normal_(std=.02) cuts at +-2 absolute, i.e. +-100 sigma:
a plain normal), biases 0, LayerNorm 1 / 0; the patch conv keeps PyTorch's default kernel
(uniform +-1/sqrt(fan_in)), its bias 0; patch_init="xavier" gives it MoCo v3's instead
(moco-v3 vits.py: xavier-uniform as a linear layer of fan_in = p*p*C, fan_out = D, i.e.
U(+-sqrt(6 / (p*p*C + D))), the init of its frozen random patch projection). Registers
N(0, 1e-6) and LayerScale's gamma `layerscale` as DINOv2.

Mixed precision (dtype bfloat16): parameters float32; matmuls in dtype; the attention
logits (accumulated in float32), the softmax, LayerNorm's statistics and GELU in float32.

Stochastic depth: block i (0-based) drops its residual branches per example with rate
drop_path * i / (depth - 1) (DINO's linspace), only in training, from the "dropout" rng
(network.apply(..., rng=)); off at evaluation. With drop_path > 0 a training call
without that rng is an error, not a silent deterministic run.

The last block sows the class token's attention to the patches for the attention-map
figures: encoder.apply(variables, x, train=False, mutable=["intermediates"]) gives
intermediates["block{depth}"]["cls_attention"] = (a,), a: (B, heads, gh, gw) float32
(the softmax row of the class query; keys of the class token and registers dropped).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.errors import UserError
from ssl_jax.models.tokens import Tokens

POS_EMBEDS = ("learned", "sincos")
PATCH_INITS = ("conv", "xavier")
_normal02 = nn.initializers.normal(0.02)
# PyTorch's Conv2d default: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
_torch_conv = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# MoCo v3's patch projection: xavier-uniform over the (p, p, C) inputs as one axis, as a
# linear layer's; flax's conv fans would count the p*p window in fan_out too.
_linear_xavier = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)


# ------------------------------------------------------------------ position embeddings

def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel with torch's a = -0.75, at distances x."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32: one axis of DINO's interpolate_pos_encoding, i.e. torch's
    F.interpolate(mode="bicubic", align_corners=False, scale_factor=(n_out + 0.1) / n_in).

    Given scale_factor, torch maps output i to the source coordinate
    (i + 0.5) / scale_factor - 0.5 (the given factor, not n_in / n_out: DINO's +0.1 moves
    every sample slightly), takes the 4 neighbours floor(x) - 1 .. floor(x) + 2 clamped to
    the edge, weighted by the cubic kernel of a = -0.75 (not jax.image.resize's "cubic",
    Keys a = -0.5 with antialiasing when shrinking).
    """
    out = np.zeros((n_out, n_in), np.float64)
    inv_scale = n_in / (n_out + 0.1)
    for i in range(n_out):
        x = (i + 0.5) * inv_scale - 0.5
        x0 = math.floor(x)
        for k in range(x0 - 1, x0 + 3):
            out[i, min(max(k, 0), n_in - 1)] += _cubic(np.float64(x - k))
    return out.astype(np.float32)


def resample_pos_embed(table: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """table (gh0, gw0, D) -> (gh, gw, D) float32: DINO's bicubic resample, the identity
    at the stored grid. Two constant matrices (grids are static) applied with einsum at
    HIGHEST precision: a TPU would otherwise round the table to bfloat16 in the dot."""
    if tuple(table.shape[:2]) == tuple(grid):
        return table
    mh = resample_matrix(table.shape[0], grid[0])
    mw = resample_matrix(table.shape[1], grid[1])
    return jnp.einsum("ih,hwd,jw->ijd", mh, table, mw, precision=jax.lax.Precision.HIGHEST)


def sincos_2d(grid: tuple[int, int], width: int, temperature: float = 10_000.0) -> np.ndarray:
    """(gh, gw, width) float32, big_vision's posemb_sincos_2d (not MoCo v3's exactly): a quarter
    of the channels each sin(x w), cos(x w), sin(y w), cos(y w), w = T^(-k / (width/4 - 1))."""
    y, x = np.mgrid[:grid[0], :grid[1]].astype(np.float64)
    quarter = width // 4
    omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
    xw, yw = x[..., None] * omega, y[..., None] * omega
    return np.concatenate([np.sin(xw), np.cos(xw), np.sin(yw), np.cos(yw)], -1).astype(np.float32)


# ------------------------------------------------------------------ blocks

class PatchEmbed(nn.Module):
    """images (B, H, W, C) -> (B, H/p, W/p, D) in dtype: the conv with kernel = stride = p
    (parameters "kernel" (p, p, C, D) and "bias" (D,), as nn.Conv's), computed as a reshape
    and one matmul. Same function and parameters; XLA:CPU's strided convolution is the
    slower: ViT-S/16's embedding at 224 px, batch 16, forward + weight gradient, 55 ms as a
    conv and 35 ms as the matmul here (2 cores; ~0.5% of the train step)."""
    patch: int
    width: int
    dtype: Any
    patch_init: str = "conv"  # one of PATCH_INITS (not `init`: that is flax's Module.init)

    @nn.compact
    def __call__(self, x):
        p, (b, h, w, c) = self.patch, x.shape
        init = _linear_xavier if self.patch_init == "xavier" else _torch_conv
        kernel = self.param("kernel", init, (p, p, c, self.width), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.width,), jnp.float32)
        # (B, gh, p, gw, p, C) -> (B, gh, gw, p, p, C): each patch's pixels in the kernel's order.
        x = x.astype(self.dtype).reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        y = jnp.dot(x.reshape(b, h // p, w // p, p * p * c),
                    kernel.reshape(p * p * c, self.width).astype(self.dtype))
        return y + bias.astype(self.dtype)


class DropPath(nn.Module):
    """x (B, ...) -> x with each example's whole branch zeroed with probability `rate`
    and the kept ones scaled by 1 / (1 - rate); the identity when not training."""
    rate: float

    @nn.compact
    def __call__(self, x, train: bool):
        if not train or self.rate == 0.0:
            return x
        if not self.has_rng("dropout"):
            raise ValueError("ViT drop_path > 0 in training needs the 'dropout' rng: pass "
                             "rng= to network.apply (rngs={'dropout': key}).")
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate,
                                    (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


class Attention(nn.Module):
    """x (B, N, D) -> (out (B, N, D), the class query's softmax weights on the patch keys
    (B, heads, gh, gw) float32); the softmax (B, heads, N, N) is float32."""
    heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x, grid, registers: int):
        b, n, d = x.shape
        hd = d // self.heads
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=jnp.float32,
                                         kernel_init=_normal02, name=name)
        q, k, v = jnp.split(dense(3 * d, "qkv")(x).reshape(b, n, 3 * self.heads, hd), 3, axis=2)
        # Logits accumulated and kept in float32 (bf16 keeps 8 bits: logits of +-20 would
        # move by ~0.1, the softmax's weights by ~10%).
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        attn = jax.nn.softmax(logits * hd ** -0.5, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn.astype(self.dtype), v)
        cls = attn[:, :, 0, 1 + registers:].reshape(b, self.heads, *grid)
        return dense(d, "proj")(out.reshape(b, n, d)), cls


class Block(nn.Module):
    """Pre-norm transformer block: x (B, N, D) -> (B, N, D) in dtype."""
    heads: int
    mlp_ratio: float
    layerscale: float | None
    drop_path: float
    dtype: Any
    sow_attention: bool = False

    @nn.compact
    def __call__(self, x, grid, registers: int, train: bool):
        d = x.shape[-1]
        norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                                         param_dtype=jnp.float32, name=name)
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=jnp.float32,
                                         kernel_init=_normal02, name=name)

        def scaled(y, name):
            if self.layerscale is None:
                return y
            gamma = self.param(name, nn.initializers.constant(self.layerscale), (d,), jnp.float32)
            return y * gamma.astype(y.dtype)

        y, cls_attention = Attention(self.heads, self.dtype, name="attn")(
            norm("norm1")(x), grid, registers)
        if self.sow_attention:  # the attention-map figures read it (module docstring)
            self.sow("intermediates", "cls_attention", cls_attention)
        x = x + DropPath(self.drop_path, name="drop_path1")(scaled(y, "ls1"), train)
        y = dense(int(d * self.mlp_ratio), "fc1")(norm("norm2")(x))
        # Exact GELU (torch's nn.GELU) in float32, like every transcendental of the step.
        y = jax.nn.gelu(y.astype(jnp.float32), approximate=False).astype(self.dtype)
        y = dense(d, "fc2")(y)
        return x + DropPath(self.drop_path, name="drop_path2")(scaled(y, "ls2"), train)


# ------------------------------------------------------------------ the encoder

class ViT(nn.Module):
    """images (B, H, W, C) -> {"block1".."block{depth}": Tokens(cls (B, D), patches
    (B, H/patch, W/patch, D), registers (B, R, D))} in `dtype`, D = width.

    img_size: (H, W) or an int, the input size the learned position table is stored for
    (its grid img_size // patch); another input grid resamples it. bn_groups: accepted
    and unused (a ViT has no BatchNorm), so that methods that group BN (MoCo's
    shuffle-BN: network.make_network(bn_groups=)) build any encoder the same way.
    mask_token: a learned (1, 1, D) "mask_token" (zeros at init, as DINOv2), and then
    `__call__(x, train, masks)` with masks (B, gh * gw) bool (row-major over the patch
    grid) puts it in place of the masked patches' embeddings before the position is
    added (DINOv2's prepare_tokens_with_masks), for iBOT's masked-patch loss. Off: no
    such parameter, and masks are refused. patch_init: the patch projection's kernel init,
    "conv" (DINO's: PyTorch's conv default) or "xavier" (MoCo v3's; module docstring).
    """
    patch: int = 16
    width: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    registers: int = 0
    layerscale: float | None = None
    drop_path: float = 0.0
    pos_embed: str = "learned"
    img_size: Any = 224
    dtype: Any = jnp.float32
    bn_groups: int = 1
    mask_token: bool = False
    patch_init: str = "conv"

    def stored_grid(self) -> tuple[int, int]:
        size = (self.img_size,) * 2 if isinstance(self.img_size, int) else tuple(self.img_size)
        return size[0] // self.patch, size[1] // self.patch

    def _check(self, hw):
        if self.width % self.heads:
            raise UserError(f"ViT heads={self.heads} does not divide width={self.width}: set "
                            "config.model.heads to a divisor (e.g. width / 64).")
        if self.pos_embed not in POS_EMBEDS:
            raise UserError(f"ViT pos_embed={self.pos_embed!r}: use one of {POS_EMBEDS}.")
        if self.patch_init not in PATCH_INITS:
            raise UserError(f"ViT patch_init={self.patch_init!r}: use one of {PATCH_INITS}.")
        if self.pos_embed == "sincos" and self.width % 4:
            raise UserError(f"ViT pos_embed='sincos' needs a width divisible by 4 "
                            f"(width={self.width}): change config.model.width.")
        if hw[0] % self.patch or hw[1] % self.patch:
            raise UserError(
                f"ViT patch={self.patch} does not divide the {hw[0]}x{hw[1]} input: use a crop "
                f"(config.aug.crop_size) that is a multiple of {self.patch}, or a patch size "
                "that divides it (config.model.patch).")
        if min(self.stored_grid()) < 1:
            raise UserError(f"ViT img_size={self.img_size} is smaller than patch={self.patch}: "
                            "set config.model.img_size to the training crop.")

    def _masked(self, x, masks):
        """x (B, gh, gw, D) patch embeddings -> the same with the masked ones replaced."""
        b, gh, gw, d = x.shape
        if not self.mask_token:
            if masks is None:
                return x
            raise UserError("ViT called with masks but without a mask token: set "
                            "config.model.mask_token=True (iBOT's masked-patch loss needs it).")
        token = self.param("mask_token", nn.initializers.zeros, (1, 1, d), jnp.float32)
        if masks is None:
            return x
        if tuple(masks.shape) != (b, gh * gw):
            raise ValueError(f"ViT masks of shape {tuple(masks.shape)}: expected "
                             f"(batch, gh * gw) = ({b}, {gh * gw}).")
        return jnp.where(masks.astype(bool).reshape(b, gh, gw, 1), token.astype(x.dtype)[None], x)

    @nn.compact
    def __call__(self, x, train: bool, masks=None):
        self._check(x.shape[1:3])
        d, r = self.width, self.registers
        x = PatchEmbed(self.patch, d, self.dtype, self.patch_init, name="patch_embed")(x)
        b, gh, gw, _ = x.shape
        if self.pos_embed == "learned":
            table = self.param("pos_embedding", _normal02, (1, *self.stored_grid(), d),
                               jnp.float32)
            pos = resample_pos_embed(table[0], (gh, gw))
        else:
            pos = jnp.asarray(sincos_2d((gh, gw), d))
        cls = self.param("cls_token", _normal02, (1, 1, d), jnp.float32)
        parts = [jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d))]
        if r:
            reg = self.param("register_tokens", nn.initializers.normal(1e-6), (1, r, d),
                             jnp.float32)
            parts.append(jnp.broadcast_to(reg.astype(self.dtype), (b, r, d)))
        # The mask token's parameter is made after the others: linen draws a module's
        # param keys in order, so the rest initialise as they do without it.
        x = self._masked(x, masks)
        x = (x + pos.astype(self.dtype)).reshape(b, gh * gw, d)
        x = jnp.concatenate(parts + [x], axis=1)  # (B, 1 + R + gh gw, D)

        norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32,
                            name="norm")
        feats = {}
        for i in range(self.depth):
            rate = self.drop_path * i / (self.depth - 1) if self.depth > 1 else 0.0
            x = Block(self.heads, self.mlp_ratio, self.layerscale, rate, self.dtype,
                      sow_attention=i == self.depth - 1, name=f"block{i + 1}")(
                x, (gh, gw), r, train)
            y = norm(x)
            feats[f"block{i + 1}"] = Tokens(cls=y[:, 0], registers=y[:, 1:1 + r],
                                            patches=y[:, 1 + r:].reshape(b, gh, gw, d))
        return feats
