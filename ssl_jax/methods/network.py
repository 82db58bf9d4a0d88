"""Encoder + projection head as one linen module, and applying it purely.

Every method keeps its encoder under params["encoder"] and its BN statistics
under state["batch_stats"]["encoder"], so evaluators and export read any
method's encoder the same way (`encoder_variables`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import models
from ssl_jax.errors import UserError
from ssl_jax.models.heads import projection_head

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def encoder_kwargs(model_cfg) -> dict:
    return {k: v for k, v in model_cfg.items() if k != "name"}


def final_stage(model_cfg) -> str:
    """The stage the head and the default evaluators read, e.g. "block4", "stage4"."""
    return models.final_stage(model_cfg.name, **encoder_kwargs(model_cfg))


def make_encoder(model_cfg, bn_groups: int | None = None) -> nn.Module:
    """The encoder named by config.model.name, with the other fields as kwargs."""
    kwargs = encoder_kwargs(model_cfg)
    if "dtype" in kwargs:
        if kwargs["dtype"] not in DTYPES:
            raise UserError(f"config.model.dtype={kwargs['dtype']!r}: use one of {sorted(DTYPES)}.")
        kwargs["dtype"] = DTYPES[kwargs["dtype"]]
    if bn_groups is not None:
        kwargs["bn_groups"] = bn_groups
    return models.make_encoder(model_cfg.name, **kwargs)


class EncoderHead(nn.Module):
    """images (B, H, W, C) float32 -> (features {stage: (B, h, w, c) or models.Tokens},
    z (B, D) float32).

    The head reads the final stage's summary: a map's global average, a ViT's class token.
    """
    encoder: nn.Module
    head: nn.Module
    stage: str

    def __call__(self, x, train: bool):
        feats = self.encoder(x, train=train)
        pooled = models.summary(feats[self.stage])
        return feats, self.head(pooled, train=train)


def make_network(config, bn_groups: int | None = None) -> EncoderHead:
    """The encoder and config.head's projection head (models/heads.projection_head:
    its hidden_bn / out_bn say whose head it is), BN of both in bn_groups groups."""
    return EncoderHead(encoder=make_encoder(config.model, bn_groups),
                       head=projection_head(config.head, bn_groups or 1),
                       stage=final_stage(config.model))


def apply(net: nn.Module, params, batch_stats, x, train: bool = True) -> tuple[Any, Any, Any]:
    """Pure forward pass: returns (features, z, new_batch_stats)."""
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
        feats, z = net.apply(variables, x, train=False)
        return feats, z, batch_stats
    (feats, z), updates = net.apply(variables, x, train=True, mutable=["batch_stats"])
    return feats, z, updates["batch_stats"]


def init(net: nn.Module, rng, x) -> tuple[Any, Any]:
    """x: one example batch of the network's input. Returns (params, batch_stats)."""
    variables = jax.jit(lambda r, v: net.init(r, v, train=True))(rng, x)
    return variables["params"], variables.get("batch_stats", {})


def encoder_variables(params, state) -> dict:
    """The frozen-encoder variables any evaluator needs, for every method."""
    return {"params": params["encoder"], "batch_stats": state["batch_stats"]["encoder"]}
