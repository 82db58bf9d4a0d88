"""CMC's split encoder over the L and ab channels of Lab (Tian, Krishnan & Isola 2019,
"Contrastive Multiview Coding"; HobbitLong/CMC models/resnet.py `ResNetV1`: two ResNets of
width 0.5, `l_to_ab` on the 1-channel L and `ab_to_l` on the 2-channel ab, and
LinearProbing.py, which probes `torch.cat((feat_l, feat_ab), dim=1)`).

Registered as "cmc_lab" (models/__init__.py): config.model = {name: "cmc_lab", encoder:
NAME, the encoder's own fields at FULL width, mean, std}. Each half is NAME at half the
width (a ResNet's or NIN's `width` x 0.5, a ConvNet's `widths` halved), so the pair costs
about what one encoder of the full width does on 3 channels.

The input is the usual normalised RGB view (B, H, W, 3) (so views, eval views, exports
and probes stay the same as any encoder's); mean / std are that normalisation's, undone
here before Lab (views/channels.py). The output: every stage of the encoder as the
channel concatenation [L half, ab half] under its own name (what every evaluator reads
by default, as the paper evaluates), and each half alone as "l_<stage>" / "ab_<stage>".
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.errors import UserError
from ssl_jax.views import channels

HALVES = ("l", "ab")


def half_kwargs(encoder: str, kwargs: dict) -> dict:
    """The encoder's kwargs at full width -> one half's: ConvNet widths // 2, ResNet / NIN
    width x 0.5 (the authors' `resnet50(in_channel=1, width=0.5)`)."""
    if encoder == "convnet":
        widths = kwargs.get("widths", (32, 64, 128, 256))
        return dict(kwargs, widths=tuple(max(1, int(w) // 2) for w in widths))
    if encoder.startswith("resnet") or encoder == "nin":
        return dict(kwargs, width=0.5 * kwargs.get("width", 1.0))
    raise UserError(f"model=cmc_lab over encoder={encoder!r}: the L and ab halves are "
                    "built for the ConvNet, ResNets and NIN (their widths halve); use "
                    "one of those (config.model.encoder).")


def stages(encoder_stages: Sequence[str]) -> list[str]:
    """The split model's stage names from its encoder's (shallow to deep): each half's
    ("l_<s>", then "ab_<s>"), then the concatenations under the encoder's own names, last,
    so that the deepest concatenation is the final stage the heads' and evaluators'
    defaults read."""
    return [f"{h}_{s}" for h in HALVES for s in encoder_stages] + list(encoder_stages)


class LabSplit(nn.Module):
    """images (B, H, W, 3), normalised RGB ((rgb - mean) / std) -> {stage: (B, h, w,
    c_l + c_ab) = concat[l_stage, ab_stage], "l_<stage>": (B, h, w, c_l), "ab_<stage>":
    (B, h, w, c_ab)}.

    l_encoder sees CMC's normalised L (B, H, W, 1), ab_encoder its ab (B, H, W, 2); each
    keeps its own parameters and BN statistics (params["l_encoder"], ["ab_encoder"]).
    """
    l_encoder: nn.Module
    ab_encoder: nn.Module
    mean: Sequence[float]
    std: Sequence[float]

    def __call__(self, x, train: bool):
        if x.shape[-1] != 3:
            raise UserError(f"model=cmc_lab splits RGB images into L and ab; got {x.shape[-1]} "
                            "channel(s).")
        rgb = x.astype(jnp.float32) * jnp.asarray(self.std) + jnp.asarray(self.mean)
        l, ab = channels.split_lab(channels.normalize_lab(channels.rgb_to_lab(rgb)))
        halves = {"l": self.l_encoder(l, train=train), "ab": self.ab_encoder(ab, train=train)}
        out = {f"{h}_{s}": f for h, feats in halves.items() for s, f in feats.items()}
        for s in halves["l"]:
            out[s] = jnp.concatenate([halves["l"][s], halves["ab"][s]], axis=-1)
        return out


def cmc_lab(make_encoder: Callable[..., nn.Module], encoder: str = "resnet50",
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            **kwargs: Any) -> LabSplit:
    """The split model over `encoder` (its kwargs at full width, e.g. width, stem, dtype,
    bn_groups); mean / std: the RGB normalisation of the views it is given (config.aug's).
    make_encoder(name, **kwargs): the registry's (passed in: it imports this module)."""
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        raise UserError(f"model=cmc_lab needs the 3-channel RGB mean and std its input was "
                        f"normalised with (config.model.mean / std, config.aug's); got mean="
                        f"{mean!r}, std={std!r}.")
    half = half_kwargs(encoder, kwargs)
    return LabSplit(l_encoder=make_encoder(encoder, **half),
                    ab_encoder=make_encoder(encoder, **half),
                    mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
