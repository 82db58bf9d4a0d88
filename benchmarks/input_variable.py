r"""Host input throughput for ImageNet-sized JPEGs: our path against the PyTorch way.

    python benchmarks/input_variable.py [--images 400] [--seconds 6] [--reps 3]

Writes --images JPEGs of ImageNet's typical sizes (500x375 and 375x500, quality
90, natural-looking content) and measures, per core:
- `decode`: PIL decoding alone, the floor of any path;
- `ours`: what training asks of the host (data/decode.py ToCanvas(512): the whole
  image decoded onto the canvas; both views' crops are then drawn on device);
- `torch_way`: the PyTorch recipe on the same files, PIL decode of the whole image
  + two torchvision-style RandomResizedCrop(224) views (torchvision's
  `F.resized_crop` on a PIL image is `img.crop(box).resize(size, BILINEAR)`:
  written so, without installing torch);
- `ours_eval`: the eval centre crop (CenterCrop(224): resize to 256, crop 224);
- the real pipeline, `pipeline.train_iterator` over a prepared dataset of these
  JPEGs (image_folder), with 0, 1 and 2 grain worker processes (`--reps` rounds):
  images/s, CPU per image in the main process and in the workers, and where its
  time goes per image (record read + parse, decode, array on the canvas, stack).
Prints a table and writes benchmarks/results/input_variable.json.
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
import platform
import random
import resource
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from ssl_jax.data import decode, pipeline, sources
from ssl_jax.datasets import prepare

_IMAGES = flags.DEFINE_integer("images", 400, "JPEGs to generate.")
_SECONDS = flags.DEFINE_float("seconds", 6.0, "Measuring time per setting.")
_REPS = flags.DEFINE_integer("reps", 3, "Rounds of the one-process measurements.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        "input_variable.json"), "Results file.")


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n JPEGs of 500x375 or 375x500 at quality 90, with texture at every scale
    (smooth shapes + fine noise), so they compress like photographs (~100-150 KB)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = (500, 375) if i % 2 == 0 else (375, 500)
        y, x = np.mgrid[0:h, 0:w] / 100.0
        base = np.stack([np.sin(x * rng.uniform(0.5, 3) + rng.uniform(0, 6))
                         * np.cos(y * rng.uniform(0.5, 3)) for _ in range(3)], -1)
        img = (base * 70 + 128 + rng.normal(0, 18, (h, w, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _rrc_box(rng: random.Random, W: int, H: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params -> (left, top, right, bottom)."""
    for _ in range(10):
        area = W * H * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            top, left = rng.randint(0, H - h), rng.randint(0, W - w)
            return left, top, left + w, top + h
    s = min(W, H)
    return (W - s) // 2, (H - s) // 2, (W + s) // 2, (H + s) // 2


def torch_way(data: bytes, rng: random.Random) -> list[np.ndarray]:
    """PIL decode of the whole image, then two RandomResizedCrop(224) views."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    return [np.asarray(im.crop(_rrc_box(rng, *im.size)).resize((224, 224), Image.BILINEAR))
            for _ in range(2)]


def only_decode(data: bytes, rng) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def ours(data: bytes, rng) -> np.ndarray:
    return decode.ToCanvas(512)(data, 3)[0]


def ours_eval(data: bytes, rng) -> np.ndarray:
    return decode.CenterCrop(224)(data, 3)[0]


FUNCS = {"decode": only_decode, "ours": ours, "torch_way": torch_way, "ours_eval": ours_eval}


def _loop(args) -> float:
    """images/s of FUNCS[name] over the JPEGs, for `seconds`, in this process."""
    name, jpegs, seconds = args
    fn, rng, n, t0 = FUNCS[name], random.Random(0), 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        fn(jpegs[n % len(jpegs)], rng)
        n += 1
    return n / dt


def per_core(name: str, jpegs, seconds: float, processes: int) -> float:
    """Total images/s with `processes` worker processes (DataLoader workers' way)."""
    if processes == 1:
        return _loop((name, jpegs, seconds))
    with mp.get_context("spawn").Pool(processes) as pool:
        return sum(pool.map(_loop, [(name, jpegs, seconds)] * processes))


def _children_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each child process of this one (/proc)."""
    me, tick, out = os.getpid(), os.sysconf("SC_CLK_TCK"), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            out[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pipeline_rate(source, workers: int, seconds: float, batch: int = 32) -> dict:
    """images/s of train_iterator, and where the CPU goes: ms of CPU per image in
    this (the main) process and in the grain workers together, each worker's
    busy fraction (CPU seconds per second), and the shared memory in use. Worker CPU per image that stays the same
    from 1 to 2 workers means the work scales linearly with the cores given to
    it, up to the main process's ceiling (1 / its CPU per image)."""
    it = pipeline.train_iterator(source, global_batch_size=batch, seed=0, worker_count=workers)
    for _ in range(3):
        next(it)
    kids0, main0 = _children_cpu(), _self_cpu()
    n, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds or n < 4 * batch:
        n += next(it)["image"].shape[0]
    kids1, main1 = _children_cpu(), _self_cpu()
    shm = [os.path.join("/dev/shm", f) for f in os.listdir("/dev/shm")] if workers else []
    shm_mb = sum(os.path.getsize(f) for f in shm if os.path.basename(f).startswith("psm_")) / 2**20
    # grain's workers, not multiprocessing's resource tracker (a child that idles)
    busy = sorted(kids1[p] - kids0[p] for p in kids1 if p in kids0)[-workers:] if workers else []
    del it
    return {"images_per_s": round(n / dt, 1),
            "main_cpu_ms_per_image": round((main1 - main0) / n * 1e3, 3),
            "workers_cpu_ms_per_image": round(sum(busy) / n * 1e3, 3),
            "worker_busy": [round(b / dt, 2) for b in busy],
            "shared_memory_mb": round(shm_mb, 1)}  # the workers' slots in use


def breakdown(data_dir: str, name: str, reps: int = 3) -> dict:
    """Where the pipeline's host time goes, ms per image (best of reps, batches of 32):
    reading and parsing the record (array_record + TFDS), the JPEG decode, the decoded
    image to an array placed on its canvas, and stacking the batch."""
    import tensorflow_datasets as tfds

    raw = tfds.data_source(name, split="train", data_dir=data_dir, download=False,
                           decoders={"image": tfds.decode.SkipDecoding()})
    batches = [list(range(i, i + 32)) for i in range(0, len(raw) - 31, 32)]
    records = [r for b in batches for r in raw.__getitems__(b)]
    to_canvas = decode.ToCanvas(512)
    opened = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in records[:32]]
    canvases = [to_canvas(r["image"], 3)[0] for r in records[:32]]

    def placed(im):
        canvas = np.zeros((512, 512, 3), np.uint8)
        canvas[:im.size[1], :im.size[0]] = np.asarray(im)

    parts = {
        "read_parse": (lambda: [raw.__getitems__(b) for b in batches], len(records)),
        "decode": (lambda: [Image.open(io.BytesIO(r["image"])).convert("RGB")
                            for r in records], len(records)),
        "to_canvas_array": (lambda: [placed(im) for im in opened], len(opened)),
        "stack_batch": (lambda: np.stack(canvases), len(canvases)),
    }
    out = {}
    for part, (f, n) in parts.items():
        best = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            f()
            best = min(best, (time.perf_counter() - t) / n)
        out[part] = round(best * 1e3, 3)
    return out


def main(argv):
    del argv
    jpegs = make_jpegs(_IMAGES.value)
    kb = np.mean([len(j) for j in jpegs]) / 1024
    print(f"{len(jpegs)} JPEGs, 500x375 / 375x500, q90, {kb:.0f} KB on average")
    rows = []
    # One process: the paths interleaved, `reps` times, the median kept (this shared
    # machine's speed drifts by +-20% over a minute; ratios within a round hold).
    singles = {name: [] for name in FUNCS}
    for _ in range(_REPS.value):
        for name in FUNCS:
            singles[name].append(_loop((name, jpegs, _SECONDS.value)))
    for name, rates in singles.items():
        r = float(np.median(rates))
        rows.append({"path": name, "processes": 1, "images_per_s": round(r, 1),
                     "rounds": [round(x, 1) for x in rates]})
        print(f"{name:10s} 1 process:   {r:7.1f} images/s (rounds {[round(x) for x in rates]})",
              flush=True)
    for name in FUNCS:
        r = per_core(name, jpegs, _SECONDS.value, 2)
        rows.append({"path": name, "processes": 2, "images_per_s": round(r, 1)})
        print(f"{name:10s} 2 processes: {r:7.1f} images/s", flush=True)
    # The real pipeline: a prepared image_folder dataset of the same JPEGs.
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "photos", "train")
        for i, data in enumerate(jpegs):
            os.makedirs(os.path.join(root, f"class{i % 4}"), exist_ok=True)
            with open(os.path.join(root, f"class{i % 4}", f"{i:05d}.jpg"), "wb") as f:
                f.write(data)
        data_dir = os.path.join(tmp, "tfds")
        prepare.prepare("image_folder", data_dir, manual_dir=os.path.dirname(root),
                        name="bench_photos")
        source = sources.open_source("bench_photos", "train", data_dir, memory_limit=0,
                                     decode=decode.ToCanvas(512))
        parts = breakdown(data_dir, "bench_photos")
        rows.append({"path": "pipeline_breakdown_ms_per_image", **parts})
        print("pipeline, ms per image: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()),
              flush=True)
        for _ in range(_REPS.value):
            for workers in (0, 1, 2):
                r = pipeline_rate(source, workers, _SECONDS.value)
                rows.append({"path": "pipeline_ours", "grain_workers": workers, **r})
                print(f"train_iterator, ToCanvas(512), {workers} grain workers: "
                      f"{r['images_per_s']:7.1f} images/s; CPU ms/image: main "
                      f"{r['main_cpu_ms_per_image']:.2f}, workers "
                      f"{r['workers_cpu_ms_per_image']:.2f} (each busy {r['worker_busy']}); "
                      f"shared memory {r['shared_memory_mb']:.0f} MB",
                      flush=True)
    rate = {(r["path"], r.get("processes")): r["images_per_s"] for r in rows
            if "images_per_s" in r}
    ratio = [o / t for o, t in zip(singles["ours"], singles["torch_way"])]
    summary = {"ours_over_torch_way_per_core": round(rate["ours", 1] / rate["torch_way", 1], 2),
               "ours_over_torch_way_each_round": [round(x, 2) for x in ratio],
               # time share: decoding alone / our whole host work per image
               "decode_share_of_ours": round(rate["ours", 1] / rate["decode", 1], 2)}
    # Worker scaling: medians over the rounds, by worker count.
    pipe = [r for r in rows if r["path"] == "pipeline_ours"]
    med = {k: {w: float(np.median([r[k] for r in pipe if r["grain_workers"] == w]))
               for w in (0, 1, 2)}
           for k in ("images_per_s", "main_cpu_ms_per_image", "workers_cpu_ms_per_image")}
    summary.update({f"pipeline_{k}_by_workers": v for k, v in med.items()})
    summary["pipeline_two_workers_over_one"] = round(
        med["images_per_s"][2] / med["images_per_s"][1], 2)
    print(summary)
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump({"rows": rows, "summary": summary, "mean_jpeg_kb": round(kb, 1),
                   "cpus": os.cpu_count(), "machine": platform.machine(),
                   "date": time.strftime("%Y-%m-%d")}, f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
