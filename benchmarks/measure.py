"""How the ssl_jax-vs-PyTorch speed benchmarks measure (end_to_end.py, step.py,
augment.py): the machine they record, each framework alone in a process, and
the steady state.

Each framework runs in a fresh process of its own, so neither's thread pools,
allocator or libraries sit beside the other's: a script measures ssl_jax in
itself and runs itself again with --side=torch for the PyTorch peer (PyTorch
is imported only there). The peer's DataLoader also forks its workers from a
process where no JAX backend ever started (forking a live XLA runtime can
deadlock).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def config(method: str, data_dir: str | None = None):
    """The config both sides run: configs/<method>.py:dataset=fashion_mnist
    (plain ml_collections, no JAX)."""
    from ssl_jax.config import load_file  # ml_collections only: no JAX on the PyTorch side

    c = load_file(f"configs/{method}.py:dataset=fashion_mnist")
    c.data_dir = data_dir
    return c


def machine() -> dict:
    """CPU model, cores, memory, load, versions and date of this measurement."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "grain", "torch", "numpy", "pillow"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": mem_gib, "machine": platform.machine(),
            "python": platform.python_version(),
            # Other jobs on the cores change every number here: say how busy they were.
            "load_average_1m_at_start": round(os.getloadavg()[0], 2), "versions": versions}


def run_side(script: str, side: str, flag_values: dict) -> dict:
    """Runs `python script --side=<side> --<k>=<v> ...` in a fresh process and
    returns the JSON it wrote to --out."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "side.json")
        cmd = [sys.executable, script, f"--side={side}", f"--out={out}"]
        cmd += [f"--{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                for k, v in flag_values.items() if v is not None]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def steady(run_one, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls of run_one() after `warmup` untimed ones."""
    for _ in range(warmup):
        run_one()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        run_one()
        times.append(time.perf_counter() - t)
    return times


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matmul rate through XLA, best of `repeats`."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, a))
    best = min(steady(lambda: jax.block_until_ready(dot(a, a)), repeats, 0))
    return 2 * n**3 / best / 1e9


def summary(times: list[float], items: int, stat: str = "median") -> dict:
    """Step times and items/s, with the spread (other jobs share the cores).

    per_s is items / the `stat` ("median" or "mean") step time; both are kept.
    The median shrugs off another job's burst; the mean is the one to use when
    steps come in bursts by design (k DataLoader workers hand over k batches at
    once, so the times alternate between a long wait and none, and their median
    says little).
    """
    med, mean = statistics.median(times), statistics.fmean(times)
    return {"median_ms": round(med * 1e3, 2), "mean_ms": round(mean * 1e3, 2),
            "min_ms": round(min(times) * 1e3, 2), "max_ms": round(max(times) * 1e3, 2),
            "steps_timed": len(times), "stat": stat,
            "per_s": round(items / (med if stat == "median" else mean), 1)}


def define_flags(methods: list[str], result_file: str, unit: str = "steps"):
    """The flags every side-by-side script has -> their holders (methods, steps,
    warmup, data_dir, side, out); `unit` names what a timed step is."""
    from absl import flags
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return (
        flags.DEFINE_list("methods", methods, "Methods (configs/<name>.py)."),
        flags.DEFINE_integer("steps", 20, f"Timed {unit} per method and side."),
        flags.DEFINE_integer("warmup", 5, f"Untimed {unit} first (compile, workers, caches)."),
        flags.DEFINE_string("data_dir", None, "TFDS data dir; default TFDS's."),
        flags.DEFINE_enum("side", "both", ["both", "jax", "torch"],
                          "both: ssl_jax here, then the PyTorch side in a child process."),
        flags.DEFINE_string("out", os.path.join(root, "benchmarks", "results", result_file),
                            "Results file."),
    )


def train_images(npy_path: str | None, data_dir: str):
    """The Fashion-MNIST train images (N, 28, 28, 1) uint8 of a --side=torch child:
    the parent's .npy when given (both sides read the same arrays), else decoded."""
    import numpy as np
    if npy_path:
        return np.load(npy_path)
    from ssl_jax.data import sources
    return sources.open_source("fashion_mnist", "train", data_dir).image
