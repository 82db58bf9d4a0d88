"""Config helpers: intervals in any unit, checks before compiling, and the
copy of the config kept in the workdir (evaluators and resume read it back).
"""
from __future__ import annotations

import ast
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


def _load_config_file(spec: str):
    """'configs/simclr.py:dataset=x' -> that file's get_config('dataset=x')."""
    import importlib.util
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_ssl_jax_config", path)
    if module_spec is None or not os.path.exists(path):
        raise SystemExit(f"Config file {path!r} not found (from --config {spec}).")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _flag_value(argv, name: str):
    for i, a in enumerate(argv):
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def _overrides(argv, name: str = "config") -> list[str]:
    """Dotted keys given as --config.a.b=value (or --config.a.b value) in argv."""
    return [a[len(name) + 3:].split("=", 1)[0] for a in argv if a.startswith(f"--{name}.")]


def check_command_line(argv, name: str = "config") -> None:
    """Before flag parsing: every --config.a.b override must name an existing key.

    ml_collections reports an unknown key as a traceback from inside flag
    parsing; this exits with one line naming the key, the nearest valid ones and
    the keys valid at that level.
    """
    spec = _flag_value(argv, name)
    keys = _overrides(argv, name)
    if spec is None or not keys:
        return
    config = _load_config_file(spec)
    for key in keys:
        try:
            get_field(config, key)
        except KeyError as e:
            raise SystemExit(f"Unknown config key in --{name}.{key}: {e.args[0]}") from None


def clear_other_units(config, argv, name: str = "config") -> None:
    """An interval given on the command line in one unit replaces the preset's.

    E.g. a preset sets total_epochs=2.5 and the user passes --config.total_steps=100:
    total_epochs is cleared, rather than failing with "Set only one of".
    """
    for key in _overrides(argv, name):
        parent, _, leaf = key.rpartition(".")
        stem, _, unit = leaf.rpartition("_")
        if unit not in UNITS or not stem:
            continue
        node = get_field(config, parent) if parent else config
        for other in UNITS:
            if other != unit and f"{stem}_{other}" in node:
                node[f"{stem}_{other}"] = None


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


def to_tuples(x):
    if isinstance(x, dict):
        return {k: to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(to_tuples(v) for v in x)
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
        return ml_collections.ConfigDict(to_tuples(json.load(f)))


def diff(a, b, prefix="") -> list[str]:
    """Dotted keys whose values differ between two configs (as plain dicts)."""
    a = a.to_dict() if hasattr(a, "to_dict") else a
    b = b.to_dict() if hasattr(b, "to_dict") else b
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{k}.")
        elif to_tuples(va) != to_tuples(vb):
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def split_overrides(argv, name: str = "config") -> tuple[list[str], dict[str, str]]:
    """Takes --config.a.b=value (or --config.a.b value) out of argv, for commands
    that read a stored config instead of a config file (evaluate).
    -> (argv without them, {"a.b": "value"})."""
    rest, out, i = [], {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(f"--{name}."):
            key, eq, value = a[len(name) + 3:].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"--{name}.{key} needs a value (--{name}.{key}=VALUE).")
                value, i = argv[i + 1], i + 1
            out[key] = value
        else:
            rest.append(a)
        i += 1
    return rest, out


def _parse_like(text: str, old, key: str):
    """The command-line text as a value of old's type: literals parsed, a scalar
    given for a tuple field becomes a 1-tuple, ints widen to floats."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(old, tuple) and not isinstance(value, tuple):
        value = (value,)
    number = (int, float)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (isinstance(old, number) and isinstance(value, tuple) and value
            and all(isinstance(v, number) for v in value)):
        return tuple(float(v) for v in value)  # a sweep where one value was stored (weight_decay)
    if old is not None and not isinstance(value, type(old)):
        raise ValueError(f"--config.{key}={text}: expected a {type(old).__name__} like the "
                         f"stored value {old!r}, got {type(value).__name__}.")
    return value


def apply_overrides(config, overrides: dict[str, str], allowed=("eval",)):
    """Sets each dotted key of `overrides` (split_overrides' text values) in
    config, in place; keys must exist and lie under one of `allowed`. Returns config."""
    for key, text in overrides.items():
        if key.split(".")[0] not in allowed:
            raise ValueError(f"--config.{key}: only {', '.join(f'{a}.*' for a in allowed)} can "
                             "be changed here; the rest describes how the run was trained.")
        parent, _, leaf = key.rpartition(".")
        node = get_field(config, parent) if parent else config
        old = get_field(config, key)
        with node.ignore_type():  # _parse_like checked the type; a sweep may replace a number
            node[leaf] = _parse_like(text, old, key)
    return config
