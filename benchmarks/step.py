r"""Model step alone, ssl_jax vs the PyTorch peer: the kernel-level ratio.

    python benchmarks/step.py [--methods simclr,moco,rotnet,pirl] [--steps 20] [--warmup 5]
                              [--data_dir DIR] [--side both|jax|torch]
    python benchmarks/step.py --check     # the peer's losses and network vs ssl_jax's

For each method (its Fashion-MNIST config): one real batch of the prepared
fashion_mnist, its views made once by ssl_jax's method.views and held fixed;
then, on those same view tensors, the loss, gradient, optimizer update and
method-state update (key encoder, queue, memory bank), median over --steps
steps after --warmup:
  ssl_jax  one jitted step on arrays already on the device (jax_step.model_step);
  PyTorch  benchmarks/torch_peer.py's step, eager, channels_last, in a process of
           its own (the views handed over as .npz, NHWC -> NCHW).
Also for ssl_jax: the step's compile time, its FLOPs (XLA's cost analysis of
the compiled step), this machine's measured float32 matmul rate (2048^2 jnp.dot,
best of 5) and MFU = achieved FLOP/s / that rate; the peak RSS of each side's
process (ssl_jax: the peak so far, methods run in --methods order; PyTorch: a
process per method). For PyTorch,
the step's matmul and convolution FLOPs (torch.utils.flop_counter), a check
that both sides do the same work. Writes benchmarks/results/step.json.

--check: NT-Xent, MoCo's InfoNCE and NPID/PIRL's NCE of the peer against
ssl_jax.losses on the same random inputs (losses and gradients), and the
SimCLR network with ssl_jax's weights copied in (projections and the NT-Xent
gradient of the first convolution); prints max |difference|.
"""
from __future__ import annotations

import os
import resource
import tempfile
import time

import numpy as np
from absl import app, flags

# Only measure here at the top (benchmarks/measure.py: Python imports from a
# script's own folder): the PyTorch side's process must not load JAX (its peak
# memory is the peer's own), nor the JAX side's load PyTorch.
import measure

_METHODS, _STEPS, _WARMUP, _DATA_DIR, _SIDE, _OUT = measure.define_flags(
    ["simclr", "moco", "rotnet", "pirl"], "step.json", "steps")
_VIEWS = flags.DEFINE_string("views", None, "(--side=torch) folder of <method>.npz views.")
_CHECK = flags.DEFINE_bool("check", False, "Compare the peer's losses and network with ssl_jax's.")


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss
    alone: ru_maxrss survives exec, so a child would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        return round(kib / 1024, 1)
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)   # KiB on Linux


# ---------------------------------------------------------------- ssl_jax

def jax_side(method: str, source, data_dir: str, steps: int, warmup: int, peak_gflops: float,
             views_dir: str) -> dict:
    """Times the model step; saves the views and indices to views_dir/<method>.npz."""
    import jax
    import jax_step
    from ssl_jax.data import pipeline
    config = measure.config(method, data_dir)
    batch = next(pipeline.train_iterator(source, global_batch_size=config.batch_size, seed=0))
    setup = jax_step.Setup(config, len(source), batch["image"])
    views = setup.views(batch["image"])
    np.savez(os.path.join(views_dir, f"{method}.npz"), index=batch["index"],
             **{k: np.asarray(v) for k, v in views.items()})
    index = jax.device_put(batch["index"])
    state = setup.new_state()
    with jax.set_mesh(setup.mesh):
        t = time.perf_counter()
        step = setup.model_step().lower(state, views, index).compile()
        compile_s = time.perf_counter() - t
        cost = step.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0))
        box = {"state": state}

        def one():
            box["state"], loss = step(box["state"], views, index)
            jax.block_until_ready(loss)

        times = measure.steady(one, steps, warmup)
    out = measure.summary(times, config.batch_size)
    med_s = out["median_ms"] / 1e3
    out.update(compile_s=round(compile_s, 1), params=setup.n_params(box["state"]),
               xla_flops_per_step=flops, achieved_gflops=round(flops / med_s / 1e9, 1),
               mfu=round(flops / med_s / 1e9 / peak_gflops, 4), peak_rss_mb=_peak_rss_mb(),
               ru_maxrss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return out


# ---------------------------------------------------------------- PyTorch

def torch_batch(method: str, npz) -> tuple:
    """ssl_jax's views (NHWC numpy) -> the peer's collated batch (NCHW tensors)."""
    import torch
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))  # noqa: E731
    index = torch.from_numpy(npz["index"].astype(np.int64))
    if method == "simclr":
        return nchw(npz["view1"]), nchw(npz["view2"]), index
    if method == "moco":
        return nchw(npz["query"]), nchw(npz["key"]), index
    if method == "rotnet":   # rows 4i..4i+3: image i rotated k = 0..3 -> (B, 4, C, H, W)
        x = npz["image"]
        return nchw(x.reshape((-1, 4) + x.shape[1:])), index
    if method == "pirl":
        return nchw(npz["image"]), nchw(npz["tiles"]), index
    raise ValueError(method)


def torch_side(method: str, views_dir: str, steps: int, warmup: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import torch_peer
    torch.set_num_threads(os.cpu_count())
    config = measure.config(method)
    batch = torch_batch(method, np.load(os.path.join(views_dir, f"{method}.npz")))
    peer = torch_peer.PEERS[method](config)
    times = measure.steady(lambda: peer.step(batch), steps, warmup)
    out = measure.summary(times, config.batch_size)
    with FlopCounterMode(display=False) as counter:
        peer.step(batch)
    flops = counter.get_total_flops()
    out.update(params=torch_peer.n_params(method, config), matmul_conv_flops_per_step=flops,
               achieved_gflops=round(flops / (out["median_ms"] / 1e3) / 1e9, 1),
               threads=torch.get_num_threads(), peak_rss_mb=_peak_rss_mb())
    return out


# ---------------------------------------------------------------- --check

def check() -> None:
    """Prints max |peer - ssl_jax| for each loss (value, gradient) and the network."""
    import jax
    import jax.numpy as jnp
    import torch

    import torch_peer
    from ssl_jax import losses
    from ssl_jax.methods import network
    jax.config.update("jax_default_matmul_precision", "highest")
    rng = np.random.default_rng(0)
    normal = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731

    def unit(*shape):   # rows of unit length, like the queue and the memory bank
        x = normal(*shape)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    diff = lambda a, b: float(np.max(np.abs(np.asarray(a) - b.detach().numpy())))  # noqa: E731
    tensor = lambda a: torch.tensor(np.array(a))  # noqa: E731

    def report(name, j_loss, j_grad, t_loss, t_grad):
        print(f"{name:26s} loss {float(j_loss):.6f} (ssl_jax) {t_loss.item():.6f} (peer): "
              f"|diff| {diff(j_loss, t_loss):.2e}; gradient max |diff| {diff(j_grad, t_grad):.2e}"
              f" (max |grad| {float(np.max(np.abs(j_grad))):.2e})")

    z1, z2 = normal(128, 128), normal(128, 128)
    jl, jg = jax.value_and_grad(lambda a: losses.nt_xent(a, z2, 0.1)[0])(z1)
    t1 = torch.tensor(z1, requires_grad=True)
    tl = torch_peer.nt_xent(t1, torch.tensor(z2), 0.1)
    tl.backward()
    report("nt_xent (B=128, T=0.1)", jl, jg, tl, t1.grad)

    q, k, queue = normal(256, 128), normal(256, 128), unit(8192, 128)
    jl, jg = jax.value_and_grad(lambda a: losses.info_nce_queue(a, k, queue, 0.2)[0])(q)
    tq = torch.tensor(q, requires_grad=True)
    tl = torch_peer.info_nce_queue(tq, torch.tensor(k), torch.tensor(queue), 0.2)
    tl.backward()
    report("info_nce_queue (K=8192)", jl, jg, tl, tq.grad)

    z, pos, neg = normal(256, 128), unit(256, 128), unit(4096, 128)
    for name, log_z in (("nce (Z estimated)", -np.inf), ("nce (Z fixed)", 11.5)):
        (jl, metrics), jg = jax.value_and_grad(
            lambda a: losses.nce(a, pos, neg, 0.07, 60000, jnp.float32(log_z)), has_aux=True)(z)
        tz = torch.tensor(z, requires_grad=True)
        tl, t_log_z = torch_peer.nce(tz, torch.tensor(pos), torch.tensor(neg), 0.07, 60000,
                                     None if np.isinf(log_z) else log_z)
        tl.backward()
        report(name, jl, jg, tl, tz.grad)
        print(f"{'':26s} log Z {float(metrics['log_z']):.6f} (ssl_jax) {t_log_z:.6f} (peer)")

    # The SimCLR network: ssl_jax's initial weights copied into the peer.
    config = measure.config("simclr")
    net = network.make_network(config)
    x = normal(16, 28, 28, 1)
    variables = net.init(jax.random.key(0), x, train=True)
    params = variables["params"]

    def j_loss(p):
        _, z, _ = network.apply(net, p, variables["batch_stats"], x, train=True)
        return losses.nt_xent(z[:8], z[8:], 0.1)[0], z
    (jl, jz), jg = jax.value_and_grad(j_loss, has_aux=True)(params)
    peer = torch_peer.SimCLR(config)
    with torch.no_grad():
        e, h = params["encoder"], params["head"]
        convs = [m for m in peer.net[0].modules() if isinstance(m, torch.nn.Conv2d)]
        bns = [m for m in peer.net[0].modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for i, (c, b) in enumerate(zip(convs, bns)):
            c.weight.copy_(tensor(e[f"conv{i + 1}"]["kernel"]).permute(3, 2, 0, 1))   # HWIO -> OIHW
            b.weight.copy_(tensor(e[f"bn{i + 1}"]["scale"]))
            b.bias.copy_(tensor(e[f"bn{i + 1}"]["bias"]))
        head = peer.net[1]   # Linear, BatchNorm1d, ReLU, Linear; flax kernels are (in, out)
        head[0].weight.copy_(tensor(h["Dense_0"]["kernel"]).T)
        head[1].weight.copy_(tensor(h["BatchNorm_0"]["scale"]))
        head[1].bias.copy_(tensor(h["BatchNorm_0"]["bias"]))
        head[3].weight.copy_(tensor(h["Dense_1"]["kernel"]).T)
        head[3].bias.copy_(tensor(h["Dense_1"]["bias"]))
    tz = peer.net(torch_peer._channels_last(torch.from_numpy(np.moveaxis(x, -1, 1))))
    tl = torch_peer.nt_xent(tz[:8], tz[8:], 0.1)
    tl.backward()
    n_jax = sum(a.size for a in jax.tree.leaves(params))
    print(f"simclr network: {n_jax} parameters (ssl_jax), "
          f"{sum(p.numel() for p in peer.net.parameters())} (peer); projections max |diff| "
          f"{diff(jz, tz):.2e} (max |z| {float(np.max(np.abs(jz))):.2e})")
    report("simclr net nt_xent, conv1", jl, np.asarray(jg["encoder"]["conv1"]["kernel"])
           .transpose(3, 2, 0, 1), tl, convs[0].weight.grad)


# ---------------------------------------------------------------- main

def main(argv):
    del argv
    if _CHECK.value:
        check()
        return
    if _SIDE.value == "torch":   # the child: its results go to --out for the parent
        measure.write_json(_OUT.value, {m: torch_side(m, _VIEWS.value, _STEPS.value, _WARMUP.value)
                                        for m in _METHODS.value})
        return
    from ssl_jax.data import sources
    from ssl_jax.datasets import prepare
    host = measure.machine()
    data_dir = _DATA_DIR.value or sources.default_data_dir()
    prepare.prepare("fashion_mnist", data_dir)
    source = sources.open_source("fashion_mnist", "train", data_dir)
    peak = measure.matmul_gflops()
    print(f"float32 matmul 2048^2 (XLA): {peak:.1f} GFLOP/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as views_dir:
        for method in _METHODS.value:
            config = measure.config(method, data_dir)
            row = {"method": method, "batch_size": config.batch_size,
                   "ssl_jax": jax_side(method, source, data_dir, _STEPS.value, _WARMUP.value,
                                       peak, views_dir)}
            if _SIDE.value == "both":
                row["torch"] = measure.run_side(__file__, "torch", dict(
                    methods=method, steps=_STEPS.value, warmup=_WARMUP.value,
                    views=views_dir))[method]
                row["ratio"] = round(row["ssl_jax"]["per_s"] / row["torch"]["per_s"], 3)
            rows.append(row)
            j, t = row["ssl_jax"], row.get("torch")
            line = (f"{method:7s} B={config.batch_size}: ssl_jax {j['median_ms']} ms = "
                    f"{j['per_s']:.0f} img/s (compile {j['compile_s']} s, "
                    f"{j['xla_flops_per_step'] / 1e9:.1f} GFLOP, MFU {j['mfu']:.1%}, "
                    f"RSS {j['peak_rss_mb']} MB)")
            if t:
                line += (f" | PyTorch {t['median_ms']} ms = {t['per_s']:.0f} img/s "
                         f"({t['matmul_conv_flops_per_step'] / 1e9:.1f} GFLOP in matmuls/convs, "
                         f"RSS {t['peak_rss_mb']} MB) | ratio {row['ratio']:.2f}x")
            print(line, flush=True)
    measure.write_json(_OUT.value, {
        "machine": host, "matmul_f32_gflops": round(peak, 1),
        "note": "model step on fixed pre-made views; images/s = source images per second; "
                "ssl_jax FLOPs from XLA's cost analysis (all ops), PyTorch's from "
                "torch.utils.flop_counter (matmuls and convolutions only)",
        "steps": _STEPS.value, "warmup": _WARMUP.value, "results": rows})
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
