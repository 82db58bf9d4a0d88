"""MoCo v2 (He et al. 2020; Chen et al. 2020): a query encoder trained by
gradient, a key encoder that follows it as a moving average, and a queue of K
keys from earlier batches as negatives.

config.moco: momentum (0.999), queue_size K, temperature (0.2), bn_groups.
config.head: MoCo v2's projection head, hidden -> ReLU -> dim with biases and no
BN (facebookresearch/moco builder.py; config.head.hidden_bn=False).
The momentum update is `before_step`, once per optimizer step; the loss reads
the key encoder it left.

Shuffle-BN. MoCo normalises each GPU's 32 keys with that GPU's statistics after
shuffling the keys across GPUs, so BN cannot leak which key is the positive. Under
one jit over the global batch, BN is synchronised instead, so we make the
grouping explicit: both encoders use BN with `bn_groups` groups of the batch (one
per device in the original), and the keys are permuted across the global batch
before the key encoder and un-permuted after. The result is then the same on 1 or
on 8 devices, which also makes it testable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax import errors, losses, parallel
from ssl_jax.methods import base, network
from ssl_jax.views import augment, pair


def check(config, spec, mesh) -> None:
    """Raises before compiling when the queue or BN groups cannot work."""
    del spec, mesh
    m, global_batch = config.moco, config.batch_size
    if m.queue_size % global_batch:
        raise errors.UserError(
            f"config.moco.queue_size={m.queue_size} is not divisible by the global batch "
            f"size {global_batch}: the queue is filled a whole batch at a time. Use a "
            f"multiple, e.g. {max(1, m.queue_size // global_batch) * global_batch}.")
    accumulate = config.get("accumulate_steps", 1)
    micro = global_batch // accumulate  # the batch each loss call (and its BN) sees
    if micro % m.bn_groups:
        what = (f"config.batch_size={global_batch}" if accumulate == 1 else
                f"The micro-batch of {micro} images (config.batch_size={global_batch} / "
                f"config.accumulate_steps={accumulate})")
        raise errors.UserError(f"{what} is not divisible by config.moco.bn_groups={m.bn_groups}.")


def views(rng, images, config) -> dict:
    """images: (B, H, W, C) uint8 -> {"query", "key"}: (B, h, w, C) float32; a
    pair.Pair (video positives): the query view from its query frames, the key view
    from its key frames (Purushwalkam & Gupta 2020: only the positive pair changes)."""
    r1, r2 = jax.random.split(rng)
    cfg = augment.moco_v2_view_config(**config.aug.to_dict())
    first, second = pair.sources(images)
    return {"query": augment.batch_views(r1, first, cfg),
            "key": augment.batch_views(r2, second, cfg)}


def _net(config, stochastic: bool = True):
    """Encoder + MoCo v2's head (builder.py, --mlp): Linear -> ReLU -> Linear, biases,
    no BN (config.head.hidden_bn=False). Both encoders' BN in moco.bn_groups groups.
    stochastic=False: the key encoder's, without a ViT's drop path (as DINO's teacher)."""
    return network.make_network(config, bn_groups=config.moco.bn_groups, stochastic=stochastic)


def init(rng, views, config, spec):
    del spec
    r_net, r_queue = jax.random.split(rng)
    params, batch_stats = network.init(_net(config), r_net, views["query"])
    queue = losses.l2_normalize(
        jax.random.normal(r_queue, (config.moco.queue_size, config.head.dim), jnp.float32))
    state = {"batch_stats": batch_stats,
             "key_params": params, "key_batch_stats": batch_stats,
             "queue": queue, "queue_ptr": jnp.zeros((), jnp.int32)}
    return params, state


def before_step(params, state, config):
    """The key encoder's momentum update, once per optimizer step, before the loss
    (as in MoCo: the step's keys come from the moved key encoder). Not inside the
    loss: with config.accumulate_steps = A the loss runs on A micro-batches per
    update, and the key encoder would then move A times (momentum m^A)."""
    m = config.moco.momentum
    key_params = jax.tree.map(lambda k, p: m * k + (1 - m) * p,
                              state["key_params"], jax.lax.stop_gradient(params))
    return dict(state, key_params=key_params)


def loss(params, state, views, batch, rng, config, spec):
    """Returns (loss, (metrics, new_state)); new_state holds the queue with this
    batch's keys enqueued (oldest replaced). The key encoder, state["key_params"],
    is used as given: the loop has moved it already (`before_step`)."""
    del batch, spec
    m, net = config.moco, _net(config)
    # The step's key shuffles the keys (as before ViTs); a key folded from it drives the
    # query encoder's drop path.
    _, q, batch_stats = network.apply(net, params, state["batch_stats"], views["query"],
                                      rng=jax.random.fold_in(rng, 1))

    key_params = state["key_params"]
    b = views["key"].shape[0]
    perm = jax.random.permutation(rng, b)
    _, k, key_batch_stats = network.apply(_net(config, stochastic=False), key_params,
                                          state["key_batch_stats"], views["key"][perm])
    k = jax.lax.stop_gradient(losses.l2_normalize(k)[jnp.argsort(perm)])

    value, metrics = parallel.on_shards(
        lambda q_, k_, queue, axis_name: losses.info_nce_queue(q_, k_, queue, m.temperature, axis_name),
        batch_args=(True, True, False))(q, k, state["queue"])

    ptr = state["queue_ptr"]
    queue = jax.lax.dynamic_update_slice(state["queue"], k.astype(state["queue"].dtype), (ptr, 0))
    new_state = {"batch_stats": batch_stats, "key_params": key_params,
                 "key_batch_stats": key_batch_stats, "queue": queue,
                 "queue_ptr": (ptr + b) % m.queue_size}
    return value, (metrics, new_state)


METHOD = base.Method(views=views, init=init, loss=loss, check=check,
                     before_step=before_step, takes_pairs=True)
