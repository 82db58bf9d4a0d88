"""Encoder + projection head as one linen module, and applying it purely.

Every method keeps its encoder under params["encoder"] and its BN statistics
under state["batch_stats"]["encoder"] (none for a ViT), so evaluators and export read any
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
from ssl_jax.views import multicrop

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def encoder_kwargs(model_cfg) -> dict:
    return {k: v for k, v in model_cfg.items() if k != "name"}


def final_stage(model_cfg) -> str:
    """The stage the head and the default evaluators read, e.g. "block4", "stage4"."""
    return models.final_stage(model_cfg.name, **encoder_kwargs(model_cfg))


def make_encoder(model_cfg, bn_groups: int | None = None, stochastic: bool = True) -> nn.Module:
    """The encoder named by config.model.name, with the other fields as kwargs.

    stochastic=False: without stochastic depth (a ViT's drop_path 0), for the copies that
    only embed: MoCo's key encoder (as DINO's teacher: no drop path), a bank's warm start.
    """
    kwargs = encoder_kwargs(model_cfg)
    if not stochastic and "drop_path" in kwargs:
        kwargs["drop_path"] = 0.0
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


def make_network(config, bn_groups: int | None = None, stochastic: bool = True) -> EncoderHead:
    """The encoder and config.head's projection head (models/heads.projection_head:
    its hidden_bn / out_bn say whose head it is), BN of both in bn_groups groups."""
    return EncoderHead(encoder=make_encoder(config.model, bn_groups, stochastic),
                       head=projection_head(config.head, bn_groups or 1),
                       stage=final_stage(config.model))


def rngs(rng) -> dict:
    """The rng streams of a training forward pass: "dropout" (a ViT's stochastic depth)
    from the step's key, none without one (nothing stochastic may then run)."""
    return {} if rng is None else {"dropout": rng}


def apply(net: nn.Module, params, batch_stats, x, train: bool = True,
          rng=None) -> tuple[Any, Any, Any]:
    """Pure forward pass: returns (features, z, new_batch_stats). rng: a key for the
    network's stochastic layers in training (a ViT's drop path); a ViT with drop_path > 0
    refuses to train without one."""
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
        feats, z = net.apply(variables, x, train=False)
        return feats, z, batch_stats
    (feats, z), updates = net.apply(variables, x, train=True, mutable=["batch_stats"],
                                    rngs=rngs(rng))
    # .get: a network without BN (a ViT under a BN-free head) has no statistics to update.
    return feats, z, updates.get("batch_stats", {})


def init_rngs(rng) -> dict:
    """net.init's streams: "params" the key itself (the same initialisation as before
    the other stream existed), "dropout" for a ViT's drop path in the traced train pass."""
    return {"params": rng, "dropout": jax.random.fold_in(rng, 1)}


def init(net: nn.Module, rng, x) -> tuple[Any, Any]:
    """x: one example batch of the network's input. Returns (params, batch_stats)."""
    variables = jax.jit(lambda r, v: net.init(init_rngs(r), v, train=True))(rng, x)
    return variables["params"], variables.get("batch_stats", {})


def encoder_variables(params, state) -> dict:
    """The frozen-encoder variables any evaluator needs, for every method."""
    # .get: a ViT has no BN statistics (the head's may still be there).
    return {"params": params["encoder"], "batch_stats": state["batch_stats"].get("encoder", {})}


def embed_crops(net: nn.Module, params, batch_stats, views: dict, rng=None):
    """The network's outputs of every crop of a multi-crop batch: views {"global": (B, G,
    ...), "local": (B, L, ...)} (views.multicrop) -> (z (B, G + L, D), new batch_stats).
    One call per resolution group, the global group first (the spec's order: a jitted
    dict comes back with its keys sorted), the BN statistics threaded from one call into
    the next, each call's stochastic depth (a ViT's) from its own key."""
    def encode(x, carry):
        stats, key = carry
        this = None  # no key: a network without stochastic layers
        if key is not None:
            key, this = jax.random.split(key)
        _, z, stats = apply(net, params, stats, x, train=True, rng=this)
        return z, (stats, key)

    groups = {name: views[name] for name in multicrop.GROUPS if name in views}
    z, (batch_stats, _) = multicrop.encode_groups(encode, groups, (batch_stats, rng))
    return jnp.concatenate([z[name] for name in groups], axis=1), batch_stats
