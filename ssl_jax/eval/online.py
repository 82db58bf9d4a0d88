"""Online probes: accuracy watched *during* pretraining (solo-learn / BYOL style).

Named `online_linear` and `online_knn` everywhere (config, TensorBoard tags, log
lines) so they are never mistaken for the offline protocol of
`python -m ssl_jax.evaluate` (frozen encoder after training, probe trained to
convergence), which is what papers report. Off by default; opt in with
`--config.online.linear=True` and/or `--config.online.every_epochs=E`.

online_linear  a linear classifier trained alongside pretraining, one Adam step
               per train step, on stop_gradient(globally pooled final stage) of
               the batch's eval view (centre crop, encoder in eval mode: an
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

from ssl_jax.data import pipeline
from ssl_jax.eval import features, knn
from ssl_jax.methods import network


def linear_enabled(config) -> bool:
    return bool(config.get("online", {}).get("linear", False))


def _final_features_fn(config):
    """-> (final stage name, features.make_features_fn of the eval view for that
    stage alone: f(variables, images uint8) -> {stage: (B, C) float32})."""
    stage = network.final_stage(config.model)
    return stage, features.make_features_fn(network.make_encoder(config.model),
                                            features.eval_view_config(config), stages=(stage,))


def pooled_final(config):
    """-> f(variables, images (B, H, W, C) uint8) -> (B, C) float32: the eval view's
    globally pooled final stage, encoder in eval mode."""
    stage, fn = _final_features_fn(config)
    return lambda variables, images: fn(variables, images)[stage]


def _tx(config):
    return optax.adam(config.online.lr)


def init(config, feat_dim: int, num_classes: int) -> dict:
    """-> {"params": {"w": (C, K) zeros, "b": (K,) zeros}, "opt_state"}."""
    params = {"w": jnp.zeros((feat_dim, num_classes), jnp.float32),
              "b": jnp.zeros((num_classes,), jnp.float32)}
    return {"params": params, "opt_state": _tx(config).init(params)}


def _logits(params, feats):
    return feats @ params["w"] + params["b"]


def update(config, probe: dict, params, method_state, images, labels) -> tuple[dict, dict]:
    """One step of the online linear probe on a train batch (inside the jitted
    train step). images (B, H, W, C) uint8, labels (B,) int32 -> (new probe
    state, {"online_linear/loss", "online_linear/train_top1"})."""
    variables = jax.lax.stop_gradient(network.encoder_variables(params, method_state))
    feats = jax.lax.stop_gradient(pooled_final(config)(variables, images))

    def loss_fn(p):
        logits = _logits(p, feats)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return ce, jnp.mean(jnp.argmax(logits, -1) == labels) * 100.0
    (loss, top1), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe["params"])
    updates, opt_state = _tx(config).update(grads, probe["opt_state"], probe["params"])
    new = {"params": optax.apply_updates(probe["params"], updates), "opt_state": opt_state}
    return new, {"online_linear/loss": loss, "online_linear/train_top1": top1}


class Evaluator:
    """The periodic online evaluation of the train loop: holds the test split
    and the compiled feature function between calls."""

    def __init__(self, config, train_source, mesh):
        self.config, self.mesh = config, mesh
        self.train_source = train_source
        self.test_source = pipeline.open_source(config.dataset, config.eval.test_split,
                                                config.data_dir)
        self.num_classes = pipeline.dataset_info(config.dataset, config.data_dir)["num_classes"]
        # One function object for the run: features.extract compiles it once.
        self.stage, self.fn = _final_features_fn(config)

    def __call__(self, state) -> dict[str, float]:
        """-> {"online_knn/top1", and with the linear probe "online_linear/top1"} (%)."""
        c = self.config
        variables = network.encoder_variables(state["params"], state["method_state"])
        kw = dict(batch_size=c.eval.batch_size, mesh=self.mesh)
        xtr, ytr = features.extract(self.fn, variables, self.train_source,
                                    max_examples=c.online.knn_train_examples, **kw)
        xte, yte = features.extract(self.fn, variables, self.test_source, **kw)
        xtr, xte = xtr[self.stage], xte[self.stage]
        r = knn.knn_classify(xtr, ytr, xte, yte, num_classes=self.num_classes,
                             k=c.eval.knn.k, temperature=c.eval.knn.temperature)
        out = {"online_knn/top1": float(r["top1"])}
        if "online" in state:
            params = jax.device_get(state["online"]["params"])
            pred = np.argmax(_logits(params, xte), -1)
            out["online_linear/top1"] = float(np.mean(pred == yte) * 100.0)
        return out
