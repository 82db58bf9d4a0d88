"""Config helpers: intervals in any unit, checks before compiling, and the
copy of the config kept in the workdir (evaluators and resume read it back).
"""
from __future__ import annotations

import difflib
import json
import os

import ml_collections

UNITS = ("steps", "epochs", "examples")


def steps(config, name: str, steps_per_epoch: int, batch_size: int, default=None):
    """Turns `{name}_steps` / `{name}_epochs` / `{name}_examples` into steps.

    Exactly one of the three may be set (not None); e.g. steps(config, "total", ...)
    reads config.total_steps, config.total_epochs or config.total_examples.
    A tuple (e.g. optimizer.decay_epochs=(30, 60, 80)) gives a tuple of steps.
    """
    given = {u: config.get(f"{name}_{u}") for u in UNITS}
    given = {u: v for u, v in given.items() if v is not None}
    if len(given) > 1:
        keys = ", ".join(f"config.{name}_{u}" for u in given)
        raise ValueError(f"Set only one of {keys}.")
    if not given:
        return default
    (unit, value), = given.items()

    def convert(v):
        if unit == "steps":
            return int(v)
        if unit == "epochs":
            return max(1, int(round(v * steps_per_epoch)))
        return max(1, int(round(v / batch_size)))
    return tuple(convert(v) for v in value) if isinstance(value, (tuple, list)) else convert(value)


def nearest_keys(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3)
    return f" Did you mean {', '.join(close)}?" if close else ""


def get_field(config, path: str):
    """config.get for dotted paths, with an error naming the valid keys."""
    node = config
    for part in path.split("."):
        if part not in node:
            raise KeyError(f"config has no key {path!r} ({part!r} missing).{nearest_keys(part, node.keys())} "
                           f"Valid keys here: {sorted(node.keys())}")
        node = node[part]
    return node


def _to_tuples(x):
    if isinstance(x, dict):
        return {k: _to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_to_tuples(v) for v in x)
    return x


def save(config, workdir: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2, sort_keys=True))


def load(workdir: str) -> ml_collections.ConfigDict:
    """Reads back the config a training run stored in its workdir."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a training workdir. Train first with "
            f"`python -m ssl_jax.train --config configs/simclr.py --workdir {workdir}`.")
    with open(path) as f:
        return ml_collections.ConfigDict(_to_tuples(json.load(f)))


def diff(a, b, prefix="") -> list[str]:
    """Dotted keys whose values differ between two configs (as plain dicts)."""
    a = a.to_dict() if hasattr(a, "to_dict") else a
    b = b.to_dict() if hasattr(b, "to_dict") else b
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{k}.")
        elif _to_tuples(va) != _to_tuples(vb):
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out
