r"""Per-layer convolution timings of the demo ConvNet: where a train step's time goes.

    python benchmarks/conv_layers.py [--batch 512]

For each of the four 3x3 convolutions (28x28x1 input, widths 32-64-128-256) it
times, best of 7 after a warm-up: XLA's forward, input gradient and weight
gradient, and the weight gradient as one im2col matmul (ssl_jax/models/conv.py),
checking that the two weight gradients agree; and, when torch is installed
(requirements-bench.txt), PyTorch's (oneDNN) forward, input gradient and weight
gradient of the same layer, channels_last, torch.set_num_threads(cores): the
kernel-level gap behind benchmarks/step.py's ratio. Prints a table and writes
benchmarks/results/conv_layers.json.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import measure  # benchmarks/measure.py: Python imports from a script's own folder
from ssl_jax.models import conv

_BATCH = flags.DEFINE_integer("batch", 512, "Images per call (SimCLR's 2 x 256 views).")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        "conv_layers.json"), "Results file.")
LAYERS = ((28, 1, 32), (14, 32, 64), (7, 64, 128), (3, 128, 256))  # (side, c_in, c_out)
_DN = ("NHWC", "HWIO", "NHWC")


def best_ms(fn, *args, repeats: int = 7) -> tuple[float, jax.Array]:
    fn = jax.jit(fn)
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * min(times), out


def torch_ms(side: int, cin: int, cout: int, b: int, repeats: int = 7) -> dict:
    """PyTorch's forward / input-gradient / weight-gradient ms of one layer (best of
    `repeats` after a warm-up); {} without torch."""
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(os.cpu_count())
    cl = torch.channels_last
    x = torch.randn(b, cin, side, side).to(memory_format=cl)
    w = torch.randn(cout, cin, 3, 3).to(memory_format=cl)
    dy = torch.randn(b, cout, side, side).to(memory_format=cl)
    conv2d = torch.nn.functional.conv2d
    grad = torch.ops.aten.convolution_backward
    calls = {
        "torch_forward_ms": lambda: conv2d(x, w, padding=1),
        "torch_input_grad_ms": lambda: grad(dy, x, w, None, [1, 1], [1, 1], [1, 1], False,
                                            [0, 0], 1, [True, False, False]),
        "torch_weight_grad_ms": lambda: grad(dy, x, w, None, [1, 1], [1, 1], [1, 1], False,
                                             [0, 0], 1, [False, True, False]),
    }
    out = {}
    with torch.no_grad():
        for name, fn in calls.items():
            out[name] = round(1e3 * min(measure.steady(fn, repeats, warmup=1)), 1)
    return out


def main(argv):
    del argv
    b, rows = _BATCH.value, []
    lax_conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                         dimension_numbers=_DN)
    ours = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN)
    for side, cin, cout in LAYERS:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(b, side, side, cin)), jnp.float32)
        dy = jnp.asarray(rng.normal(size=(b, side, side, cout)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
        fwd, _ = best_ms(lax_conv, x, w)
        dx, _ = best_ms(lambda x, dy: jax.vjp(lambda x_: lax_conv(x_, w), x)[1](dy)[0], x, dy)
        dw_xla, ref = best_ms(lambda x, dy: jax.vjp(lambda w_: lax_conv(x, w_), w)[1](dy)[0], x, dy)
        dw_mm, got = best_ms(lambda x, dy: jax.vjp(lambda w_: ours(x, w_), w)[1](dy)[0], x, dy)
        err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
        rows.append(dict(layer=f"{side}x{side}, {cin}->{cout}", forward_ms=round(fwd, 1),
                         input_grad_ms=round(dx, 1), weight_grad_xla_ms=round(dw_xla, 1),
                         weight_grad_im2col_ms=round(dw_mm, 1), max_rel_err=err,
                         gflop=round(2 * b * side * side * 9 * cin * cout / 1e9, 2),
                         **torch_ms(side, cin, cout, b)))
        print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "batch": b, "cpus": os.cpu_count(),
                   "rows": rows}, f, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
