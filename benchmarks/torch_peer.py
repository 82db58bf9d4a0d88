r"""ssl_jax's Fashion-MNIST pretraining written the PyTorch way: the yardstick
of the speed benchmarks (end_to_end.py, step.py, augment.py).

    python benchmarks/torch_peer.py [--methods simclr,moco,rotnet,pirl] [--steps 20]

trains each method for --steps steps on the prepared fashion_mnist and prints
its images/s (the benchmarks record the numbers; this is for a quick look).

As VISSL, solo-learn and lightly do it: a `torch.utils.data.Dataset` over the
same uint8 arrays makes each image's views in DataLoader workers with PIL and
NumPy (torch_views.py); a DataLoader (2 workers, persistent, no pinned memory,
drop_last) batches them; the model runs NCHW in channels_last, eager, with
torch.set_num_threads(os.cpu_count()). Per step it does what ssl_jax's step
does, from the same config (configs/<method>.py:dataset=fashion_mnist): batch,
encoder (models/convnet.py: four 3x3 conv -> BN -> 2x2 max-pool -> ReLU blocks,
32-64-128-256, the last not pooled, global average), heads (models/heads.py
MLPHead), loss (losses.py), optimizer (AdamW / SGD with weight decay on
matrices and kernels only), and as many forward and backward passes:
  simclr  both views in one pass (2B images), NT-Xent.
  moco    query pass + backward; momentum update of the key encoder; key pass on
          the shuffled keys (unshuffled after); InfoNCE against the queue; enqueue.
  rotnet  one light view (reflect-padded crop + flip) in its 4 rotations (4B
          images) through the ConvNet (the Fashion-MNIST config's encoder, not
          NIN) and a linear 4-way classifier, cross-entropy.
  pirl    image pass and a pass over the 9B jigsaw tiles (one encoder), linear
          heads, NCE of both against the memory bank (K negatives drawn once per
          step, Z fixed after the first step), bank moved towards the image branch.

Where the views are made is the comparison itself, not a difference: ssl_jax
inside its jitted step, the peer per image on the host (torch_views.py lists
how its PIL ops differ in rounding from ssl_jax's float ones).

Differences left (none changes the work of a step by more than a few
element-wise ops over the parameters):
  * MoCo's shuffle-BN is a no-op on one device, so the peer's BN normalises the
    whole batch; ssl_jax emulates 8 GPUs (config.moco.bn_groups=8) with 8 ghost
    BN groups: the same arithmetic, statistics over 32 rows instead of 256.
  * ssl_jax's trainer also computes the gradient norm and a non-finite guard,
    and follows the learning-rate schedule; the peer keeps the peak rate.
  * The peer's bank has N rows (ssl_jax pads to 1024 rows for sharding) and is
    updated with index_copy_ as NPID's code does (ssl_jax also averages a
    batch's duplicate indices, which a batch within an epoch never has).
  * Initialisations are PyTorch's defaults.
"""
from __future__ import annotations

import math
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags
from torch import nn

import measure  # benchmarks/*.py: Python imports from a script's own folder
import torch_views

# ---------------------------------------------------------------- models


class ConvNet(nn.Module):
    """(B, C, H, W) -> (B, widths[-1]) globally average-pooled final block."""

    def __init__(self, widths=(32, 64, 128, 256), in_channels: int = 1):
        super().__init__()
        layers, c = [], in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)]
            if i + 1 < len(widths):
                layers.append(nn.MaxPool2d(2))   # ReLU after the pool, as ssl_jax (they commute)
            layers.append(nn.ReLU(inplace=True))
            c = w
        self.body, self.dim = nn.Sequential(*layers), c

    def forward(self, x):
        return self.body(x).mean((2, 3))


def mlp_head(in_dim: int, hidden: int, out: int, layers: int) -> nn.Sequential:
    """MLPHead: (layers - 1) x [Linear (no bias) -> BN -> ReLU], then Linear."""
    mods, d = [], in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    return nn.Sequential(*mods, nn.Linear(d, out))


def encoder(config) -> ConvNet:
    if config.model.name != "convnet":
        raise NotImplementedError(f"The peer has only the demo ConvNet, not {config.model.name}.")
    return ConvNet(tuple(config.model.widths))


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


def optimizer(params, config) -> torch.optim.Optimizer:
    """config.optimizer's rule at its peak rate; weight decay on tensors with >= 2 dims."""
    o = config.optimizer
    lr = o.lr * (config.batch_size / o.lr_batch_scale if o.lr_batch_scale else 1.0)
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(o.b1, o.b2), eps=1e-8)
    raise NotImplementedError(f"optimizer {o.name!r}")


# ---------------------------------------------------------------- losses

def nt_xent(z1, z2, temperature: float):
    """z1, z2: (B, D) -> mean over the 2B anchors of the cross-entropy of the
    (2B - 1)-way choice of the positive, self-similarity masked."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    b = z1.shape[0]
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * b, dtype=torch.bool), -1e9)
    labels = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return F.cross_entropy(logits, labels)


def info_nce_queue(q, k, queue, temperature: float):
    """q, k: (B, D); queue: (K, D) normalised -> MoCo's InfoNCE, positive first."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1).detach()
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


def nce(z, pos, neg, temperature: float, num_data: int, log_z=None):
    """NPID's NCE. z: (b, D); pos: (b, D) bank rows; neg: (K, D) bank rows.
    log_z None: estimate log Z from this batch (N * mean exp(score)).
    Returns (loss, log_z to keep)."""
    z = F.normalize(z, dim=1)
    scores = torch.cat([(z * pos).sum(1, keepdim=True), z @ neg.T], 1) / temperature
    if log_z is None:
        s = scores.detach().flatten()
        log_z = math.log(num_data) + (torch.logsumexp(s, 0) - math.log(s.numel())).item()
    log_noise = math.log(neg.shape[0] / num_data)
    log_p = scores - log_z
    log_denom = torch.logaddexp(log_p, torch.tensor(log_noise))
    per_example = -(log_p[:, 0] - log_denom[:, 0]) - (log_noise - log_denom[:, 1:]).sum(1)
    return per_example.mean(), log_z


# ---------------------------------------------------------------- methods
# Each peer: __init__(config); step(batch) -> loss (a 0-d tensor, detached);
# batch = the DataLoader's collated items (torch_views: (*views, index)).

class SimCLR:
    def __init__(self, config):
        h = config.head
        enc = encoder(config)
        self.net = nn.Sequential(enc, mlp_head(enc.dim, h.hidden, h.dim, h.layers))
        self.net = self.net.to(memory_format=torch.channels_last).train()
        self.opt, self.t = optimizer(self.net.parameters(), config), config.simclr.temperature

    def step(self, batch):
        v1, v2, _ = batch
        z = self.net(_channels_last(torch.cat([v1, v2])))   # one pass: BN over 2B, as ssl_jax
        loss = nt_xent(z[:len(v1)], z[len(v1):], self.t)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


class MoCo:
    def __init__(self, config):
        h, m = config.head, config.moco
        enc = encoder(config)
        self.q = nn.Sequential(enc, mlp_head(enc.dim, h.hidden, h.dim, h.layers))
        self.q = self.q.to(memory_format=torch.channels_last).train()
        self.k = nn.Sequential(encoder(config), mlp_head(enc.dim, h.hidden, h.dim, h.layers))
        self.k = self.k.to(memory_format=torch.channels_last).train()
        self.k.load_state_dict(self.q.state_dict())
        for p in self.k.parameters():
            p.requires_grad = False
        self.queue = F.normalize(torch.randn(m.queue_size, h.dim), dim=1)
        self.ptr, self.m, self.t = 0, m.momentum, m.temperature
        self.opt = optimizer(self.q.parameters(), config)

    def step(self, batch):
        query, key, _ = batch
        q = self.q(_channels_last(query))
        with torch.no_grad():
            for pk, pq in zip(self.k.parameters(), self.q.parameters()):
                pk.mul_(self.m).add_(pq.detach(), alpha=1 - self.m)
            # Shuffle-BN: on one device the shuffle cannot change the statistics;
            # kept because MoCo's code does it.
            perm = torch.randperm(len(key))
            k = F.normalize(self.k(_channels_last(key[perm])), dim=1)[torch.argsort(perm)]
        loss = info_nce_queue(q, k, self.queue, self.t)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.queue[self.ptr:self.ptr + len(k)] = k
        self.ptr = (self.ptr + len(k)) % len(self.queue)
        return loss.detach()


class RotNet:
    def __init__(self, config):
        enc = encoder(config)
        self.net = nn.Sequential(enc, nn.Linear(enc.dim, 4)).to(memory_format=torch.channels_last)
        self.net.train()
        self.opt = optimizer(self.net.parameters(), config)

    def step(self, batch):
        rotated, _ = batch                                    # (B, 4, C, H, W)
        b = rotated.shape[0]
        logits = self.net(_channels_last(rotated.flatten(0, 1)))
        loss = F.cross_entropy(logits, torch.arange(4).repeat(b))   # row 4i + k shows k
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


class PirlNet(nn.Module):
    """(image (B, C, h, w), tiles (9B, C, t, t), tiles of one image adjacent)
    -> f (B, dim), g (B, dim): one encoder, heads as methods/pirl.py."""

    def __init__(self, config):
        super().__init__()
        h = config.head
        self.encoder = encoder(config)
        self.head = mlp_head(self.encoder.dim, h.hidden, h.dim, h.layers)
        self.tile_head = mlp_head(self.encoder.dim, h.hidden, h.dim, h.layers)
        self.jigsaw_head = nn.Linear(9 * h.dim, h.dim)

    def forward(self, image, tiles):
        f = self.head(self.encoder(image))
        t = self.tile_head(self.encoder(tiles)).reshape(image.shape[0], -1)
        return f, self.jigsaw_head(t)


class PIRL:
    def __init__(self, config):
        m = config.memory
        self.net = PirlNet(config).to(memory_format=torch.channels_last).train()
        self.opt = optimizer(self.net.parameters(), config)
        bound = 1.0 / math.sqrt(config.head.dim / 3.0)   # NPID's init
        self.bank = F.normalize(torch.empty(m.size, config.head.dim).uniform_(-bound, bound), dim=1)
        self.m, self.log_z = m, {"image": None, "jigsaw": None}
        self.lam = config.pirl.jigsaw_weight

    def step(self, batch):
        image, tiles, index = batch
        f, g = self.net(_channels_last(image), _channels_last(tiles.flatten(0, 1)))
        m = self.m
        negatives = torch.randint(0, m.size, (m.negatives,))
        rows = self.bank[torch.cat([index, negatives])]
        pos, neg = rows[:len(index)], rows[len(index):]
        loss = 0.0
        for branch, z, w in (("image", f, 1 - self.lam), ("jigsaw", g, self.lam)):
            term, self.log_z[branch] = nce(z, pos, neg, m.temperature, m.size, self.log_z[branch])
            loss = loss + w * term
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            moved = m.momentum * pos + (1 - m.momentum) * F.normalize(f.detach(), dim=1)
            self.bank.index_copy_(0, index, F.normalize(moved, dim=1))
        return loss.detach()


PEERS = {"simclr": SimCLR, "moco": MoCo, "rotnet": RotNet, "pirl": PIRL}


# ---------------------------------------------------------------- training

def loader(method: str, config, images: np.ndarray, workers: int = 2):
    """The PyTorch way's input: per-image views in `workers` processes."""
    data = torch_views.Items(images, torch_views.item_maker(method, config))
    return torch.utils.data.DataLoader(
        data, batch_size=config.batch_size, shuffle=True, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=False, drop_last=True)


def time_training(method: str, config, images: np.ndarray, steps: int, warmup: int,
                  workers: int = 2) -> dict:
    """Trains `warmup` + `steps` steps; per timed step, the time of one
    iteration (next(loader) + step) and of next(loader) alone (waiting for data).

    Returns {"iter_s": [...], "wait_s": [...], "first_batch_s", "loss"}.
    """
    torch.set_num_threads(os.cpu_count())
    peer = PEERS[method](config)
    it = iter(loader(method, config, images, workers))
    t = time.perf_counter()
    batch = next(it)   # worker start-up: reported, not timed with the steps
    first = time.perf_counter() - t
    peer.step(batch)
    for _ in range(warmup - 1):
        peer.step(next(it))
    iters, waits = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        loss = peer.step(batch)
        iters.append(time.perf_counter() - t0)
        waits.append(t1 - t0)
    del it   # ends the persistent workers
    return {"iter_s": iters, "wait_s": waits, "first_batch_s": first, "loss": float(loss)}


def n_params(method: str, config) -> int:
    peer = PEERS[method](config)
    net = peer.q if method == "moco" else peer.net
    return sum(p.numel() for p in net.parameters())


def main(argv):
    del argv
    from ssl_jax.data import sources   # reads the prepared TFDS split (no JAX computation)
    images = sources.open_source("fashion_mnist", "train", _DATA_DIR.value).image
    for method in _METHODS.value:
        config = measure.config(method, _DATA_DIR.value)
        r = time_training(method, config, images, _STEPS.value, warmup=3)
        s, wait = statistics.median(r["iter_s"]), sum(r["wait_s"]) / sum(r["iter_s"])
        print(f"{method:7s} B={config.batch_size}: {config.batch_size / s:.0f} img/s "
              f"({s * 1e3:.0f} ms/step, waiting for data {wait:.0%}), loss {r['loss']:.3f}",
              flush=True)


if __name__ == "__main__":
    # Flags only when run as a script: the benchmarks import this module and
    # define their own --methods and --steps.
    _METHODS = flags.DEFINE_list("methods", list(PEERS), "Methods (configs/<name>.py).")
    _STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per method (after 3 warm-up).")
    _DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir; default TFDS's.")
    app.run(main)
