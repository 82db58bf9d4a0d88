r"""End-to-end pretraining speed, ssl_jax vs the same pretraining the PyTorch way.

    python benchmarks/end_to_end.py [--methods simclr,moco,rotnet,pirl] [--steps 20]
                                    [--warmup 5] [--data_dir DIR] [--side both|jax|torch]

The number users feel: source images per second of real pretraining on the
prepared fashion_mnist, each method with its Fashion-MNIST config
(configs/<method>.py:dataset=fashion_mnist: the same batch, model, loss and
optimizer on both sides), steady state, median over --steps steps after
--warmup untimed ones:
  ssl_jax  the trainer's grain iterator over the split decoded in memory ->
           host-to-device -> the trainer's jitted step (views made on device,
           forward, backward, update), one step at a time;
  PyTorch  benchmarks/torch_peer.py: a DataLoader (2 workers) making each image's
           views with PIL/NumPy, then the eager step; an iteration is
           next(loader) + step.
"Data wait" is the share of step time spent getting the next batch (ssl_jax:
next(iterator) and the copy to the device; PyTorch: next(loader)). Both sides
read the same arrays: the parent decodes the split with ssl_jax.data.pipeline
and hands them to the PyTorch process (measure.py: one process per side).
Prints a table and writes benchmarks/results/end_to_end.json.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

import jax_step  # benchmarks/*.py: Python imports from a script's own folder
import measure
from ssl_jax import parallel
from ssl_jax.data import pipeline, sources
from ssl_jax.datasets import prepare

_METHODS, _STEPS, _WARMUP, _DATA_DIR, _SIDE, _OUT = measure.define_flags(
    ["simclr", "moco", "rotnet", "pirl"], "end_to_end.json", "steps")
_WORKERS = flags.DEFINE_integer("torch_workers", 2, "The PyTorch peer's DataLoader workers.")
_IMAGES = flags.DEFINE_string("images", None, "(--side=torch) the train images as .npy; "
                              "default: decode the split.")


def _side_summary(iter_s: list[float], wait_s: list[float], batch: int) -> dict:
    out = measure.summary(iter_s, batch)
    out["data_wait_share"] = round(sum(wait_s) / sum(iter_s), 4)
    out["data_wait_median_ms"] = round(statistics.median(wait_s) * 1e3, 2)
    return out


def jax_side(method: str, source, data_dir: str, steps: int, warmup: int) -> dict:
    config = measure.config(method, data_dir)
    it = pipeline.train_iterator(source, global_batch_size=config.batch_size, seed=0,
                                 worker_count=config.data.worker_count)
    setup = jax_step.Setup(config, len(source), next(it)["image"])
    state = setup.new_state()
    with jax.set_mesh(setup.mesh):
        batch = parallel.global_batch(next(it), setup.mesh)
        t = time.perf_counter()
        step = setup.train_step().lower(state, batch).compile()
        compile_s = time.perf_counter() - t
        box, waits = {"state": state}, []

        def one():
            t0 = time.perf_counter()
            b = parallel.global_batch(next(it), setup.mesh)
            waits.append(time.perf_counter() - t0)
            box["state"], metrics = step(box["state"], b)
            jax.block_until_ready(metrics)
            box["loss"] = metrics["loss"]

        times = measure.steady(one, steps, warmup)
    out = _side_summary(times, waits[warmup:], config.batch_size)
    out.update(compile_s=round(compile_s, 1), params=setup.n_params(box["state"]),
               loss=round(float(box["loss"]), 4))
    return out


def torch_side(methods, images: np.ndarray, data_dir: str, steps: int, warmup: int,
               workers: int) -> dict:
    import torch_peer   # PyTorch only in the --side=torch process
    out = {}
    for method in methods:
        config = measure.config(method, data_dir)
        r = torch_peer.time_training(method, config, images, steps, warmup, workers)
        out[method] = _side_summary(r["iter_s"], r["wait_s"], config.batch_size)
        out[method].update(first_batch_s=round(r["first_batch_s"], 2),
                           params=torch_peer.n_params(method, config), loss=round(r["loss"], 4),
                           workers=workers)
    return out


def _table(rows) -> str:
    lines = ["| method | B | ssl_jax img/s | PyTorch img/s | ssl_jax / PyTorch | "
             "ssl_jax data wait | PyTorch data wait |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        j, t = r.get("ssl_jax"), r.get("torch")
        cell = lambda side, k, fmt: fmt.format(side[k]) if side else "-"  # noqa: E731
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "-"
        lines.append(f"| {r['method']} | {r['batch_size']} | {cell(j, 'per_s', '{:.0f}')} | "
                     f"{cell(t, 'per_s', '{:.0f}')} | {ratio} | "
                     f"{cell(j, 'data_wait_share', '{:.1%}')} | "
                     f"{cell(t, 'data_wait_share', '{:.1%}')} |")
    return "\n".join(lines)


def main(argv):
    del argv
    data_dir = _DATA_DIR.value or sources.default_data_dir()
    if _SIDE.value == "torch":   # the child: its results go to --out for the parent
        images = measure.train_images(_IMAGES.value, data_dir)
        measure.write_json(_OUT.value, torch_side(_METHODS.value, images, data_dir, _STEPS.value,
                                                  _WARMUP.value, _WORKERS.value))
        return
    host = measure.machine()
    prepare.prepare("fashion_mnist", data_dir)
    source = sources.open_source("fashion_mnist", "train", data_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images_path = os.path.join(tmp, "train_images.npy")
        np.save(images_path, source.image)
        for method in _METHODS.value:
            config = measure.config(method, data_dir)
            row = {"method": method, "batch_size": config.batch_size,
                   "ssl_jax": jax_side(method, source, data_dir, _STEPS.value, _WARMUP.value)}
            if _SIDE.value == "both":
                row["torch"] = measure.run_side(__file__, "torch", dict(
                    methods=method, steps=_STEPS.value, warmup=_WARMUP.value,
                    torch_workers=_WORKERS.value, data_dir=_DATA_DIR.value,
                    images=images_path))[method]
                row["ratio"] = round(row["ssl_jax"]["per_s"] / row["torch"]["per_s"], 3)
            rows.append(row)
            print(_table([row]).splitlines()[-1], flush=True)
    print(_table(rows))
    measure.write_json(_OUT.value, {
        "machine": host,
        "note": "images/s = source images per second (SimCLR/MoCo: 2 views each; RotNet: 4 "
                "rotations; PIRL: an image view + 9 tiles); median over steps_timed steps",
        "steps": _STEPS.value, "warmup": _WARMUP.value, "results": rows})
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
