r"""Per-device memory of the ImageNet presets (ResNet-50, ViT-S/16, ViT-B/16; 224 px),
without allocating it.

    python benchmarks/memory.py [--methods simclr,moco,pirl,npid,supervised,simclr:vit_small]
                                [--compile_batches 2] [--compile_methods simclr,moco]

A method is a preset, configs/<method>.py:dataset=imagenet2012 (ResNet-50), or
<method>:<model>, the same preset with model=<model> (the ViT presets: MoCo v3's recipe).

1. The train state, per device, at 8, 64 and 256 devices: the shapes come from
   `jax.eval_shape` of the Experiment's state initialiser (Experiment.shapes, the
   real state of configs/<method>.py:dataset=imagenet2012, nothing allocated) and
   each leaf's bytes are divided by the device count only where the Experiment's
   `state_sharding` shards it over the "data" axis (the memory bank's rows);
   everything else is replicated. Split into parameters, optimizer state, BN
   statistics, MoCo's key encoder and queue, the memory bank.
   ImageNet's train split: 1,281,167 images; the spec is given directly (no
   dataset on disk), with stored images of 256 x 256 x 3 (only the input batch's
   size depends on that; the views crop 224 px).
2. One train step's temporaries (activations kept for the backward pass, views,
   gradients): XLA's memory analysis of the step compiled for a mesh of 8
   simulated CPU devices (this script sets XLA_FLAGS when it is not set), at a
   per-device batch of --compile_batches images. The presets' per-device batch
   (e.g. 4096 / 256 = 16 for SimCLR) is too heavy to compile on a 2-core CPU, so
   this reports the temporaries per image; activations grow linearly with the batch
   (pass two sizes to see the slope). XLA:CPU's buffer assignment is not a GPU's or
   TPU's: read it as an estimate of their activation memory, not a measurement.

Prints the tables and writes benchmarks/results/memory.json.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # noqa: E402  (XLA_FLAGS must be set before jax is imported)
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from ssl_jax import experiment, parallel  # noqa: E402
from ssl_jax.config import load_file  # noqa: E402
from ssl_jax.dataspec import DataSpec  # noqa: E402

VITS = ["simclr:vit_small", "simclr:vit_base", "moco:vit_small", "moco:vit_base"]
_METHODS = flags.DEFINE_list("methods", ["simclr", "moco", "pirl", "npid", "supervised"] + VITS,
                             "Presets: configs/<name>.py:dataset=imagenet2012, or "
                             "<name>:<model> for model=<model> on it.")
_COMPILE_METHODS = flags.DEFINE_list("compile_methods", ["simclr", "moco", "pirl", "npid",
                                                         "supervised"] + VITS,
                                     "Methods whose train step is compiled (slow).")
_BATCHES = flags.DEFINE_list("compile_batches", ["2"], "Per-device batches to compile at.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "memory.json"),
    "Results file.")

IMAGENET = DataSpec(num_examples=1_281_167, image_shape=(256, 256, 3), num_classes=1000)
DEVICES = (8, 64, 256)
MiB = 2 ** 20


def preset(method: str):
    """"simclr" -> the ImageNet preset; "simclr:vit_small" -> it with model=vit_small."""
    name, _, model = method.partition(":")
    return load_file(f"configs/{name}.py:dataset=imagenet2012" + (f",model={model}" if model else ""))


def category(path: str) -> str:
    """A state leaf's key path -> the row of the table it counts in."""
    if path.startswith("['params']"):
        return "params"
    if path.startswith("['opt_state']"):
        return "optimizer"
    for key, name in (("['key_params']", "key encoder"), ("['key_batch_stats']", "key encoder"),
                      ("['batch_stats']", "BN statistics"), ("['queue']", "MoCo queue"),
                      ("['bank']", "memory bank")):
        if path.startswith("['method_state']" + key):
            return name
    return "other"  # step, queue pointer, log Z: bytes


def sharded_over(sharding, ndim: int) -> tuple[int, ...]:
    """Dimensions a NamedSharding splits over the data axis (the mesh has one axis)."""
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return tuple(d for d, axes in enumerate(spec)
                 if axes == parallel.AXIS or (isinstance(axes, tuple) and parallel.AXIS in axes))


def state_memory(method: str, mesh) -> dict:
    """-> {"devices": {n: {category: bytes per device}}, "leaves": ..., "batch_size"}."""
    config = preset(method)
    exp = experiment.Experiment(config, IMAGENET, mesh)
    leaves = jax.tree_util.tree_flatten_with_path(exp.shapes)[0]
    shardings = jax.tree.leaves(exp.state_sharding)
    out = {"batch_size": config.batch_size, "devices": {}, "sharded": []}
    for n in DEVICES:
        if config.batch_size % n:
            continue  # the preset's batch does not split over n devices
        row = {}
        for (path, leaf), sharding in zip(leaves, shardings):
            name = jax.tree_util.keystr(path)
            nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
            for d in sharded_over(sharding, leaf.ndim):
                assert leaf.shape[d] % n == 0, (name, leaf.shape, n)  # method.check's job
                nbytes //= n
                if n == DEVICES[0]:
                    out["sharded"].append(f"{name} {tuple(leaf.shape)} {leaf.dtype}")
            row[category(name)] = row.get(category(name), 0) + nbytes
        row["total"] = sum(row.values())
        out["devices"][n] = row
    return out


def step_memory(method: str, per_device: int, mesh) -> dict:
    """The train step compiled for `mesh` at `per_device` images per device ->
    XLA's memory analysis (bytes per device)."""
    config = preset(method)
    config.batch_size = per_device * mesh.devices.size
    exp = experiment.Experiment(config, IMAGENET, mesh)
    facts = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=exp.batch_sharding)
    batch = {"image": exp.sample, "index": facts, "label": facts}
    t = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = exp.train_step().lower(exp.abstract_state(), batch).compile()
    m = compiled.memory_analysis()
    return {"per_device_batch": per_device, "global_batch": config.batch_size,
            "compile_s": round(time.perf_counter() - t, 1),
            "temp": m.temp_size_in_bytes, "argument": m.argument_size_in_bytes,
            "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
            "code": m.generated_code_size_in_bytes}


COLUMNS = ("params", "optimizer", "BN statistics", "key encoder", "MoCo queue", "memory bank",
           "total")


def state_table(results: dict) -> str:
    lines = ["| method | global batch | devices | " + " | ".join(COLUMNS) + " |",
             "|---|---:|---:|" + "---:|" * len(COLUMNS)]
    for method, r in results.items():
        for n, row in r["devices"].items():
            cells = [f"{row[c] / MiB:,.1f}" if row.get(c) else "-" for c in COLUMNS]
            lines.append(f"| {method} | {r['batch_size']} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_table(results: dict) -> str:
    lines = ["| method | images / device | temp MiB | temp MiB / images | arguments MiB | "
             "outputs MiB | compile s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for method, rows in results.items():
        for r in rows:
            lines.append(
                f"| {method} | {r['per_device_batch']} | {r['temp'] / MiB:,.1f} | "
                f"{r['temp'] / MiB / r['per_device_batch']:,.1f} | {r['argument'] / MiB:,.1f} | "
                f"{r['output'] / MiB:,.1f} | {r['compile_s']} |")
    return "\n".join(lines)


def main(argv):
    del argv
    mesh = parallel.make_mesh()
    print(f"{len(jax.devices())} {jax.devices()[0].platform} devices; state per device (MiB):")
    states = {m: state_memory(m, mesh) for m in _METHODS.value}
    print(state_table(states))
    for m, r in states.items():
        print(f"  {m}: sharded over the data axis: {r['sharded'] or 'nothing'}")
    steps = {}
    for m in _COMPILE_METHODS.value:
        steps[m] = []
        for b in _BATCHES.value:
            steps[m].append(step_memory(m, int(b), mesh))
            print(m, steps[m][-1], flush=True)
    if steps:
        print(f"\nOne train step on a {mesh.devices.size}-device mesh, per device:")
        print(step_table(steps))
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump({"devices_compiled": mesh.devices.size, "platform": jax.devices()[0].platform,
                   "jax": jax.__version__, "image_shape": IMAGENET.image_shape,
                   "num_examples": IMAGENET.num_examples, "state": states, "step": steps},
                  f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
