"""Config helpers: config files, intervals in any unit, the command line's
overrides, and the copy of the config kept in the workdir (evaluators and
resume read it back).

Config files (configs/*.py) are plain Python files, not a package: `load_file`
runs one as `--config` does, and a config builds on another by path with
`sibling(__file__, "common")`. The library never imports them.

The command line overrides fields with ml_collections' flags,
`--config.a.b=value`, typed by the field (ssl_jax/cli.py); this module holds
the rules around them: every key must name a field (`check_override`), and a
length or interval given in one unit replaces the preset's other units
(`clear_other_units`).
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os

import ml_collections

from ssl_jax import storage
from ssl_jax.errors import UserError

UNITS = ("steps", "epochs", "examples")

# configs/ ships beside the package, in the checkout ssl_jax runs from (an
# editable install), not inside it: a relative config path that is not found
# from the current directory is looked up there.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NoRunError(UserError, FileNotFoundError):
    """A workdir that holds no training run (also a FileNotFoundError, as it always was)."""


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
        raise UserError(f"Set only one of {keys}.")
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


# ------------------------------------------------------------------ config files

def load_module(path: str):
    """Runs the Python file at `path` as a new module and returns it. It is not
    put in sys.modules: a config file has no import name to collide with another's."""
    name = "ssl_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sibling(file: str, name: str):
    """The config file `name`.py in the folder of `file` (a config's own __file__),
    as a module: `common = sibling(__file__, "common")` in configs/simclr.py. By
    path, so it depends neither on the current directory nor on the import path."""
    return load_module(os.path.join(os.path.dirname(os.path.abspath(file)), f"{name}.py"))


def _find(path: str) -> str | None:
    for p in (path, None if os.path.isabs(path) else os.path.join(_CHECKOUT, path)):
        if p and os.path.isfile(p):
            return p
    return None


def load_file(spec: str) -> ml_collections.ConfigDict:
    """'configs/simclr.py:dataset=cifar10' -> that file's get_config('dataset=cifar10')
    (get_config() when there is no colon), as `--config SPEC` loads it. A relative
    path is read from the current directory, else from the ssl_jax checkout."""
    path, colon, arg = spec.partition(":")
    found = _find(path)
    if found is None:
        raise UserError(f"Config file {path!r} not found (--config {spec}); the configs are "
                        f"configs/<method>.py, e.g. {os.path.join(_CHECKOUT, 'configs', 'simclr.py')}.")
    module = load_module(found)
    return module.get_config(arg) if colon else module.get_config()


def config_files() -> list[str]:
    """The config files shipped in the checkout's configs/ ('configs/simclr.py', ...):
    those with a get_config (common.py is a building block)."""
    folder = os.path.join(_CHECKOUT, "configs")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    def has_config(name):
        with open(os.path.join(folder, name)) as f:
            return "def get_config" in f.read()
    return [f"configs/{n}" for n in names if n.endswith(".py") and has_config(n)]


def file_doc(spec: str) -> str:
    """The docstring of the config file `spec` names (its commands and arguments)."""
    path = spec.partition(":")[0]
    found = _find(path)
    return (load_module(found).__doc__ or "").strip() if found else ""


def fields(config, prefix: str = "") -> list[tuple[str, object, type]]:
    """[(dotted key, value, type)] of every leaf field of a ConfigDict, sorted: what
    --config.<key>=value can set (a placeholder's value is None, its type the one set)."""
    out = []
    for key in sorted(config.keys()):
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            out += fields(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value, config.get_type(key)))
    return out


# ---------------------------------------------------------- command-line rules

def nearest_keys(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3)
    return f" Did you mean {', '.join(close)}?" if close else ""


def get_field(config, path: str):
    """config.get for dotted paths, with an error naming the valid keys."""
    node = config
    for part in path.split("."):
        if not hasattr(node, "keys") or part not in node:
            valid = sorted(node.keys()) if hasattr(node, "keys") else []
            raise UserError(f"config has no key {path!r} ({part!r} missing)."
                            f"{nearest_keys(part, valid)} Valid keys here: {valid}")
        node = node[part]
    return node


def check_override(config, key: str, settable=None) -> None:
    """`--config.{key}=...` must name a field of config and, when `settable` is
    given (a stored config: evaluate), lie under one of its top-level keys;
    else a UserError naming the key and the nearest valid ones."""
    if settable is not None and key.split(".")[0] not in settable:
        raise UserError(f"--config.{key}: only {', '.join(f'--config.{k}.*' for k in settable)} "
                        "can be changed here; the rest describes how the run was trained.")
    try:
        get_field(config, key)
    except UserError as e:
        raise UserError(f"Unknown config key in --config.{key}: {e}") from None


def clear_other_units(config, given) -> None:
    """A length or interval given on the command line in one unit replaces the
    preset's: e.g. a preset sets total_epochs=2.5 and the user passes
    --config.total_steps=100, so total_epochs is cleared (rather than `steps`
    failing with "Set only one of"). given: the dotted keys the command line
    set (ml_collections' override_values). Two units of one interval given
    together is a UserError naming both."""
    intervals = {}
    for key in given:
        parent, _, leaf = key.rpartition(".")
        stem, _, unit = leaf.rpartition("_")
        if stem and unit in UNITS:
            intervals.setdefault((parent, stem), []).append(key)
    for (parent, stem), keys in intervals.items():
        if len(keys) > 1:
            where = f"{parent}.{stem}" if parent else stem
            raise UserError(f"{' and '.join(f'--config.{k}' for k in keys)} both set "
                            f"config.{where}_*, in different units: give one of them.")
        node = get_field(config, parent) if parent else config
        unit = keys[0].rpartition("_")[2]
        for other in UNITS:
            if other != unit and f"{stem}_{other}" in node:
                node[f"{stem}_{other}"] = None


def apply_overrides(config, overrides: dict, allowed=("eval",)):
    """Sets each dotted key of `overrides` in config, in place, and returns it:
    evaluate's --config.eval.* on a stored config. Values come typed, as
    ml_collections parsed them against the evaluators' defaults (cli.run); keys
    must exist and lie under one of `allowed`. A value may change a stored
    field's type: a run stored before weight decays were swept holds one number,
    and a swept tuple replaces it."""
    for key, value in overrides.items():
        check_override(config, key, allowed)
        parent, _, leaf = key.rpartition(".")
        node = get_field(config, parent) if parent else config
        with node.ignore_type():
            node[leaf] = value
    clear_other_units(config, overrides)
    return config


# ------------------------------------------------------------------ the workdir

def to_tuples(x):
    if isinstance(x, dict):
        return {k: to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(to_tuples(v) for v in x)
    return x


def save(config, workdir: str) -> None:
    """WORKDIR/config.json, written whole or not at all (a temporary file, then
    replaced): the other processes of a resumed run read it while process 0 writes
    it, and a half-written file made one of them fail with a JSON error."""
    path = storage.path(workdir) / "config.json"
    tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
    tmp.write_text(config.to_json(indent=2, sort_keys=True))
    storage.replace(tmp, path)


def load(workdir: str) -> ml_collections.ConfigDict:
    """Reads back the config a training run stored in its workdir."""
    path = storage.path(workdir) / "config.json"
    if not path.exists():
        raise NoRunError(
            f"{path} not found: {workdir} is not a training workdir (no run was started "
            "there; python -m ssl_jax.train writes config.json when it starts). Point "
            "--workdir at a training run's folder, or train one there first.")
    return ml_collections.ConfigDict(to_tuples(json.loads(path.read_text())))


RESUME_OVERRIDE = "--config.resume_from_different_config=True"
# What the override is for: a change that keeps every array of the train state.
COMPATIBLE = ("the length, intervals and learning rate, the batch size, data_dir, the "
              "evaluation settings")


def check_same_config(config, stored) -> list[str]:
    """A workdir belongs to one config: resuming under another silently mixes runs.
    stored: the config.json of the workdir's run (None: no run). -> the differing
    keys ("a.b: old -> new"), which config.resume_from_different_config allows."""
    if stored is None:
        return []
    # Keys that change how a run reads, not what it computes: the worker processes
    # give the same batches (tests/test_data.py), so a resume may use other ones.
    changed = [c for c in diff(stored, config)
               if not c.startswith(("resume_from_different_config", "data.worker_count:"))]
    if changed and not config.resume_from_different_config:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6
                                         else "")
        raise UserError(
            f"the workdir holds a run of a different config (differing keys: {shown}). Use "
            f"another --workdir; or, to go on with a change that keeps the state's arrays "
            f"({COMPATIBLE}), pass {RESUME_OVERRIDE}.")
    return changed


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
