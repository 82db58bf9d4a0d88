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

The bank has one row per training image, N = spec.num_examples (read from the
prepared dataset by the setup layer), addressed by the batch's dataset indices.
config.memory: pad_to, momentum, negatives (K), temperature, loss, init
("random" as the papers, or "encoder": the warm start fills the bank with the
initial network's embeddings).
config.pirl: jigsaw_weight, num_permutations (0: each image's tiles in an order
drawn uniformly from all 9!, as PIRL's code does; P > 0: one of P fixed
maximal-Hamming permutations, the Jigsaw task's set), tiles
(jigsaw.pirl_tile_view_config fields). config.aug: fields over the image view's
recipe (augment.pirl_view_config for PIRL, augment.npid_view_config for NPID).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import errors, losses, models, parallel
from ssl_jax.methods import base, memory, network
from ssl_jax.views import augment, jigsaw

LOSSES = ("nce", "infonce")
BANK_INITS = ("random", "encoder")


def jigsaw_weight(config) -> float:
    """lam: 0 for NPID (no `pirl` block), config.pirl.jigsaw_weight for PIRL."""
    return float(config.pirl.jigsaw_weight) if "pirl" in config else 0.0


def _branches(config) -> dict[str, float]:
    """{branch: weight} of the loss terms that are computed (weight > 0)."""
    lam = jigsaw_weight(config)
    return {k: w for k, w in (("image", 1.0 - lam), ("jigsaw", lam)) if w > 0}


def check(config, spec, mesh) -> None:
    """Raises before compiling when the bank cannot match the mesh."""
    m = config.memory
    if jigsaw_weight(config) > 0 and config.model.name in models.VITS:
        raise errors.UserError(f"PIRL's jigsaw branch with model={config.model.name}: its "
                               "tiles are too small for a ViT's patches; use a ConvNet, or "
                               "NPID (configs/npid.py) for a ViT with a memory bank.")
    if m.loss not in LOSSES:
        raise errors.UserError(f"config.memory.loss={m.loss!r}: use one of {LOSSES}.")
    if m.get("init", "random") not in BANK_INITS:
        raise errors.UserError(f"config.memory.init={m.init!r}: use one of {BANK_INITS}.")
    if not 0.0 <= jigsaw_weight(config) <= 1.0:
        raise errors.UserError(
            f"config.pirl.jigsaw_weight={jigsaw_weight(config)} is not in [0, 1].")
    rows, devices = memory.padded_size(spec.num_examples, m.pad_to), mesh.devices.size
    if rows % devices:
        raise errors.UserError(
            f"The memory bank's {rows} rows ({spec.num_examples} train images rounded up to "
            f"config.memory.pad_to={m.pad_to}) do not split over {devices} devices: set "
            f"config.memory.pad_to to a multiple of {devices}.")


# ---------------------------------------------------------------- views

def image_view_config(config):
    """The image view: PIRL's recipe for PIRL, NPID's for NPID, config.aug on top."""
    recipe = augment.pirl_view_config if "pirl" in config else augment.npid_view_config
    return recipe(**config.aug.to_dict())


def tile_config(config):
    return jigsaw.pirl_tile_view_config(**config.pirl.tiles.to_dict())


def views(rng, images, config) -> dict:
    """images: (B, H, W, C) uint8 -> {"image": (B, h, w, C), and for PIRL
    "tiles": (B, 9, t, t, C) in shuffled order} float32."""
    r_image, r_tiles = jax.random.split(rng)
    out = {"image": augment.batch_views(r_image, images, image_view_config(config))}
    if "jigsaw" in _branches(config):
        num = config.pirl.num_permutations
        if num:
            out["tiles"], _ = jigsaw.batch_jigsaw(r_tiles, images, tile_config(config),
                                                  jigsaw.permutations(num))
        else:
            out["tiles"], _ = jigsaw.batch_any_order(r_tiles, images, tile_config(config))
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
            return feats, models.summary(feats[self.stage])

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


def _net(config, stochastic: bool = True) -> PirlNetwork:
    h = config.head
    return PirlNetwork(encoder=network.make_encoder(config.model, stochastic=stochastic),
                       stage=network.final_stage(config.model),
                       dim=h.dim, hidden=h.hidden, layers=h.layers)


def init(rng, views, config, spec):
    """-> (params, state): state holds BN statistics, the bank (spec.num_examples
    rows padded to memory.pad_to, head.dim) and, for NCE, log Z per branch (-inf:
    estimated on the first step)."""
    r_net, r_bank = jax.random.split(rng)
    net = _net(config)
    variables = jax.jit(lambda r, x, t: net.init(network.init_rngs(r), x, t, train=True))(
        r_net, views["image"], views.get("tiles"))
    m = config.memory
    state = {"batch_stats": variables.get("batch_stats", {}),
             "bank": memory.init(r_bank, spec.num_examples, config.head.dim, m.pad_to),
             "log_z": {k: jnp.full((), -jnp.inf, jnp.float32) for k in _branches(config)
                       if m.loss == "nce"}}
    return variables["params"], state


# ---------------------------------------------------------------- warm start
# With config.memory.init="encoder", the bank's rows start as the initial
# network's embeddings f(x_i) of every training image (the eval view, BN on
# batch statistics as in training, which are not kept); with "random" (the
# papers) the bank keeps its random rows. The setup layer runs `_embed` over the
# train split at step 0 (never on resume) and writes each batch with `_write`.
#
# Why: a row becomes its image's embedding only when the image is first
# visited, so through the whole first epoch every positive is a random vector
# and the loss teaches noise. At 200 epochs that is 0.5% of the run; at the few
# epochs a CPU affords it is the run (Fashion-MNIST, 1 epoch, random rows:
# linear probe 51% against 84% for the untrained encoder).

def _warm_start_wanted(config) -> bool:
    return config.memory.get("init", "random") == "encoder"


def _embed(params, state, x, config):
    """x: (B, h, w, C) eval views -> f(x) (B, dim) float32, BN on the batch's statistics."""
    (_, f, _), _ = _net(config, stochastic=False).apply(
        {"params": params, "batch_stats": state["batch_stats"]}, x, None, train=True,
        mutable=["batch_stats"])
    return f


def _write(state, index, values, config, spec):
    """Rows `index` (B,) of the bank set to values (B, D), L2-normalised (momentum 0);
    index -1 (padding of the last batch) is dropped."""
    del config, spec
    set_rows = lambda bank, i, v, axis_name: memory.update(bank, i, v, 0.0, axis_name)
    bank = parallel.on_shards(set_rows, (True, True, True), batch_out=True)(
        state["bank"], index, values)
    return dict(state, bank=bank)


def state_sharding(shapes, mesh):
    """The bank's rows are sharded over the mesh; the rest is replicated."""
    out = jax.tree.map(lambda _: parallel.replicated(mesh), shapes)
    out["bank"] = parallel.batch_sharding(mesh)
    return out


# ---------------------------------------------------------------- loss

def _contrast(z, pos, neg, log_z, config, num_data: int):
    """One term L(m_I, z) -> (loss, metrics); with NCE metrics["log_z"] is the
    log Z to keep (log_z: the stored one, -inf before the first step)."""
    m = config.memory
    if m.loss == "nce":
        fn = lambda z_, p, u, lz, axis_name: losses.nce(z_, p, u, m.temperature, num_data, lz, axis_name)
        return parallel.on_shards(fn, (True, True, False, False))(z, pos, neg, log_z)
    # InfoNCE: MoCo's loss, the memory row as the positive key, the negatives as its queue.
    fn = lambda z_, p, u, axis_name: losses.info_nce_queue(z_, p, u, m.temperature, axis_name)
    return parallel.on_shards(fn, (True, True, False))(z, pos, neg)


def loss(params, state, views, batch, rng, config, spec):
    """batch["index"]: (B,) dataset indices of the batch (< spec.num_examples).
    Returns (loss, (metrics, new_state)); new_state has the moved bank rows."""
    m, net, n = config.memory, _net(config), spec.num_examples
    indices = batch["index"]
    (_, f, g), updates = net.apply({"params": params, "batch_stats": state["batch_stats"]},
                                   views["image"], views.get("tiles"), train=True,
                                   mutable=["batch_stats"],
                                   rngs=network.rngs(jax.random.fold_in(rng, 1)))
    b = f.shape[0]
    negatives = memory.sample_negatives(rng, m.negatives, n)
    # One lookup for positives and negatives: a single psum over the sharded bank.
    rows = parallel.on_shards(memory.lookup, (True, False))(
        state["bank"], jnp.concatenate([indices.astype(jnp.int32), negatives]))
    pos, neg = rows[:b], rows[b:]

    value, metrics, log_z = 0.0, {}, {}
    for branch, weight in _branches(config).items():
        term, mt = _contrast(f if branch == "image" else g, pos, neg,
                             state["log_z"].get(branch), config, n)
        value = value + weight * term
        if "log_z" in mt:
            log_z[branch] = mt["log_z"] = jax.lax.stop_gradient(mt["log_z"])
        metrics.update({f"loss_{branch}": term, **{f"{k}_{branch}": v for k, v in mt.items()}})

    update = lambda bank, i, v, axis_name: memory.update(bank, i, v, m.momentum, axis_name)
    bank = parallel.on_shards(update, (True, True, True), batch_out=True)(
        state["bank"], indices.astype(jnp.int32), f)
    new_state = {"batch_stats": updates.get("batch_stats", {}), "bank": bank, "log_z": log_z}
    return value, (metrics, new_state)


METHOD = base.Method(
    views=views, init=init, loss=loss, check=check, state_sharding=state_sharding,
    warm_start=base.WarmStart(wanted=_warm_start_wanted, embed=_embed, write=_write))
