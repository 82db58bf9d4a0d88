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

config.views.kind: "crops" (the above). "channels" (CMC's L vs ab of Lab, one encoder per
view) is not built: refused in one line, on a one-channel dataset saying why it cannot be.
"""
from __future__ import annotations

from ssl_jax import multiview, parallel
from ssl_jax.errors import UserError
from ssl_jax.methods import base, network
from ssl_jax.views import augment, multicrop

VIEW_KINDS = ("crops", "channels")


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
    """The one line that refuses config.views.kind="channels" (the two-encoder path is
    not built), saying first why a dataset of `channels` channels could never have it."""
    if channels == 1:
        return (f"views=channels splits a colour image into CMC's L and ab views (Lab), and "
                f"{dataset} has one channel (grey): there is no ab to split off; use "
                "augmented views, views=M (config.views.kind=crops).")
    return ("views=channels (CMC's L vs ab, one encoder per view) is not built yet: use "
            "augmented views, views=M (config.views.kind=crops).")


def augment_config(config):
    return augment.simclr_view_config(**config.aug.to_dict())


def spec(config) -> multicrop.Spec:
    """The resolution groups: config.views.count crops at the view size, and
    config.views.local_crops (default 0) at local_size."""
    v = config.views
    local = v.get("local_crops", 0)
    return multicrop.uniform_spec(
        augment_config(config), v.count, local, local_size=v.get("local_size") if local else None,
        local_scale=v.get("local_scale", (0.05, 0.14)))


def check(config, data_spec, mesh) -> None:
    del mesh
    v = config.views
    kind = v.get("kind", "crops")
    if kind not in VIEW_KINDS:
        raise UserError(f"config.views.kind={kind!r}: use one of {VIEW_KINDS}.")
    if kind == "channels":
        shape = getattr(data_spec, "image_shape", None)
        raise UserError(channels_refusal(shape[-1] if shape else None, config.dataset))
    if isinstance(v.count, bool) or not isinstance(v.count, int) or v.count < 2:
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
    spec(config)  # its own checks: counts, sizes
    video = config.get("video")
    if video is not None and video.get("positives", "frame") != "frame":
        raise UserError(f"config.video.positives={video.positives!r} brings two images per "
                        "example and the M views are crops of one: use positives=frame.")


def views(rng, images, config) -> dict:
    """images: (B, H, W, C) uint8 (or a canvas) -> {"global": (B, M, h, w, C) float32,
    and "local": (B, L, hl, wl, C) with local crops}."""
    return multicrop.make_views(rng, images, spec(config))


def _net(config) -> network.EncoderHead:
    return network.make_network(config)


def init(rng, views, config, data_spec):
    del data_spec
    params, batch_stats = network.init(_net(config), rng, views["global"][:, 0])
    return params, {"batch_stats": batch_stats}


def embed(params, state, views, config, rng=None):
    """The head's outputs of every view: z (B, V, D) float32, V = M (+ L), global crops
    first; one encoder call per group (network.embed_crops). Returns (z, new batch_stats)."""
    return network.embed_crops(_net(config), params, state["batch_stats"], views, rng)


def loss(params, state, views, batch, rng, config, data_spec):
    """Returns (loss, (metrics, new_state)); rng: the encoder's stochastic depth (ViT)."""
    del batch, data_spec
    z, batch_stats = embed(params, state, views, config, rng)
    fn = LOSSES[config.multiview.loss]
    value, metrics = parallel.on_shards(
        lambda z, axis_name: fn(z, config, axis_name), batch_args=(True,))(z)
    return value, (metrics, {"batch_stats": batch_stats})


METHOD = base.Method(views=views, init=init, loss=loss, check=check)
