"""Frozen features of the encoder's stages for a whole split, cached on disk.

The encoder runs in eval mode (BN running statistics) on the deterministic
eval view (centre crop + normalisation of config.aug), batched and sharded
over the mesh; each stage's (H, W, C) map is pooled to a vector: globally
averaged to (C,) by default, or, as VISSL's probes of conv stages do,
averaged over an s x s grid and flattened to (s * s * C,) (pool "avg{s}x{s}").

Extracting a 60000-image split is the slow part of an evaluation, so the
features go to an .npz whose name holds a digest of everything they depend on
(cache_key); a later run with the same inputs reads them back.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ssl_jax import parallel, storage
from ssl_jax.data import decode, pipeline
from ssl_jax.errors import UserError
from ssl_jax.models.tokens import Tokens, summary
from ssl_jax.views import augment, canvas, ops

POOLS = ("global", "avg2x2", "avg3x3")  # the usual ones; any avg{s}x{s} works


def eval_view_config(config):
    """The deterministic view every frozen-feature consumer uses: centre crop
    resized to config.eval.crop_size (default: the training crop,
    config.aug.crop_size) and config.aug's normalisation."""
    aug = config.aug
    # A larger eval size than the training crop is FixRes's point: random-resized
    # crops show objects larger than a full-image view at the same size does.
    return augment.eval_view_config(crop_size=decode.eval_crop_size(config),
                                    mean=tuple(aug.mean), std=tuple(aug.std))


def pool_grid(pool: str) -> int | None:
    """'global' -> None; 'avg{s}x{s}' -> s >= 1. Anything else: ValueError."""
    if pool == "global":
        return None
    m = re.fullmatch(r"avg(\d+)x(\d+)", pool)
    if not m or m[1] != m[2] or int(m[1]) < 1:
        raise UserError(f"pool={pool!r}: use 'global' or 'avg{{s}}x{{s}}' with s >= 1 "
                         f"(e.g. {', '.join(POOLS)}).")
    return int(m[1])


def _bins(length: int, size: int) -> np.ndarray:
    """(size, length) float32: row i averages [floor(i L / size), ceil((i + 1) L / size))."""
    w = np.zeros((size, length), np.float32)
    for i in range(size):
        lo, hi = i * length // size, -(-(i + 1) * length // size)
        w[i, lo:hi] = 1.0 / (hi - lo)
    return w


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """x: (B, H, W, C) -> (B, size, size, C) float32, torch's AdaptiveAvgPool2d.

    Bin i of an axis of length L averages [floor(i L / size), ceil((i + 1) L / size)):
    the bins tile the axis when size divides L and overlap by a row when it
    does not (3 -> 2: rows {0, 1} and {1, 2}); size > L repeats rows.
    """
    wh, ww = _bins(x.shape[1], size), _bins(x.shape[2], size)
    # Two small matmuls with constant weights; HIGHEST: TPUs would otherwise
    # round the float32 features to bfloat16 inside the dot.
    return jnp.einsum("ih,bhwc,jw->bijc", wh, x.astype(jnp.float32), ww,
                      precision=jax.lax.Precision.HIGHEST)


def pool_stage(x: jax.Array, pool: str = "global") -> jax.Array:
    """One stage's map x: (B, H, W, C) -> (B, D) float32: D = C for 'global' (the
    mean over H, W), D = s * s * C for 'avg{s}x{s}' (grid cells row-major, then C)."""
    s = pool_grid(pool)
    if isinstance(x, Tokens):  # minimal, until the ViT pools: the class token, or the patches' grid
        if s is None:
            return summary(x)
        x = x.patches
    if s is None:
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    y = adaptive_avg_pool(x, s)
    return y.reshape(y.shape[0], -1)


def make_features_fn(encoder, view_cfg, pool: str = "global", stages=None):
    """-> f(variables, images (B, H, W, C) uint8) -> {stage: (B, D) float32}, D as
    pool_stage gives it, for `stages` (None: every stage the encoder returns)."""
    pool_grid(pool)  # a bad name fails here, not at trace time

    def f(variables, images):
        x = augment.batch_views(jax.random.key(0), images, view_cfg)  # deterministic view
        feats = encoder.apply(variables, x, train=False)
        return {k: pool_stage(v, pool) for k, v in feats.items()
                if stages is None or k in stages}
    return f


def light_augment(keys, images, crop_scale=(0.35, 1.0), crop_ratio=(3 / 4, 4 / 3),
                  flip_p: float = 0.5, size=None):
    """The linear probe's optional train-time augmentation (VISSL's and MoCo's
    linear evaluation: random resized crop + horizontal flip), on raw images so
    that any features_fn -- an export's too -- can take the result.

    keys: (B,) one key per image; images: (B, H, W, C) or (B, H, W) uint8, or a
    canvas.Canvas of images of varying size -> uint8 of the same shape, or (B,
    *size, C) when `size` (h, w) is given (a canvas needs it): each image cropped
    (area fraction in crop_scale, aspect ratio in crop_ratio, of the whole image:
    a canvas's valid region), resized and rounded, then flipped with
    probability flip_p.
    """
    pixels, hw = canvas.split(images)
    out = tuple(size) if size is not None else pixels.shape[1:3]

    def one(key, image, valid):
        k_crop, k_flip = jax.random.split(key)
        x = image.astype(jnp.float32) / 255.0
        x = x[..., None] if x.ndim == 2 else x
        x = ops.random_resized_crop(k_crop, x, out, tuple(crop_scale), tuple(crop_ratio),
                                    hw=valid)
        x = ops.random_flip(k_flip, x, flip_p)
        return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8).reshape(
            out + image.shape[2:])
    if hw is None:
        return jax.vmap(lambda k, x: one(k, x, None))(keys, pixels)
    return jax.vmap(one)(keys, pixels, hw)


@functools.lru_cache(maxsize=16)
def _jitted_step(features_fn, mesh, transform=None):
    """The jitted batch step of `extract`, one per (features_fn, mesh, transform):
    a jit of a fresh closure per call would compile again for every split and
    every online evaluation."""
    repl, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def step(variables, batch):
        images = canvas.images_of(batch)  # a canvas only ever goes to a transform
        if transform is not None:  # image i of the split gets fold_in(key(seed), i)
            keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(
                batch["seed"], batch["index"])
            images = transform(keys, images)
        return features_fn(variables, images), batch["label"], batch["mask"]
    # Replicated outputs: every process gets every row (multi-host safe).
    return jax.jit(step, in_shardings=(repl, shard), out_shardings=repl)


def extract(features_fn, variables, source, *, batch_size: int, mesh,
            max_examples: int = 0, transform=None,
            seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Runs features_fn over `source` (the first max_examples if > 0).

    transform: None, or f(keys (B,), images uint8) -> images uint8 applied
    before features_fn (e.g. light_augment); image i of the split gets the key
    fold_in(key(seed), i), so its view depends on neither the batch size nor
    the number of hosts. A source of canvases (decode.ToCanvas: images of varying
    size) is for a transform: it gets them as canvas.Canvas images.
    Returns ({stage: (N, D) float32}, labels (N,) int32), in split order.
    """
    parallel.check_batch_size(batch_size, mesh, "eval.batch_size")
    fn = _jitted_step(features_fn, mesh, transform)
    variables = jax.device_put(variables, parallel.replicated(mesh))
    n = len(source) if not max_examples else min(max_examples, len(source))
    chunks, labels = [], []
    for batch in pipeline.eval_batches(source, batch_size, num_examples=n,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()):
        batch = {k: batch[k] for k in ("image", "image_hw", "label", "mask", "index")
                 if k in batch}
        batch["seed"] = np.full(batch["index"].shape, seed, np.int32)
        out, label, mask = jax.device_get(fn(variables, parallel.global_batch(batch, mesh)))
        keep = np.asarray(mask, bool)
        chunks.append({k: np.asarray(v)[keep] for k, v in out.items()})
        labels.append(np.asarray(label)[keep])
    feats = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    return feats, np.concatenate(labels).astype(np.int32)


def split_features(fn, variables, source, split: str, limit: int, *, batch_size: int, mesh,
                   stages, cache_dir: str, step: int, key: dict | None, transform=None,
                   seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({stage: (N, D)}, labels (N,)) of one split (its first `limit` rows if > 0):
    read from cache_dir when an earlier run left them there, else extracted
    (`extract`, with transform and seed) and saved there. key: everything the
    features depend on (the caller's, incl. any transform's settings), None
    for no cache. variables: the encoder's, or a function returning them, called
    only when extracting (e.g. a random init's BN calibration)."""
    path = got = None
    if key is not None:
        path = cache_path(cache_dir, step, split, cache_key(split=split, max_examples=limit, **key))
        got = load_cached(path, stages)
        # Extraction is collective: either every process extracts or none does.
        if not parallel.every_process(got is not None):
            got = None
    what = split if transform is None else f"{split}, augmented view seed {seed}"
    if got is not None:
        print(f"features: cached ({what}, {path})", flush=True)
        return got
    variables = variables() if callable(variables) else variables
    with jax.set_mesh(mesh):
        got = extract(fn, variables, source, batch_size=batch_size, mesh=mesh,
                      max_examples=limit, transform=transform, seed=seed)
    if path is not None:
        save_cached(path, *got)
    print(f"features: extracted ({what}{f', saved to {path}' if path else ''})", flush=True)
    return got


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


# ---------------------------------------------------------------------- cache

CACHE_VERSION = 1  # bump when the file layout or what a key covers changes


def fingerprint(variables) -> str:
    """sha256 hex of every leaf's path, dtype, shape and bytes: the weights'
    identity, so a retrained run with the same step number misses the cache."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]:
        leaf = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}".encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def cache_key(**parts) -> str:
    """16 hex digits of sha256 over parts (JSON-able: tuples count as lists)."""
    text = json.dumps(dict(parts, cache_version=CACHE_VERSION), sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(cache_dir: str, step: int, split: str, key: str) -> str:
    """cache_dir/step{step}_{split}_{key}.npz, the split's slicing syntax made file-safe."""
    return os.path.join(cache_dir, f"step{step}_{re.sub(r'[^A-Za-z0-9_.-]', '_', split)}_{key}.npz")


def load_cached(path: str, stages) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """({stage: (N, D)}, labels (N,)) from `path`, or None when it is absent, or
    unreadable or incomplete (logged: the caller recomputes and overwrites it)."""
    path = storage.path(path)  # local, or a bucket's gs://
    if not path.exists():
        return None
    try:
        with path.open("rb") as raw, np.load(raw, allow_pickle=False) as f:
            labels = f["label"]
            feats = {s: f[f"feat/{s}"] for s in stages}
        if any(len(v) != len(labels) for v in feats.values()):
            raise ValueError("rows differ between features and labels")
        return feats, labels
    except Exception as e:  # noqa: BLE001 -- truncated zip, missing key, bad header, ...
        logging.warning("Ignoring the feature cache %s (%s: %s); extracting again.", path,
                        type(e).__name__, e)
        return None


def save_cached(path: str, feats: dict[str, np.ndarray], labels: np.ndarray) -> None:
    """Writes the .npz atomically (temporary file, then os.replace): a run killed
    mid-write leaves no half file under `path`. Process 0 only."""
    if jax.process_index() != 0:
        return
    path = storage.path(path)  # local, or a bucket's gs://
    tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            np.savez(f, label=labels, **{f"feat/{k}": v for k, v in feats.items()})
        storage.replace(tmp, path)
    except OSError as e:  # a read-only or full disk costs the cache, not the evaluation
        logging.warning("Could not write the feature cache %s: %s", path, e)
        if tmp.exists():
            tmp.unlink()
