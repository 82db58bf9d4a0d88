r"""What multi-crop costs: SimCLR's train step with 2 global crops vs 2 global + L local,
and other methods' steps beside it (DINO's: a teacher, 2 + L crops).

    python benchmarks/multicrop.py [--variants 0,6:12,6:16] [--steps 20] [--data_dir DIR]
    python benchmarks/multicrop.py --variants 0,6:12,dino:model=convnet,dino:model=convnet,local_crops=0

Each variant is configs/simclr.py:dataset=fashion_mnist (the demo's ConvNet and batch),
with local_crops=L,local_size=S for "L:S" ("0": today's two views of 28 px); or
METHOD:ARGS, configs/METHOD.py:dataset=fashion_mnist,ARGS (e.g. dino:model=convnet: DINO's
preset, 2 x 28 + 6 x 12 px crops, on the same ConvNet). Timed as
benchmarks/train_step.py times a step: the jitted train step alone (views made on
device + forward + backward + update) on one batch of the prepared fashion_mnist already
on the device, median over --steps steps after 3 warm-up ones, the variants taking
turns two steps at a time (the cores are shared: a burst of another job then slows
them all, not one). Also counted, from the
loss's traced program: how many times the encoder runs per step (its first convolution,
the one that reads the image's channels, appears once per call) and on what input.
Prints them and writes benchmarks/results/multicrop.json.
"""
from __future__ import annotations

import os
import statistics

import jax
from absl import app, flags
from jax.extend import core

import measure  # benchmarks/measure.py: Python imports from a script's own folder
from ssl_jax import experiment, parallel
from ssl_jax.config import load_file
from ssl_jax.data import pipeline, sources
from ssl_jax.datasets import prepare

_VARIANTS = flags.DEFINE_list("variants", ["0", "6:12", "6:16"],
                              "local_crops[:local_size] per variant; 0: two views.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per variant (after 3 warm-up).")
_PER_ROUND = 2  # steps of one variant before the next's
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir; default TFDS's.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        "multicrop.json"), "Results file.")


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, core.Jaxpr):
                    yield from _equations(sub)


def encoder_inputs(exp: experiment.Experiment) -> list[list[int]]:
    """The input shape of each encoder call in the method's loss (forward), traced only."""
    m, config, channels = exp.method, exp.config, exp.spec.image_shape[-1]
    views = jax.eval_shape(lambda x: m.views(jax.random.key(0), x, config), exp.sample)
    p, s = exp.shapes["params"], exp.shapes["method_state"]
    jaxpr = jax.make_jaxpr(lambda p, s, v: m.loss(p, s, v, {}, None, config, exp.spec)[0])(
        p, s, views)
    return [list(e.invars[0].aval.shape) for e in _equations(jaxpr.jaxpr)
            if e.primitive.name == "conv_general_dilated"
            and e.invars[1].aval.shape[2] == channels]


def prepare_variant(variant: str, data_dir: str):
    """-> (the variant's facts, run_one: one timed train step on a fixed batch)."""
    method, arg = "simclr", "dataset=fashion_mnist"
    if variant[:1].isalpha():  # METHOD:ARGS
        method, _, more = variant.partition(":")
        arg += f",{more}" if more else ""
    else:  # L:S, SimCLR's local crops
        local, _, size = variant.partition(":")
        arg += f",local_crops={local}" if int(local) else ""
        arg += f",local_size={size}" if size and int(local) else ""
    config = load_file(f"configs/{method}.py:{arg}")
    config.data_dir = data_dir
    mesh = parallel.make_mesh()
    exp = experiment.Experiment(config, experiment.data_spec(config), mesh)
    calls = encoder_inputs(exp)
    source = sources.open_source(config.dataset, config.train_split, data_dir)
    workers = pipeline.worker_count(config.data.worker_count, source)
    it = pipeline.train_iterator(source, global_batch_size=config.batch_size, seed=0,
                                 worker_count=workers)
    state, step_fn = exp.initial_state(), exp.train_step()
    with jax.set_mesh(mesh):
        batch = parallel.global_batch(next(it), mesh)
        compiled = step_fn.lower(state, batch).compile()
    box = {"state": state}

    def run_one():
        with jax.set_mesh(mesh):
            box["state"], m = compiled(box["state"], batch)
            jax.block_until_ready(m)

    mc = config.get("multicrop") or config.get("dino")
    local = mc.local_crops if mc else 0
    crops = "2x28" + (f" + {local}x{mc.local_size}" if local else "")
    crops += f" {method} {config.model.name}" if method != "simclr" else ""
    facts = {"variant": crops, "config": f"configs/{method}.py:{arg}",
             "batch_size": config.batch_size, "crops_per_image": 2 + local,
             "encoder_calls_per_step": len(calls), "encoder_call_inputs": calls}
    return facts, run_one


def main(argv):
    del argv
    data_dir = _DATA_DIR.value or sources.default_data_dir()
    prepare.prepare("fashion_mnist", data_dir)
    machine = measure.machine()
    prepared = [prepare_variant(v, data_dir) for v in _VARIANTS.value]
    # Round robin, a few steps of each variant per round: other jobs on the shared cores
    # then slow every variant alike instead of whichever ran during their burst.
    times = [[] for _ in prepared]
    for _, run_one in prepared:
        measure.steady(run_one, 0, warmup=3)
    for r in range(0, _STEPS.value, _PER_ROUND):
        for t, (_, run_one) in zip(times, prepared):
            t.extend(measure.steady(run_one, min(_PER_ROUND, _STEPS.value - r), warmup=0))
    rows = []
    for (facts, _), t in zip(prepared, times):
        b, med = facts["batch_size"], statistics.median(t)
        r = dict(facts, **measure.summary(t, b), images_per_s=round(b / med, 1),
                 crops_per_s=round(b * facts["crops_per_image"] / med, 1))
        rows.append(r)
        print(f"{r['variant']:14s} B={r['batch_size']}: step {r['median_ms']} ms "
              f"(min {r['min_ms']}) = {r['images_per_s']} images/s, {r['crops_per_s']} crops/s"
              f" | encoder calls per step {r['encoder_calls_per_step']}: "
              f"{r['encoder_call_inputs']}", flush=True)
    base = rows[0]["images_per_s"]
    for r in rows:
        r["images_per_s_vs_first"] = round(r["images_per_s"] / base, 3)
    measure.write_json(_OUT.value, {
        "machine": machine, "devices": [str(d) for d in jax.devices()],
        "note": "images = source images per step; the step's median time; encoder calls "
                "counted in the traced loss (first convolution per call)",
        "results": rows})
    print(f"wrote {_OUT.value} (CPU: {machine['cpu']}, load {machine['load_average_1m_at_start']})")


if __name__ == "__main__":
    app.run(main)
