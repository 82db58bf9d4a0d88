"""The methods, by name: one line per method. The contract they fulfil (views,
init, loss and the optional hooks) is `base.Method`; the train loop and the
setup layer know nothing else about a method.

Adding a method: a module under ssl_jax/methods/ ending in
`METHOD = base.Method(views=..., init=..., loss=...)`, one line below, and a
config file under configs/.
"""
from ssl_jax import errors
from ssl_jax.methods import (base, dino, jigsaw, moco, pirl, polyview, rotnet, simclr,
                             supervised)

METHODS: dict[str, base.Method] = {
    "simclr": simclr.METHOD,
    "moco": moco.METHOD,
    "pirl": pirl.METHOD,
    "npid": pirl.METHOD,  # NPID is PIRL without the jigsaw branch (its config has no `pirl` block)
    "jigsaw": jigsaw.METHOD,
    "rotnet": rotnet.METHOD,
    "dino": dino.METHOD,
    "polyview": polyview.METHOD,  # M views per image, one M-view loss (config.multiview.loss)
    "cmc": polyview.METHOD,  # the same, CMC's loss over augmented views by default
    "supervised": supervised.METHOD,  # the reference row of every table, not self-supervised
}


def get(name: str) -> base.Method:
    if name not in METHODS:
        raise errors.UserError(
            f"config.method={name!r} is unknown; valid methods: {sorted(METHODS)}.")
    return METHODS[name]
