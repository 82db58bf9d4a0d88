"""M views per image, one M-view contrastive loss: Poly-View (Shidani et al., ICLR 2024),
CMC over augmented views (Tian et al. 2019), MV-InfoNCE and MV-DHEL (Koromilas et al.
2025). Registered as "polyview" and "cmc" (configs/polyview.py, configs/cmc.py): one
method, the loss picked by the config.

Views: config.views.count = M crops of every image, all at the view size with one recipe
(config.aug on SimCLR's, views/augment.simclr_view_config), made by
multicrop.uniform_spec(global_crops=M); optionally config.views.local_crops smaller ones
(local_size, local_scale), which join the M as further views of the same image (SwAV's
multi-crop). The encoder runs once per resolution group on (B * n, h, w, C), so BN
normalises each group with that group's own statistics (as SimCLR's multi-crop,
methods/simclr.py); the head is config.head (network.make_network), SimCLR's by default.

The loss, config.multiview.loss (each config sets its method's name as the default):
  "polyview"    multiview.polyview, config.polyview.variant = "geometric" | "arithmetic"
  "cmc"         multiview.cmc, config.cmc.graph = "core" | "full"
  "mv_infonce"  multiview.mv_infonce
  "mv_dhel"     multiview.mv_dhel
each at config.multiview.temperature, its candidates the whole global batch
(parallel.on_shards), on the head's outputs z: (B, M [+ L], D) in view order (the global
crops first). A loss's own block may be absent: its default (geometric, core) is used.

config.views.kind: "crops" (the above), or "channels": CMC's L vs ab of Lab (Tian et al.;
HobbitLong/CMC train_CMC.py), one crop of each image (config.aug's recipe) through
config.model = cmc_lab (models/split.py: a half-width encoder on L, another on ab), and
config.head's head on each half's pooled final stage, separate parameters (ChannelHeads,
the authors' one `fc` per half): z (B, 2, D), view 0 = L, view 1 = ab, for the configured
loss (CMC's: L(L, ab) + L(ab, L)). The evaluators read the halves' concatenation, or
either half (l_<stage>, ab_<stage>). A dataset that is not RGB is refused in one line
(on a grey one, saying why: there is no ab to split off).

config.cmc.objective (loss "cmc"): "softmax" (the in-batch softmax above, the default) or
"nce", the authors' NCE with memory banks (HobbitLong/CMC NCEAverage, NCECriterion):
one bank per view (memory.py, NPID's; state["banks"]["view<m>"], sharded over the mesh
as NPID's), config.cmc.nce_k negatives drawn once a step from the step's key and looked
up in every bank, view a's embeddings against view c's bank for each pair of the graph,
both directions summed (multiview.cmc_nce), each directed term's Z estimated on the
first step and kept (state["log_z"]: (M, M), checkpointed, the same on every device);
after the loss each bank's rows of the batch move to normalise(m row + (1 - m) z),
m = config.cmc.nce_momentum. Rows: spec.num_examples, padded to config.cmc.pad_to.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import models, multiview, parallel
from ssl_jax.errors import UserError
from ssl_jax.methods import base, memory, network
from ssl_jax.models import split
from ssl_jax.models.heads import projection_head
from ssl_jax.views import augment, multicrop

VIEW_KINDS = ("crops", "channels")
CMC_OBJECTIVES = ("softmax", "nce")


def _polyview(z, c, axis_name):
    variant = c.get("polyview", {}).get("variant", "geometric")
    return multiview.polyview(z, c.multiview.temperature, variant, axis_name)


def _cmc(z, c, axis_name):
    graph = c.get("cmc", {}).get("graph", "core")
    return multiview.cmc(z, c.multiview.temperature, graph, axis_name)


# config.multiview.loss -> fn(z (b, V, D) this device's rows, config, axis_name).
LOSSES = {
    "polyview": _polyview,
    "cmc": _cmc,
    "mv_infonce": lambda z, c, ax: multiview.mv_infonce(z, c.multiview.temperature, ax),
    "mv_dhel": lambda z, c, ax: multiview.mv_dhel(z, c.multiview.temperature, ax),
}


def channels_refusal(channels: int | None, dataset: str) -> str:
    """The one line that refuses views=channels: on a dataset of `channels` != 3 channels
    why it cannot be; else (configs/polyview.py's views=channels) where it is built."""
    if channels == 1:
        return (f"views=channels splits a colour image into CMC's L and ab views (Lab), and "
                f"{dataset} has one channel (grey): there is no ab to split off; use "
                "augmented views, views=M (config.views.kind=crops).")
    if channels is not None and channels != 3:
        return (f"views=channels converts RGB images to Lab (CMC's L and ab views), and "
                f"{dataset} has {channels} channels: use augmented views, views=M.")
    return ("views=channels is CMC's two half-width encoders (L and ab of Lab): run "
            "configs/cmc.py:views=channels (or augmented views here, views=M).")


class ChannelHeads(nn.Module):
    """images (B, H, W, 3) -> (features {stage: ...} of the cmc_lab encoder, z (B, 2, D)
    float32): z[:, 0] the L head's output on the L half's pooled final stage, z[:, 1] the
    ab head's on the ab half's (HobbitLong/CMC models/resnet.py: each half its own fc)."""
    encoder: nn.Module
    l_head: nn.Module
    ab_head: nn.Module
    stage: str  # the encoder's final stage; the halves' are l_<stage>, ab_<stage>

    def __call__(self, x, train: bool):
        feats = self.encoder(x, train=train)
        z = [head(models.summary(feats[f"{half}_{self.stage}"]), train=train)
             for half, head in zip(split.HALVES, (self.l_head, self.ab_head))]
        return feats, jnp.stack(z, axis=1)


def augment_config(config):
    return augment.simclr_view_config(**config.aug.to_dict())


def _channels(config) -> bool:
    return config.views.get("kind", "crops") == "channels"


def spec(config) -> multicrop.Spec:
    """The resolution groups: config.views.count crops at the view size, and
    config.views.local_crops (default 0) at local_size; with channel views, one crop."""
    v = config.views
    if _channels(config):
        return multicrop.uniform_spec(augment_config(config), 1, 0)
    local = v.get("local_crops", 0)
    return multicrop.uniform_spec(
        augment_config(config), v.count, local, local_size=v.get("local_size") if local else None,
        local_scale=v.get("local_scale", (0.05, 0.14)))


def check(config, data_spec, mesh) -> None:
    v = config.views
    kind = v.get("kind", "crops")
    if kind not in VIEW_KINDS:
        raise UserError(f"config.views.kind={kind!r}: use one of {VIEW_KINDS}.")
    if kind == "channels":
        _check_channels(config, data_spec)
    elif isinstance(v.count, bool) or not isinstance(v.count, int) or v.count < 2:
        raise UserError(f"config.views.count={v.count!r}: the M-view losses need M >= 2 "
                        "views of each image (one has no positive); set views=M, M >= 2.")
    name = config.multiview.loss
    if name not in LOSSES:
        raise UserError(f"config.multiview.loss={name!r}: use one of {sorted(LOSSES)}.")
    if name == "polyview":
        variant = config.get("polyview", {}).get("variant", "geometric")
        if variant not in multiview.POLYVIEW_VARIANTS:
            raise UserError(f"config.polyview.variant={variant!r}: use one of "
                            f"{multiview.POLYVIEW_VARIANTS} (variant=arithmetic).")
    if name == "cmc":
        graph = config.get("cmc", {}).get("graph", "core")
        if graph not in multiview.CMC_GRAPHS:
            raise UserError(f"config.cmc.graph={graph!r}: use one of {multiview.CMC_GRAPHS} "
                            "(graph=full).")
    objective = config.get("cmc", {}).get("objective", "softmax")
    if objective not in CMC_OBJECTIVES:
        raise UserError(f"config.cmc.objective={objective!r}: use one of {CMC_OBJECTIVES} "
                        "(objective=nce).")
    if objective == "nce":
        _check_nce(config, data_spec, mesh)
    spec(config)  # its own checks: counts, sizes
    video = config.get("video")
    if video is not None and video.get("positives", "frame") != "frame":
        raise UserError(f"config.video.positives={video.positives!r} brings two images per "
                        "example and the M views are crops of one: use positives=frame.")


def _check_nce(config, data_spec, mesh) -> None:
    """objective=nce: CMC's loss, one bank per view (no local crops), K >= 1 negatives, a
    momentum in [0, 1), and bank rows that split over the mesh's devices."""
    c, v = config.cmc, config.views
    if config.multiview.loss != "cmc":
        raise UserError(f"config.cmc.objective='nce' is CMC's loss with memory banks, and "
                        f"config.multiview.loss={config.multiview.loss!r}: set it to 'cmc'.")
    if v.get("local_crops", 0):
        raise UserError(f"config.views.local_crops={v.local_crops!r} with objective=nce: each "
                        "view has its own memory bank, local crops have none; set local_crops=0.")
    if isinstance(c.nce_k, bool) or not isinstance(c.nce_k, int) or c.nce_k < 1:
        raise UserError(f"config.cmc.nce_k={c.nce_k!r}: the number of negatives drawn from "
                        "the banks must be an int >= 1 (CMC's 16384).")
    if not 0.0 <= c.nce_momentum < 1.0:
        raise UserError(f"config.cmc.nce_momentum={c.nce_momentum!r} is not in [0, 1) "
                        "(CMC's 0.5).")
    rows, devices = memory.padded_size(data_spec.num_examples, _pad_to(config)), mesh.devices.size
    if rows % devices:
        raise UserError(f"The memory banks' {rows} rows ({data_spec.num_examples} train images "
                        f"rounded up to config.cmc.pad_to={_pad_to(config)}) do not split over "
                        f"{devices} devices: set config.cmc.pad_to to a multiple of {devices}.")


def _check_channels(config, data_spec) -> None:
    """views=channels: RGB data, the cmc_lab encoder undoing config.aug's normalisation,
    its two views and no local crops."""
    shape = getattr(data_spec, "image_shape", None)
    if shape and shape[-1] != 3:
        raise UserError(channels_refusal(shape[-1], config.dataset))
    model, aug, v = config.model, config.aug, config.views
    if model.name != "cmc_lab":
        raise UserError(f"config.views.kind=channels needs model cmc_lab (one half-width "
                        f"encoder per channel view), not {model.name!r}: "
                        "configs/cmc.py:views=channels sets it.")
    for field in ("mean", "std"):
        if tuple(model.get(field) or ()) != tuple(aug[field]):
            raise UserError(f"config.model.{field}={model.get(field)!r} differs from config.aug."
                            f"{field}={aug[field]!r}: cmc_lab undoes the views' normalisation "
                            f"before Lab; set config.model.{field} to config.aug's.")
    if v.count != 2 or v.get("local_crops", 0):
        raise UserError(f"config.views.count={v.count!r}, local_crops="
                        f"{v.get('local_crops', 0)!r} with views=channels: the views are the "
                        "two channel groups (L, ab) of one crop; set count=2, local_crops=0.")


def views(rng, images, config) -> dict:
    """images: (B, H, W, C) uint8 (or a canvas) -> {"global": (B, M, h, w, C) float32,
    and "local": (B, L, hl, wl, C) with local crops}; channel views: M = 1 crop."""
    return multicrop.make_views(rng, images, spec(config))


def _net(config) -> nn.Module:
    if not _channels(config):
        return network.make_network(config)
    return ChannelHeads(encoder=network.make_encoder(config.model),
                        l_head=projection_head(config.head), ab_head=projection_head(config.head),
                        stage=network.final_stage(config.model))


def _nce(config) -> bool:
    return config.get("cmc", {}).get("objective", "softmax") == "nce"


def _pad_to(config) -> int:
    return config.cmc.get("pad_to", 1024)


def _bank_names(config) -> list[str]:
    """One bank per view: view0 .. view<M-1> (channel views: view0 = L, view1 = ab)."""
    return [f"view{m}" for m in range(config.views.count)]


def init(rng, views, config, data_spec):
    """-> (params, state): state["batch_stats"]; with objective=nce also "banks" {view<m>:
    (N_pad, D)} (memory.init: random rows) and "log_z" (M, M) -inf (set on step 1)."""
    params, batch_stats = network.init(_net(config), rng, views["global"][:, 0])
    state = {"batch_stats": batch_stats}
    if _nce(config):
        n, dim, m = data_spec.num_examples, config.head.dim, config.views.count
        # fold_in 2: network.init_rngs takes the key itself and fold_in 1.
        keys = jax.random.split(jax.random.fold_in(rng, 2), m)
        state["banks"] = {name: memory.init(k, n, dim, _pad_to(config))
                          for name, k in zip(_bank_names(config), keys)}
        state["log_z"] = jnp.full((m, m), -jnp.inf, jnp.float32)
    return params, state


def state_sharding(shapes, mesh):
    """The banks' rows sharded over the mesh (as NPID's); the rest replicated."""
    out = base.replicated(shapes, mesh)
    if "banks" in shapes:
        out["banks"] = jax.tree.map(lambda _: parallel.batch_sharding(mesh), shapes["banks"])
    return out


def embed(params, state, views, config, rng=None):
    """The head's outputs of every view: z (B, V, D) float32, V = M (+ L), global crops
    first; one encoder call per group (network.embed_crops). Channel views: z (B, 2, D),
    the L and ab heads' outputs on the one crop. Returns (z, new batch_stats)."""
    net = _net(config)
    if _channels(config):
        _, z, batch_stats = network.apply(net, params, state["batch_stats"],
                                          views["global"][:, 0], train=True, rng=rng)
        return z, batch_stats
    return network.embed_crops(net, params, state["batch_stats"], views, rng)


def _nce_loss(z, state, index, rng, config, num_data: int):
    """CMC's NCE: z (B, M, D), index (B,) dataset indices -> (loss, metrics, the state's
    new banks and log_z). The banks are read before they move (NCEAverage's order)."""
    c, names, b = config.cmc, _bank_names(config), z.shape[0]
    index = index.astype(jnp.int32)
    negatives = memory.sample_negatives(rng, c.nce_k, num_data)
    # One lookup per bank for positives and negatives: a single psum over its shards.
    lookup = parallel.on_shards(memory.lookup, (True, False))
    rows = jnp.stack([lookup(state["banks"][k], jnp.concatenate([index, negatives]))
                      for k in names], axis=1)                              # (B + K, M, D)
    fn = lambda z_, p, u, lz, axis_name: multiview.cmc_nce(  # noqa: E731
        z_, p, u, lz, config.multiview.temperature, num_data, c.get("graph", "core"), axis_name)
    value, metrics = parallel.on_shards(fn, (True, True, False, False))(
        z, rows[:b], rows[b:], state["log_z"])
    log_z = metrics.pop("log_z")
    update = lambda bank, i, v, axis_name: memory.update(  # noqa: E731
        bank, i, v, c.nce_momentum, axis_name)
    banks = {k: parallel.on_shards(update, (True, True, True), batch_out=True)(
        state["banks"][k], index, z[:, m]) for m, k in enumerate(names)}
    return value, metrics, {"banks": banks, "log_z": log_z}


def loss(params, state, views, batch, rng, config, data_spec):
    """Returns (loss, (metrics, new_state)); rng: the encoder's stochastic depth (ViT)
    and, with objective=nce, the step's draw of negatives; batch["index"]: (B,) the
    banks' rows (objective=nce only)."""
    z, batch_stats = embed(params, state, views, config, rng)
    if _nce(config):
        # fold_in: the encoder's drop path has the key itself.
        value, metrics, banks = _nce_loss(z, state, batch["index"], jax.random.fold_in(rng, 1),
                                          config, data_spec.num_examples)
        return value, (metrics, {"batch_stats": batch_stats, **banks})
    fn = LOSSES[config.multiview.loss]
    value, metrics = parallel.on_shards(
        lambda z, axis_name: fn(z, config, axis_name), batch_args=(True,))(z)
    return value, (metrics, {"batch_stats": batch_stats})


METHOD = base.Method(views=views, init=init, loss=loss, check=check,
                     state_sharding=state_sharding)
