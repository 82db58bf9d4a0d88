r"""Making the views alone: ssl_jax's jitted, vmapped view pipeline vs the
PyTorch peer's per-image host pipeline.

    python benchmarks/augment.py [--methods simclr,moco] [--steps 20] [--warmup 5]
                                 [--data_dir DIR] [--side both|jax|torch]

For each method (its Fashion-MNIST config), the views one training step makes
of config.batch_size uint8 source images (SimCLR, MoCo: two views each with the
method's recipe; RotNet: a light view in 4 rotations; PIRL: an image view and 9
jigsaw tiles), median over --steps batches after --warmup:
  ssl_jax  the method's `views` (augment.batch_views with its view config,
           jigsaw.batch_jigsaw for tiles), jitted, on a batch already on the
           device, a new key per call;
  PyTorch  torch_views' per-image PIL/NumPy transforms, the peer's DataLoader,
           with 2 worker processes and in the main process alone (num_workers=0):
           the time of next(loader).
Images/s counts source images, over the whole timed window (mean batch time:
two workers hand over batches in pairs, so single batch times alternate
between a full wait and none). Writes benchmarks/results/augment.json.
"""
from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

import measure  # benchmarks/measure.py: Python imports from a script's own folder
from ssl_jax import methods
from ssl_jax.data import sources
from ssl_jax.datasets import prepare

_METHODS, _STEPS, _WARMUP, _DATA_DIR, _SIDE, _OUT = measure.define_flags(
    ["simclr", "moco"], "augment.json", "batches")
_IMAGES = flags.DEFINE_string("images", None, "(--side=torch) the train images as .npy; "
                              "default: decode the split.")

TORCH_SETTINGS = {"torch_2_workers": 2, "torch_main_process": 0}


def jax_side(method: str, images: np.ndarray, data_dir: str, steps: int, warmup: int) -> dict:
    config = measure.config(method, data_dir)
    fn, key = methods.get(config.method).views, jax.random.key(0)
    batch = jax.device_put(images[:config.batch_size])
    make = jax.jit(lambda i, x: fn(jax.random.fold_in(key, i), x, config))
    t = time.perf_counter()
    make = make.lower(0, batch).compile()
    compile_s = time.perf_counter() - t
    box = {"i": 0}

    def one():
        box["i"] += 1
        jax.block_until_ready(make(box["i"], batch))

    out = measure.summary(measure.steady(one, steps, warmup), config.batch_size, "mean")
    out["compile_s"] = round(compile_s, 1)
    return out


def _loader_rate(method: str, config, images: np.ndarray, workers: int, steps: int,
                 warmup: int) -> dict:
    import torch_peer   # PyTorch only in the --side=torch process
    it = iter(torch_peer.loader(method, config, images, workers))
    # The iterator (and its workers) ends with this call, before the next setting.
    return measure.summary(measure.steady(lambda: next(it), steps, warmup), config.batch_size,
                           "mean")


def torch_side(methods, images: np.ndarray, data_dir: str, steps: int, warmup: int) -> dict:
    import torch
    torch.set_num_threads(os.cpu_count())
    out = {}
    for method in methods:
        config = measure.config(method, data_dir)
        out[method] = {name: _loader_rate(method, config, images, workers, steps, warmup)
                       for name, workers in TORCH_SETTINGS.items()}
    return out


def main(argv):
    del argv
    data_dir = _DATA_DIR.value or sources.default_data_dir()
    if _SIDE.value == "torch":   # the child: its results go to --out for the parent
        images = measure.train_images(_IMAGES.value, data_dir)
        measure.write_json(_OUT.value, torch_side(_METHODS.value, images, data_dir,
                                                  _STEPS.value, _WARMUP.value))
        return
    host = measure.machine()
    prepare.prepare("fashion_mnist", data_dir)
    images = sources.open_source("fashion_mnist", "train", data_dir).image
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train_images.npy")
        np.save(path, images)
        for method in _METHODS.value:
            config = measure.config(method, data_dir)
            row = {"method": method, "batch_size": config.batch_size,
                   "ssl_jax": jax_side(method, images, data_dir, _STEPS.value, _WARMUP.value)}
            if _SIDE.value == "both":
                row.update(measure.run_side(__file__, "torch", dict(
                    methods=method, steps=_STEPS.value, warmup=_WARMUP.value,
                    data_dir=_DATA_DIR.value, images=path))[method])
                for name in TORCH_SETTINGS:
                    row[f"ratio_vs_{name}"] = round(row["ssl_jax"]["per_s"] / row[name]["per_s"], 3)
            rows.append(row)
            print(f"{method:7s} B={config.batch_size}: ssl_jax {row['ssl_jax']['per_s']:.0f} img/s "
                  f"(compile {row['ssl_jax']['compile_s']} s)" + "".join(
                      f" | {name} {row[name]['per_s']:.0f} img/s" for name in TORCH_SETTINGS
                      if name in row), flush=True)
    measure.write_json(_OUT.value, {
        "machine": host, "note": "views of one training step; images/s = source images per "
        "second over the timed window (mean batch time); PyTorch: time of next(loader)",
        "steps": _STEPS.value, "warmup": _WARMUP.value, "results": rows})
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
