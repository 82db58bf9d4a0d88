"""Frozen features of every encoder stage for a whole split.

The encoder runs in eval mode (BN running statistics) on the deterministic
eval view (centre crop + normalisation of config.aug), batched and sharded
over the mesh; each stage is globally average-pooled to (N, C).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import augment, parallel
from ssl_jax.data import pipeline


def eval_view_config(config):
    aug = config.aug
    return augment.eval_view_config(crop_size=tuple(aug.crop_size), mean=tuple(aug.mean),
                                    std=tuple(aug.std))


def make_features_fn(encoder, view_cfg):
    """-> f(variables, images (B, H, W, C) uint8) -> {stage: (B, C) float32}."""
    def f(variables, images):
        x = augment.batch_views(jax.random.key(0), images, view_cfg)  # deterministic view
        feats = encoder.apply(variables, x, train=False)
        return {k: jnp.mean(v.astype(jnp.float32), axis=(1, 2)) for k, v in feats.items()}
    return f


def extract(features_fn, variables, source, *, batch_size: int, mesh,
            max_examples: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Runs features_fn over `source` (the first max_examples if > 0).

    Returns ({stage: (N, C) float32}, labels (N,) int32), in split order.
    """
    parallel.check_batch_size(batch_size, mesh, "eval.batch_size")
    repl, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def step(variables, batch):
        return features_fn(variables, batch["image"]), batch["label"], batch["mask"]
    # Replicated outputs: every process gets every row (multi-host safe).
    fn = jax.jit(step, in_shardings=(repl, shard), out_shardings=repl)
    variables = jax.device_put(variables, repl)
    n = len(source) if not max_examples else min(max_examples, len(source))
    chunks, labels = [], []
    for batch in pipeline.eval_batches(source, batch_size, num_examples=n,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()):
        batch = {k: batch[k] for k in ("image", "label", "mask")}
        out, label, mask = jax.device_get(fn(variables, parallel.global_batch(batch, mesh)))
        keep = np.asarray(mask, bool)
        chunks.append({k: np.asarray(v)[keep] for k, v in out.items()})
        labels.append(np.asarray(label)[keep])
    feats = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    return feats, np.concatenate(labels).astype(np.int32)


def calibrate_bn(encoder, view_cfg, variables, source, *, batch_size: int, mesh,
                 num_batches: int = 50) -> dict:
    """BN running statistics of `variables` re-estimated on the first
    num_batches * batch_size examples of `source` (train mode, eval view, no
    gradients); parameters unchanged. Returns new variables.

    For a randomly initialised encoder, whose running statistics are still the
    initial (0, 1): without this its eval-mode features would be badly scaled and
    the random baseline unfairly weak. BN's running averages use momentum 0.9,
    so after 50 batches the initial values weigh 0.9^50 < 1%.
    """
    parallel.check_batch_size(batch_size, mesh, "eval.batch_size")
    repl, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def step(variables, images):
        x = augment.batch_views(jax.random.key(0), images, view_cfg)
        _, updates = encoder.apply(variables, x, train=True, mutable=["batch_stats"])
        return dict(variables, batch_stats=updates["batch_stats"])
    fn = jax.jit(step, in_shardings=(repl, shard), out_shardings=repl)
    variables = jax.device_put(variables, repl)
    n = min(len(source), num_batches * batch_size) // batch_size * batch_size  # full batches only
    for batch in pipeline.eval_batches(source, batch_size, num_examples=n,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()):
        variables = fn(variables, parallel.global_batch({"image": batch["image"]}, mesh)["image"])
    return variables
