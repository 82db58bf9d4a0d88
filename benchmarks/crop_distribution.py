r"""The crop distribution of our canvas path against torchvision's definition.

    python benchmarks/crop_distribution.py [--draws 10000]

For a 500x375 image (ImageNet's commonest) decoded onto a 512 canvas, draws
RandomResizedCrop boxes (scale (0.08, 1), ratio (3/4, 4/3)) the way training does
(views/ops.py inside the image's valid region, on device) and the way torchvision
defines them (`RandomResizedCrop.get_params`, written out in numpy), and prints
histograms of the crop's area fraction of the original image and of its aspect
ratio. Writes benchmarks/results/crop_distribution.json.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ssl_jax.views import ops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.test_canvas import reference_boxes  # noqa: E402 -- the definition the test holds us to

_DRAWS = flags.DEFINE_integer("draws", 10_000, "Boxes drawn by each path.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        "crop_distribution.json"), "Results file.")
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def our_boxes(H: int, W: int, n: int) -> np.ndarray:
    """(n, 2) (h, w) drawn on device inside a canvas image's valid (H, W)."""
    hw = (jnp.float32(H), jnp.float32(W))
    draw = jax.jit(jax.vmap(lambda k: jnp.stack(ops._sample_box(k, *hw, SCALE, RATIO)[2:])))
    return np.asarray(draw(jax.random.split(jax.random.key(0), n)), np.float64)


def main(argv):
    del argv
    H, W, n = 375, 500, _DRAWS.value
    paths = {"ours": our_boxes(H, W, n),
             "torchvision": reference_boxes(np.random.default_rng(0), H, W, n, SCALE, RATIO)}
    bins = {"area": np.linspace(0.0, 1.0, 11), "aspect": np.geomspace(RATIO[0], RATIO[1], 9)}
    out = {"image": [H, W], "draws": n, "histograms": {}, "quantiles": {}}
    q = [0.05, 0.25, 0.5, 0.75, 0.95]
    for name, hw in paths.items():
        values = {"area": hw[:, 0] * hw[:, 1] / (H * W), "aspect": hw[:, 1] / hw[:, 0]}
        for k, v in values.items():
            out["histograms"].setdefault(k, {})[name] = np.histogram(v, bins[k])[0].tolist()
            out["quantiles"].setdefault(k, {})[name] = np.round(np.quantile(v, q), 4).tolist()
    for k, edges in bins.items():
        print(f"\n{k} of the crop ({n} draws each): bin | ours | torchvision")
        for i in range(len(edges) - 1):
            print(f"  [{edges[i]:.3f}, {edges[i + 1]:.3f}) | "
                  f"{out['histograms'][k]['ours'][i]:5d} | {out['histograms'][k]['torchvision'][i]:5d}")
        print(f"  quantiles {q}: ours {out['quantiles'][k]['ours']}, "
              f"torchvision {out['quantiles'][k]['torchvision']}")
    out["bins"] = {k: v.tolist() for k, v in bins.items()}
    out["date"] = time.strftime("%Y-%m-%d")
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
