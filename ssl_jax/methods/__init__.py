"""The methods, by name. A method is a module with three pure functions:

  views(rng, images_uint8, config) -> dict of on-device inputs
  init(rng, views, config) -> (params, state)     state: what gradients do not train
  loss(params, state, views, indices, rng, config) -> (loss, (metrics, new_state))

and optionally check(config, global_batch) that raises before compiling,
state_sharding(state_shapes, mesh) -> shardings of the state (default: replicated),
warm_start(params, state, source, config, mesh) -> state, called once at step 0
with the train split (NPID/PIRL fill their memory bank from the initial encoder),
and USES_LABELS = True to receive the batch's labels as views["label"] (only the
supervised reference does).
The train loop knows nothing else about a method.
"""
from ssl_jax.methods import jigsaw, moco, pirl, rotnet, simclr, supervised

METHODS = {
    "simclr": simclr,
    "moco": moco,
    "pirl": pirl,
    "npid": pirl,  # NPID is PIRL without the jigsaw branch (its config has no `pirl` block)
    "jigsaw": jigsaw,
    "rotnet": rotnet,
    "supervised": supervised,  # the reference row of every table, not self-supervised
}


def get(name: str):
    if name not in METHODS:
        raise ValueError(f"config.method={name!r} is unknown; valid methods: {sorted(METHODS)}.")
    return METHODS[name]
