"""Encoders and heads; the registry of encoder names lives here.

Every encoder maps images (B, H, W, C) to a dict of stage features
{stage: (B, h, w, c)} (a ConvNet's maps) or {stage: Tokens} (a transformer's
class, patch and register tokens: tokens.py), so probes can read any stage;
`final_stage(name)` is the one the projection heads and the default evaluators read.
"cmc_lab" (split.py) wraps another encoder: two half-width copies over the L and ab of Lab.
"""
from __future__ import annotations

import functools

import flax.linen as nn

from ssl_jax.errors import UserError
from ssl_jax.models.convnet import ConvNet
from ssl_jax.models.heads import LinearHead, MLPHead
from ssl_jax.models.nin import NIN
from ssl_jax.models.norm import BatchNorm
from ssl_jax.models.resnet import ResNet
from ssl_jax.models.split import LabSplit, cmc_lab
from ssl_jax.models.split import stages as split_stages
from ssl_jax.models.tokens import Tokens, summary
from ssl_jax.models.vit import ViT

# The ViT sizes of DeiT / DINO; patch and img_size come from the config.
VIT_SIZES = {
    "vit_tiny": dict(width=192, depth=12, heads=3),
    "vit_small": dict(width=384, depth=12, heads=6),
    "vit_base": dict(width=768, depth=12, heads=12),
}

ENCODERS = {
    "convnet": ConvNet,
    "resnet18": functools.partial(ResNet, depth=18),
    "resnet34": functools.partial(ResNet, depth=34),
    "resnet50": functools.partial(ResNet, depth=50),
    "resnet101": functools.partial(ResNet, depth=101),
    "nin": NIN,
    "vit": ViT,
    **{name: functools.partial(ViT, **size) for name, size in VIT_SIZES.items()},
    # CMC's L | ab halves of config.model.encoder; make_encoder is defined below.
    "cmc_lab": lambda **kwargs: cmc_lab(make_encoder, **kwargs),
}
VITS = ("vit", *VIT_SIZES)

STAGES = {
    "convnet": lambda widths=(32, 64, 128, 256), **_: [f"block{i + 1}" for i in range(len(widths))],
    **{name: lambda **_: ["stem", "stage1", "stage2", "stage3", "stage4"]
       for name in ENCODERS if name.startswith("resnet")},
    "nin": lambda num_blocks=4, **_: [f"block{i + 1}" for i in range(num_blocks)],
    # Every block (each through the final LayerNorm): a ViT's depth is its stages.
    **{name: lambda depth=12, **_: [f"block{i + 1}" for i in range(depth)] for name in VITS},
    "cmc_lab": lambda encoder="resnet50", **kwargs: split_stages(stages(encoder, **kwargs)),
}


def _check(name: str):
    if name not in ENCODERS:
        raise UserError(f"Unknown encoder {name!r} (config.model.name); valid: {sorted(ENCODERS)}.")


def make_encoder(name: str, **kwargs) -> nn.Module:
    """The encoder called `name`, built with kwargs (e.g. width, stem, dtype, bn_groups)."""
    _check(name)
    try:
        return ENCODERS[name](**kwargs)
    except TypeError as e:
        raise UserError(f"config.model for {name!r}: {e}") from None


def stages(name: str, **kwargs) -> list[str]:
    """Stage names `name` returns, shallow to deep."""
    _check(name)
    return STAGES[name](**kwargs)


def final_stage(name: str, **kwargs) -> str:
    return stages(name, **kwargs)[-1]


__all__ = ["BatchNorm", "ConvNet", "ENCODERS", "LabSplit", "LinearHead", "MLPHead", "NIN", "ResNet",
           "Tokens", "VITS", "VIT_SIZES", "ViT",
           "final_stage", "make_encoder", "stages", "summary"]
