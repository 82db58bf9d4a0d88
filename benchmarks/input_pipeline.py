r"""Input pipeline throughput: train_iterator on the real fashion_mnist, steady state.

    python benchmarks/input_pipeline.py [--data_dir DIR] [--batch_size 256] [--seconds 4]

Measures images/s for the in-memory and the lazy (array_record) source, with
0 and 2 worker processes, after a warm-up; prints them and writes
benchmarks/results/input_pipeline.json. Prepares the dataset first if needed.
"""
from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags

from ssl_jax.data import pipeline, sources
from ssl_jax.datasets import prepare

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir; default TFDS's.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_SECONDS = flags.DEFINE_float("seconds", 4.0, "Measuring time per setting.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        "input_pipeline.json"), "Results file.")


def throughput(source, workers: int, batch_size: int, seconds: float) -> float:
    """Steady-state images/s of train_iterator (worker start-up and warm-up excluded)."""
    it = pipeline.train_iterator(source, global_batch_size=batch_size, seed=0,
                                 worker_count=workers)
    for _ in range(10):  # warm-up: workers started, buffers filled
        next(it)
    n, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds or n < 20:
        batch = next(it)
        n += batch["image"].shape[0]
    del it
    return n / dt


def main(argv):
    del argv
    data_dir = _DATA_DIR.value or sources.default_data_dir()
    path, built = prepare.prepare("fashion_mnist", data_dir)
    print(f"fashion_mnist in {path}{' (built now)' if built else ''}")
    t = time.perf_counter()
    splits = {"memory": sources.open_source("fashion_mnist", "train", data_dir)}
    load_s = time.perf_counter() - t
    print(f"decoded the train split into memory in {load_s:.1f} s")
    splits["lazy"] = sources.open_source("fashion_mnist", "train", data_dir, memory_limit=0)
    results = []
    for kind, src in splits.items():
        for workers in (0, 2):
            ips = throughput(src, workers, _BATCH.value, _SECONDS.value)
            results.append({"source": kind, "worker_count": workers, "images_per_s": round(ips)})
            print(f"{kind:6s} source, {workers} workers: {ips:9.0f} images/s", flush=True)
    out = {
        "dataset": "fashion_mnist/train", "batch_size": _BATCH.value,
        "memory_decode_s": round(load_s, 2), "cpus": os.cpu_count(),
        "machine": platform.machine(), "python": platform.python_version(),
        "results": results,
    }
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
