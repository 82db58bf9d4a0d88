"""The method contract: what the train loop and the setup layer may call.

A method is a module of pure functions gathered into one `Method` value:

  views(rng, images, config) -> {name: array}
      images: (B, H, W, C) uint8, the global batch; the on-device inputs of the loss
      (augmented views, tiles, rotations), made inside the jitted step.
  init(rng, views, config, spec) -> (params, state)
      params: what gradients train (the encoder under params["encoder"]);
      state: what they do not (BN statistics under state["batch_stats"]["encoder"],
      queues, memory banks, key encoders).
  loss(params, state, views, batch, rng, config, spec) -> (loss, (metrics, new_state))
      batch: {"index": (B,) int32 dataset indices, and "label": (B,) int32 only for a
      method with uses_labels}: the data's facts, apart from the images' views.
      With gradient accumulation (config.accumulate_steps = A > 1) the loop calls
      the loss on A micro-batches of B / A images each, threading `state` through
      them: every view's leading axis must be a whole number of rows per image
      (B, or cB with an image's c rows adjacent, as RotNet's rotations), so that
      slicing it per image gives the micro-batch's views.

Optional hooks, with defaults, declared in the `Method` (never probed with hasattr):

  check(config, spec, mesh)       raises errors.UserError before anything compiles
  before_step(params, state, config) -> state
                                  once per optimizer step, before the loss: what must
                                  move once per update, however many micro-batches
                                  (config.accumulate_steps) the loss is called on, e.g.
                                  MoCo's key-encoder momentum update (default: none)
  state_sharding(shapes, mesh)    shardings of the state (default: replicated)
  uses_labels                     the loop hands batch["label"] only to such a method
  takes_pairs                     its views accept a views.pair.Pair (two images per
                                  example: video positives, config.video) and make one
                                  view from each (two-view methods: SimCLR, MoCo)
  warm_start                      a `WarmStart`: fill state from the initial network's
                                  embeddings of the train split before step 1

spec: a dataspec.DataSpec (num_examples, image_shape, num_classes) read from the
prepared dataset by the setup layer: a method never opens a dataset.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from ssl_jax import parallel


def no_check(config, spec, mesh) -> None:
    del config, spec, mesh


def no_state_update(params, state, config):
    del params, config
    return state


def no_after_step(params, state, config, spec):
    del params, config, spec
    return state


# The trained encoder: params["encoder"], its BN statistics in the method state.
ENCODER_AT = (("params", "encoder"), ("method_state", "batch_stats", "encoder"))


def trained_encoder(config):
    del config
    return ENCODER_AT


def no_watch(config, spec):
    del config, spec


def replicated(shapes, mesh):
    """Every leaf of the method state on every device."""
    return jax.tree.map(lambda _: parallel.replicated(mesh), shapes)


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """State filled from the initial network before step 1 (once; a resume keeps its state).

    wanted(config) -> bool: whether this run asks for it.
    embed(params, state, x, config) -> (B, D) float32: x is the eval view of a batch of
      the train split (B, h, w, C) float32; called through the setup layer's feature
      extraction, batch size config.batch_size.
    write(state, index, values, config, spec) -> state: index (B,) int32 dataset
      indices of one global batch (-1: padding, to drop), values (B, D) their
      embeddings; jitted by the setup layer with the batch sharded over the mesh.
    """
    wanted: Callable[[Any], bool]
    embed: Callable
    write: Callable


@dataclasses.dataclass(frozen=True)
class Method:
    views: Callable
    init: Callable
    loss: Callable
    check: Callable = no_check
    before_step: Callable = no_state_update
    after_step: Callable = no_after_step
    encoder_at: Callable = trained_encoder
    watch: Callable = no_watch
    state_sharding: Callable = replicated
    uses_labels: bool = False
    takes_pairs: bool = False
    warm_start: WarmStart | None = None
