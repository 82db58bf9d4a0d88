"""PIRL (Misra & van der Maaten 2020) and NPID (Wu et al. 2018): contrast each
image's embedding with a memory bank of all images' embeddings.

Two branches through one encoder:
  f(v_I)   the image view -> pooled final stage -> head (linear) -> (B, D)
  g(v_It)  9 tiles of an independent crop, shuffled -> the same encoder ->
           per-tile head (B, 9, D) -> concatenated in the shuffled order -> linear -> (B, D)
All L2-normalised. Memory bank m (memory.py): m_i <- normalise(a m_i + (1 - a) f(v_I)),
a = config.memory.momentum, updated after the loss with the global batch.

  loss = lam * L(m_I, g(v_It)) + (1 - lam) * L(m_I, f(v_I)),   lam = config.pirl.jigsaw_weight

L is the NCE of losses.nce (positive m_I, K negatives drawn uniformly from the
bank; Z estimated on the first batch and then fixed, one per branch) or, with
config.memory.loss = "infonce", a softmax cross-entropy over the same scores.
NPID is this module with lam = 0: its config has no `pirl` block, and the
jigsaw branch (views, parameters, forward pass) is never built.

The K negatives are one draw per step shared by the global batch (NPID/PIRL's
code draws K per example: the same expected loss; sharing makes the lookup
K x D instead of B x K x D, which is what lets K = 32000 fit). They come from
the step's key alone, so they are the same on any number of devices.

config.memory: size (N, the train split's size; `check` verifies it), pad_to,
momentum, negatives (K), temperature, loss, init ("random" as the papers, or
"encoder": `warm_start` fills the bank with the initial encoder's embeddings).
config.pirl: jigsaw_weight, num_permutations, tiles (jigsaw.tile_view_config
fields). config.aug: the image view.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import augment, jigsaw, losses, memory, models, parallel
from ssl_jax.data import pipeline
from ssl_jax.eval import features
from ssl_jax.methods import network

LOSSES = ("nce", "infonce")
BANK_INITS = ("random", "encoder")


def jigsaw_weight(config) -> float:
    """lam: 0 for NPID (no `pirl` block), config.pirl.jigsaw_weight for PIRL."""
    return float(config.pirl.jigsaw_weight) if "pirl" in config else 0.0


def _branches(config) -> dict[str, float]:
    """{branch: weight} of the loss terms that are computed (weight > 0)."""
    lam = jigsaw_weight(config)
    return {k: w for k, w in (("image", 1.0 - lam), ("jigsaw", lam)) if w > 0}


def check(config, global_batch: int) -> None:
    """Raises before compiling when the bank cannot match the data or the mesh."""
    del global_batch
    m = config.memory
    if m.loss not in LOSSES:
        raise ValueError(f"config.memory.loss={m.loss!r}: use one of {LOSSES}.")
    if m.get("init", "random") not in BANK_INITS:
        raise ValueError(f"config.memory.init={m.init!r}: use one of {BANK_INITS}.")
    if not 0.0 <= jigsaw_weight(config) <= 1.0:
        raise ValueError(f"config.pirl.jigsaw_weight={jigsaw_weight(config)} is not in [0, 1].")
    # The bank has one row per training image, addressed by dataset index: a
    # wrong size would silently drop updates (too small) or sample never-seen rows.
    n = len(pipeline.open_source(config.dataset, config.train_split, config.data_dir,
                                 memory_limit=0))  # lazy: only the length is read
    if m.size != n:
        raise ValueError(f"config.memory.size={m.size} but {config.dataset} "
                         f"{config.train_split!r} has {n} examples: pass --config.memory.size={n}.")
    rows, devices = memory.padded_size(m.size, m.pad_to), jax.device_count()
    if rows % devices:
        raise ValueError(f"The memory bank's {rows} rows (config.memory.size rounded up to "
                         f"config.memory.pad_to={m.pad_to}) do not split over {devices} devices: "
                         f"set config.memory.pad_to to a multiple of {devices}.")


# ---------------------------------------------------------------- views

def image_view_config(config):
    return augment.moco_v2_view_config(**config.aug.to_dict())


def tile_config(config):
    return jigsaw.tile_view_config(**config.pirl.tiles.to_dict())


def views(rng, images, config) -> dict:
    """images: (B, H, W, C) uint8 -> {"image": (B, h, w, C), and for PIRL
    "tiles": (B, 9, t, t, C) in shuffled order} float32."""
    r_image, r_tiles = jax.random.split(rng)
    out = {"image": augment.batch_views(r_image, images, image_view_config(config))}
    if "jigsaw" in _branches(config):
        perms = jigsaw.permutations(config.pirl.num_permutations)
        out["tiles"], _ = jigsaw.batch_jigsaw(r_tiles, images, tile_config(config), perms)
    return out


# ---------------------------------------------------------------- network

class PirlNetwork(nn.Module):
    """(images (B, h, w, C), tiles (B, 9, t, t, C) or None) ->
    (features {stage: ...} of the images, f (B, dim), g (B, dim) or None), float32.

    The encoder is params["encoder"], as every method's (network.encoder_variables).
    """
    encoder: nn.Module
    stage: str
    dim: int
    hidden: int
    layers: int

    @nn.compact
    def __call__(self, images, tiles, train: bool):
        def pooled(x):
            feats = self.encoder(x, train=train)
            return feats, jnp.mean(feats[self.stage].astype(jnp.float32), axis=(1, 2))

        feats, h = pooled(images)
        f = models.MLPHead(self.hidden, self.dim, self.layers, name="head")(h, train=train)
        if tiles is None:
            return feats, f, None
        b, n = tiles.shape[:2]
        # (B, 9, ...) -> (B * 9, ...) keeps each example's tiles on its device.
        _, ht = pooled(tiles.reshape((b * n,) + tiles.shape[2:]))
        t = models.MLPHead(self.hidden, self.dim, self.layers, name="tile_head")(ht, train=train)
        g = nn.Dense(self.dim, name="jigsaw_head")(t.reshape(b, n * self.dim))
        return feats, f, g


def _net(config) -> PirlNetwork:
    h = config.head
    return PirlNetwork(encoder=network.make_encoder(config.model),
                       stage=network.final_stage(config.model),
                       dim=h.dim, hidden=h.hidden, layers=h.layers)


def init(rng, views, config):
    """-> (params, state): state holds BN statistics, the bank (memory.size
    padded, head.dim) and, for NCE, log Z per branch (-inf: estimated on the
    first step)."""
    r_net, r_bank = jax.random.split(rng)
    net = _net(config)
    variables = jax.jit(lambda r, x, t: net.init(r, x, t, train=True))(
        r_net, views["image"], views.get("tiles"))
    m = config.memory
    state = {"batch_stats": variables.get("batch_stats", {}),
             "bank": memory.init(r_bank, m.size, config.head.dim, m.pad_to),
             "log_z": {k: jnp.full((), -jnp.inf, jnp.float32) for k in _branches(config)
                       if m.loss == "nce"}}
    return variables["params"], state


def warm_start(params, state, source, config, mesh):
    """With config.memory.init="encoder", the bank's rows start as the initial
    network's embeddings f(x_i) of every training image (deterministic eval view
    of config.aug, BN on batch statistics as in training, which are not kept);
    with "random" (the papers) `state` is returned as it is. The train loop calls
    this once, at step 0, never on resume.

    Why: a row becomes its image's embedding only when the image is first
    visited, so through the whole first epoch every positive is a random vector
    and the loss teaches noise. At 200 epochs that is 0.5% of the run; at the
    few epochs a CPU affords it is the run (Fashion-MNIST, 1 epoch, random
    rows: linear probe 51% against 84% for the untrained encoder). Costs one
    forward pass over the split; the rows are written with memory.update at
    momentum 0, sharded as in training. state["bank"] is donated.
    """
    if config.memory.get("init", "random") == "random":
        return state
    net = _net(config)
    view_cfg = features.eval_view_config(config)
    set_rows = lambda bank, i, v, axis_name: memory.update(bank, i, v, 0.0, axis_name)

    def fill(params, batch_stats, bank, images, index):
        x = augment.batch_views(jax.random.key(0), images, view_cfg)
        (_, f, _), _ = net.apply({"params": params, "batch_stats": batch_stats}, x, None,
                                 train=True, mutable=["batch_stats"])
        # Padding rows of the last batch carry index -1: update drops them.
        return parallel.on_shards(set_rows, (True, True, True), batch_out=True)(bank, index, f)

    repl, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    bank_sh = state["bank"].sharding
    fn = jax.jit(fill, in_shardings=(repl, repl, bank_sh, shard, shard), out_shardings=bank_sh,
                 donate_argnums=2)
    bank = state["bank"]
    for batch in pipeline.eval_batches(source, config.batch_size, jax.process_index(),
                                       jax.process_count()):
        batch = parallel.global_batch({"image": batch["image"], "index": batch["index"]}, mesh)
        bank = fn(params, state["batch_stats"], bank, batch["image"], batch["index"])
    return dict(state, bank=bank)


def state_sharding(shapes, mesh):
    """The bank's rows are sharded over the mesh; the rest is replicated."""
    out = jax.tree.map(lambda _: parallel.replicated(mesh), shapes)
    out["bank"] = parallel.batch_sharding(mesh)
    return out


# ---------------------------------------------------------------- loss

def _contrast(z, pos, neg, log_z, config):
    """One term L(m_I, z) -> (loss, metrics); with NCE metrics["log_z"] is the
    log Z to keep (log_z: the stored one, -inf before the first step)."""
    m = config.memory
    if m.loss == "nce":
        fn = lambda z_, p, u, lz, axis_name: losses.nce(z_, p, u, m.temperature, m.size, lz, axis_name)
        return parallel.on_shards(fn, (True, True, False, False))(z, pos, neg, log_z)
    # InfoNCE: MoCo's loss, the memory row as the positive key, the negatives as its queue.
    fn = lambda z_, p, u, axis_name: losses.info_nce_queue(z_, p, u, m.temperature, axis_name)
    return parallel.on_shards(fn, (True, True, False))(z, pos, neg)


def loss(params, state, views, indices, rng, config):
    """indices: (B,) dataset indices of the batch (< config.memory.size).
    Returns (loss, (metrics, new_state)); new_state has the moved bank rows."""
    m, net = config.memory, _net(config)
    (_, f, g), updates = net.apply({"params": params, "batch_stats": state["batch_stats"]},
                                   views["image"], views.get("tiles"), train=True,
                                   mutable=["batch_stats"])
    b = f.shape[0]
    negatives = memory.sample_negatives(rng, m.negatives, m.size)
    # One lookup for positives and negatives: a single psum over the sharded bank.
    rows = parallel.on_shards(memory.lookup, (True, False))(
        state["bank"], jnp.concatenate([indices.astype(jnp.int32), negatives]))
    pos, neg = rows[:b], rows[b:]

    value, metrics, log_z = 0.0, {}, {}
    for branch, weight in _branches(config).items():
        term, mt = _contrast(f if branch == "image" else g, pos, neg,
                             state["log_z"].get(branch), config)
        value = value + weight * term
        if "log_z" in mt:
            log_z[branch] = mt["log_z"] = jax.lax.stop_gradient(mt["log_z"])
        metrics.update({f"loss_{branch}": term, **{f"{k}_{branch}": v for k, v in mt.items()}})

    update = lambda bank, i, v, axis_name: memory.update(bank, i, v, m.momentum, axis_name)
    bank = parallel.on_shards(update, (True, True, True), batch_out=True)(
        state["bank"], indices.astype(jnp.int32), f)
    new_state = {"batch_stats": updates["batch_stats"], "bank": bank, "log_z": log_z}
    return value, (metrics, new_state)
