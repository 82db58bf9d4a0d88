"""Online probes: accuracy watched *during* pretraining (solo-learn / BYOL style).

Named `online_linear` and `online_knn` everywhere (config, TensorBoard tags, log
lines) so they are never mistaken for the offline protocol of
`python -m ssl_jax.evaluate` (frozen encoder after training, probe trained to
convergence), which is what papers report. Off by default; opt in with
`--config.online.linear=True` and/or `--config.online.every_epochs=E`.

online_linear  a linear classifier trained alongside pretraining, one Adam step
               per train step, on stop_gradient(the final stage's default pool:
               a map's global average, a ViT's class token) of the batch's eval
               view (centre crop, encoder in eval mode: an
               extra forward pass of B images, ~1/6 of a SimCLR step's work).
               Its gradient never reaches the encoder. Its state lives in the
               train state (state["online"]), so it is checkpointed and resumes
               exactly. Logged every log line as online_linear/train_top1 (the
               train batch) and, at each periodic evaluation, as
               online_linear/top1 on the test split.
online_knn     every online.every_* : weighted kNN (k, temperature as the
               offline kNN) of the test split against the first
               online.knn_train_examples train images, frozen features of the
               current encoder; logged as online_knn/top1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_jax import errors
from ssl_jax import config as cfg_lib
from ssl_jax.data import decode, sources
from ssl_jax.eval import features, knn


def linear_enabled(config) -> bool:
    return bool(config.get("online", {}).get("linear", False))


def make(config, spec, units: dict, encoder_features) -> "OnlineProbes | None":
    """The train loop's online-probe hook for this config, or None when both probes
    are off. units: cfg_lib.steps' steps_per_epoch and batch_size; encoder_features:
    (final stage, f(variables, images uint8) -> {stage: (B, C)}) from the setup layer.
    Raises UserError when a probe is asked for on a dataset without labels."""
    every = cfg_lib.steps(config.get("online", {}), "every", **units)
    linear = linear_enabled(config)
    if not (every or linear):
        return None
    if not spec.num_classes:
        raise errors.UserError(
            f"The online probes need labels, and {config.dataset} has none: pass "
            "--config.online.linear=False and leave config.online.every_* unset.")
    return OnlineProbes(config, spec.num_classes, every, linear, *encoder_features)


def _tx(config):
    return optax.adam(config.online.lr)


def _logits(params, feats):
    return feats @ params["w"] + params["b"]


class OnlineProbes:
    """The hook: `init` and `update` run inside the jitted train step (the linear
    probe's state is state["online"]), `due` and `evaluate` in the loop."""

    def __init__(self, config, num_classes: int, every: int | None, linear: bool,
                 stage: str, features_fn):
        self.config, self.num_classes, self.every = config, num_classes, every
        self.stateful = linear  # only the linear probe keeps state in the train state
        self.stage, self.features_fn = stage, features_fn  # one object: compiled once
        self._test_source = None

    def _pooled(self, variables, images):
        return self.features_fn(variables, images)[self.stage]

    def init(self, variables, images) -> dict:
        """-> {"params": {"w": (C, K) zeros, "b": (K,) zeros}, "opt_state"}."""
        dim = jax.eval_shape(self._pooled, variables, images).shape[-1]
        params = {"w": jnp.zeros((dim, self.num_classes), jnp.float32),
                  "b": jnp.zeros((self.num_classes,), jnp.float32)}
        return {"params": params, "opt_state": _tx(self.config).init(params)}

    def update(self, probe: dict, variables, images, labels) -> tuple[dict, dict]:
        """One step of the online linear probe on a train batch. variables: the
        encoder's; images (B, H, W, C) uint8, labels (B,) int32 -> (new probe state,
        {"online_linear/loss", "online_linear/train_top1"})."""
        variables = jax.lax.stop_gradient(variables)
        feats = jax.lax.stop_gradient(self._pooled(variables, images))

        def loss_fn(p):
            logits = _logits(p, feats)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return ce, jnp.mean(jnp.argmax(logits, -1) == labels) * 100.0
        (loss, top1), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe["params"])
        updates, opt_state = _tx(self.config).update(grads, probe["opt_state"], probe["params"])
        new = {"params": optax.apply_updates(probe["params"], updates), "opt_state": opt_state}
        return new, {"online_linear/loss": loss, "online_linear/train_top1": top1}

    def due(self, step: int, last: bool) -> bool:
        return bool(self.every) and (step % self.every == 0 or last)

    def evaluate(self, variables, probe: dict | None, train_source, mesh) -> dict[str, float]:
        """-> {"online_knn/top1", and with the linear probe "online_linear/top1"} (%):
        every process extracts its share of the features; all get the numbers."""
        c = self.config
        if self._test_source is None:
            self._test_source = sources.open_source(c.dataset, c.eval.test_split, c.data_dir,
                                                    decode=decode.for_eval(c))
        kw = dict(batch_size=c.eval.batch_size, mesh=mesh)
        xtr, ytr = features.extract(self.features_fn, variables, train_source,
                                    max_examples=c.online.knn_train_examples, **kw)
        xte, yte = features.extract(self.features_fn, variables, self._test_source, **kw)
        xtr, xte = xtr[self.stage], xte[self.stage]
        r = knn.knn_classify(xtr, ytr, xte, yte, num_classes=self.num_classes,
                             k=c.eval.knn.k, temperature=c.eval.knn.temperature)
        out = {"online_knn/top1": float(r["top1"])}
        if probe is not None:
            pred = np.argmax(_logits(jax.device_get(probe["params"]), xte), -1)
            out["online_linear/top1"] = float(np.mean(pred == yte) * 100.0)
        return out
