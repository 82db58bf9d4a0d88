r"""Train-step throughput of the demo's methods, model and batch on this machine.

    python benchmarks/train_step.py [--methods simclr,moco] [--convs xla,im2col_wgrad]
                                    [--steps 20] [--data_dir DIR]

For each method, with the config the demo uses (configs/<method>.py:dataset=fashion_mnist):
  * step:       the jitted train step alone (on-device views + forward + backward +
                update) on a batch already on the device, median over --steps steps;
  * end_to_end: the same step fed by the real grain iterator over the prepared
                fashion_mnist (host batch -> device -> step), median per step;
  * input:      the iterator alone, images/s;
  * compile:    seconds to compile the step.
Each method runs once per convolution implementation in --convs (models/conv.py),
so the effect of the matmul weight gradient is measured side by side.
Prints them and writes benchmarks/results/train_step.json.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
from absl import app, flags

import measure  # benchmarks/measure.py: Python imports from a script's own folder
from ssl_jax import experiment, parallel
from ssl_jax.config import load_file
from ssl_jax.data import pipeline, sources
from ssl_jax.datasets import prepare

_METHODS = flags.DEFINE_list("methods", ["simclr", "moco"], "Methods (configs/<name>.py).")
_CONVS = flags.DEFINE_list("convs", ["xla", "im2col_wgrad"], "config.model.conv values.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per measurement (after 3 warm-up).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir; default TFDS's.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        "train_step.json"), "Results file.")


def _median_step_s(run_one, steps: int) -> float:
    return statistics.median(measure.steady(run_one, steps, warmup=3))


def bench(name: str, conv: str, data_dir: str, steps: int) -> dict:
    config = load_file(f"configs/{name}.py:dataset=fashion_mnist")
    config.data_dir = data_dir
    config.model.conv = conv
    mesh = parallel.make_mesh()
    exp = experiment.Experiment(config, experiment.data_spec(config), mesh)
    source = sources.open_source(config.dataset, config.train_split, data_dir)
    it = pipeline.train_iterator(source, global_batch_size=config.batch_size, seed=0,
                                 worker_count=config.data.worker_count)
    state, step_fn = exp.initial_state(), exp.train_step()
    with jax.set_mesh(mesh):
        batch = parallel.global_batch(next(it), mesh)
        t = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - t
        box = {"state": state}

        def device_only():
            box["state"], m = compiled(box["state"], batch)
            jax.block_until_ready(m)

        def end_to_end():
            b = parallel.global_batch(next(it), mesh)
            box["state"], m = compiled(box["state"], b)
            jax.block_until_ready(m)

        step_s = _median_step_s(device_only, steps)
        e2e_s = _median_step_s(end_to_end, steps)
        input_s = _median_step_s(lambda: next(it), steps)
    bsz = config.batch_size
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    return {"method": name, "model": config.model.to_dict(), "batch_size": bsz,
            "params_M": round(n_params / 1e6, 3), "compile_s": round(compile_s, 1),
            "step_ms": round(step_s * 1e3, 1), "step_images_per_s": round(bsz / step_s),
            "end_to_end_images_per_s": round(bsz / e2e_s),
            "input_images_per_s": round(bsz / input_s),
            "input_share_of_step": round(input_s / e2e_s, 4)}


def main(argv):
    del argv
    data_dir = _DATA_DIR.value or sources.default_data_dir()
    prepare.prepare("fashion_mnist", data_dir)
    rows = []
    for name, conv in [(n, c) for n in _METHODS.value for c in _CONVS.value]:
        r = bench(name, conv, data_dir, _STEPS.value)
        rows.append(r)
        print(f"{name:7s} {conv:13s} B={r['batch_size']}: step {r['step_ms']} ms = "
              f"{r['step_images_per_s']} img/s | end-to-end {r['end_to_end_images_per_s']} img/s"
              f" | input alone {r['input_images_per_s']} img/s | compile {r['compile_s']} s",
              flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "devices": [str(d) for d in jax.devices()],
           "cpus": os.cpu_count(), "machine": platform.machine(),
           "note": "images = source images per step (each gives 2 views)", "results": rows}
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
