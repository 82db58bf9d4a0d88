r"""ViT train step, ssl_jax vs timm: forward + backward + AdamW update, same widths, same batch.

    python benchmarks/vit_step.py [--cases tiny28,small224] [--steps 10] [--warmup 3]
                                  [--torch_python .venv-timm/bin/python] [--side both|jax|torch]
                                  [--malloc system,tcmalloc] [--repeats 2]

Each case is one ViT classifying random images into 10 classes from its class token
(cross-entropy), trained with AdamW (lr 1e-3, weight decay 0.05 on every parameter),
float32, no drop path, batch --batch_* :
  tiny28    ViT-Ti (192 wide, 12 blocks, 3 heads), patch 4 on 28x28x1: Fashion-MNIST's
            shape, 49 patch tokens + the class token; batch 128.
  small224  ViT-S/16 (384 wide, 12 blocks, 6 heads) on 224x224x3: 196 patch tokens +
            the class token; batch 16 (a small batch: 2 cores).
ssl_jax   models.make_encoder("vit_tiny" | "vit_small", patch=..., img_size=...) and a
          Dense head on models.summary (the class token); one jitted step (donated
          state), on arrays already on the device.
timm      timm.models.vision_transformer.VisionTransformer with the same widths
          (qkv bias, MLP ratio 4, LayerNorm eps 1e-6, class token, learned position
          embedding), eager, torch.set_num_threads(cores), in a process of its own.
Median step time over --steps after --warmup. Every side runs in a fresh process under
each allocator of --malloc: "system" (glibc malloc, LD_PRELOAD cleared) or "tcmalloc"
(LD_PRELOAD of libtcmalloc_minimal.so.4, package libtcmalloc-minimal4: glibc hands XLA's
and ATen's large per-step buffers back to the OS and every step page-faults them in
again; tcmalloc keeps them). The order is repeat x allocator x (ssl_jax, timm), so on a
shared machine each pair runs side by side in time; a case's number is the median over
--repeats of each process's median, and every process's numbers are kept, with the
allocator it found mapped (/proc/self/maps), under "runs". Also for ssl_jax: XLA's FLOP count of
the step (cost analysis), the achieved GFLOP/s and this machine's float32 matmul rate
(2048^2), which says what bounds the step.

timm needs torchvision, which does not import beside the CPU build of torch that
requirements-bench.txt pins (torch==2.13.0+cpu: `operator torchvision::nms does not
exist`), so the timm side runs in an interpreter of its own, made once with
requirements-timm.txt (see its header). Writes benchmarks/results/vit_step.json.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

import measure  # benchmarks/measure.py (a script's own folder is on sys.path)

CASES = {
    "tiny28": dict(name="vit_tiny", width=192, depth=12, heads=3, patch=4, size=28, chans=1,
                   batch=128),
    "small224": dict(name="vit_small", width=384, depth=12, heads=6, patch=16, size=224,
                     chans=3, batch=16),
}
CLASSES = 10

_CASES = flags.DEFINE_list("cases", list(CASES), f"Of {sorted(CASES)}.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per case and side.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (compile, caches).")
_SIDE = flags.DEFINE_enum("side", "both", ["both", "jax", "torch"],
                          "both: ssl_jax here, then timm in a child process.")
_TORCH_PY = flags.DEFINE_string("torch_python", None,
                                "Interpreter with torch + timm (default: .venv-timm/bin/python "
                                "if it exists, else this one).")
_MALLOC = flags.DEFINE_list("malloc", ["system"], "Allocators, of system and tcmalloc.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Fresh processes per side and allocator.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "vit_step.json"),
    "Results file.")


TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def _env(malloc: str) -> dict:
    """This process's environment with the allocator `malloc` preloaded (or none)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if malloc == "tcmalloc":
        # tcmalloc logs every allocation over 1 GiB by default; the step's are not news.
        env.update(LD_PRELOAD=TCMALLOC, TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=str(2**40))
    return env


def _allocator() -> str:
    """The allocator this process runs with: "tcmalloc" if it is mapped, else "system"."""
    with open("/proc/self/maps") as f:
        return "tcmalloc" if "libtcmalloc" in f.read() else "system"


def _timed(run_one, steps: int, warmup: int) -> dict:
    times = measure.steady(run_one, steps, warmup)
    return {"median_ms": round(statistics.median(times) * 1e3, 1),
            "min_ms": round(min(times) * 1e3, 1), "max_ms": round(max(times) * 1e3, 1)}


def jax_case(case: dict, steps: int, warmup: int) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from ssl_jax import models

    encoder = models.make_encoder(case["name"], patch=case["patch"], img_size=case["size"])
    final = models.final_stage(case["name"], patch=case["patch"], img_size=case["size"])

    class Classifier(nn.Module):
        encoder: nn.Module

        @nn.compact
        def __call__(self, x):
            return nn.Dense(CLASSES)(models.summary(self.encoder(x, train=True)[final]))

    net, tx = Classifier(encoder), optax.adamw(1e-3, weight_decay=0.05)
    shape = (case["batch"], case["size"], case["size"], case["chans"])
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    y = jax.random.randint(jax.random.key(1), (case["batch"],), 0, CLASSES)
    params = jax.jit(net.init)(jax.random.key(2), x)["params"]
    opt = jax.jit(tx.init)(params)

    def step(params, opt, x, y):
        def loss_fn(p):
            logits = net.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt, x, y).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    state = [params, opt]

    def run_one():
        state[0], state[1], loss = compiled(state[0], state[1], x, y)
        loss.block_until_ready()
    out = _timed(run_one, steps, warmup)
    flops = float(cost.get("flops", 0.0))
    out.update(compile_s=round(compile_s, 1), gflop_per_step=round(flops / 1e9, 2),
               achieved_gflops=round(flops / 1e9 / (out["median_ms"] / 1e3), 1),
               params=int(sum(p.size for p in jax.tree.leaves(params))))
    return out


def torch_case(case: dict, steps: int, warmup: int) -> dict:
    import torch
    from timm.models.vision_transformer import VisionTransformer

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = VisionTransformer(img_size=case["size"], patch_size=case["patch"],
                              in_chans=case["chans"], num_classes=CLASSES,
                              embed_dim=case["width"], depth=case["depth"],
                              num_heads=case["heads"], mlp_ratio=4.0, qkv_bias=True,
                              class_token=True, global_pool="token")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(case["batch"], case["chans"], case["size"], case["size"])
    y = torch.randint(0, CLASSES, (case["batch"],))

    def run_one():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    out = _timed(run_one, steps, warmup)
    import timm
    out.update(params=int(sum(p.numel() for p in model.parameters())),
               torch=torch.__version__, timm=timm.__version__)
    return out


def _torch_python() -> str:
    if _TORCH_PY.value:
        return _TORCH_PY.value
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv = os.path.join(root, ".venv-timm", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def _side(side: str, cases: list[str]) -> dict:
    fn = jax_case if side == "jax" else torch_case
    return {c: fn(CASES[c], _STEPS.value, _WARMUP.value) for c in cases}


def _child(side: str, malloc: str, python: str) -> dict:
    """One side's cases in a fresh process under `malloc` -> its results."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "side.json")
        subprocess.run([python, os.path.abspath(__file__), f"--side={side}", f"--out={out}",
                        f"--cases={','.join(_CASES.value)}", f"--steps={_STEPS.value}",
                        f"--warmup={_WARMUP.value}"], check=True, env=_env(malloc))
        with open(out) as f:
            got = json.load(f)
    if got["allocator"] != malloc:
        raise RuntimeError(f"--malloc {malloc}: the {side} process ran with {got['allocator']}"
                           f" ({TCMALLOC} missing? apt-get install libtcmalloc-minimal4)")
    return got


def main(argv):
    del argv
    unknown = sorted(set(_CASES.value) - set(CASES))
    if unknown:
        raise app.UsageError(f"--cases {unknown}: use some of {sorted(CASES)}.")
    bad = sorted(set(_MALLOC.value) - {"system", "tcmalloc"})
    if bad:
        raise app.UsageError(f"--malloc {bad}: use system and/or tcmalloc.")
    if _SIDE.value != "both":  # a child: one side, written to --out
        got = _side(_SIDE.value, _CASES.value)
        if _SIDE.value == "jax":
            got["matmul_gflops"] = round(measure.matmul_gflops(), 1)
        got["allocator"] = _allocator()
        measure.write_json(_OUT.value, got)
        return
    results = {"machine": measure.machine(), "steps": _STEPS.value, "warmup": _WARMUP.value,
               "repeats": _REPEATS.value, "malloc": _MALLOC.value,
               "cases": {c: dict(CASES[c]) for c in _CASES.value}, "runs": []}
    # Each side in a fresh process: neither framework's thread pools (nor allocator) sit
    # beside the other's; the sides alternate so that a busy neighbour hits both.
    for r in range(_REPEATS.value):
        for malloc in _MALLOC.value:
            for side, python in (("jax", sys.executable), ("torch", _torch_python())):
                got = _child(side, malloc, python)
                results["runs"].append(dict(repeat=r, malloc=malloc, side=side, **got))
                print(f"repeat {r} {malloc:8s} {side:5s} " + "  ".join(
                    f"{c} {got[c]['median_ms']:.0f} ms" for c in _CASES.value), flush=True)
    rates = [run["matmul_gflops"] for run in results["runs"] if run["side"] == "jax"]
    results["matmul_gflops"] = round(statistics.median(rates), 1)
    print(f"\n{results['machine']['cpu']}, {results['machine']['cores']} cores; float32 matmul "
          f"2048^2 (XLA): {results['matmul_gflops']} GFLOP/s (median of {len(rates)})")
    print("malloc    case      batch  ssl_jax ms  timm ms  speed vs timm  XLA GFLOP/step  GFLOP/s")
    summary = results["median_ms"] = {}
    for malloc in _MALLOC.value:
        for c in _CASES.value:
            ms = {side: statistics.median(run[c]["median_ms"] for run in results["runs"]
                                          if run["side"] == side and run["malloc"] == malloc)
                  for side in ("jax", "torch")}
            flop = next(run[c]["gflop_per_step"] for run in results["runs"]
                        if run["side"] == "jax")
            summary.setdefault(malloc, {})[c] = dict(
                jax=round(ms["jax"], 1), torch=round(ms["torch"], 1),
                speedup_vs_timm=round(ms["torch"] / ms["jax"], 2),
                achieved_gflops=round(flop / (ms["jax"] / 1e3), 1))
            print(f"{malloc:9s} {c:9s} {CASES[c]['batch']:5d} {ms['jax']:11.1f} "
                  f"{ms['torch']:8.1f} {ms['torch'] / ms['jax']:13.2f}x {flop:15.2f} "
                  f"{flop / (ms['jax'] / 1e3):8.1f}")
    measure.write_json(_OUT.value, results)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
