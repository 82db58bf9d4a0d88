"""The points of a sweep (launch/sweep.py): the grid of --sweep KEY=V1,V2,...,
a config file's sweep(arg) function, each point's workdir name, and each
point checked as train parses its command line (ssl_jax/cli.py)."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

class SweepError(Exception):
    """A sweep used wrongly: printed as `error: ...`, exit status 2."""


# ------------------------------------------------------------------ the points

def split_values(text: str) -> list[str]:
    """'0.1,(1,2),"a,b"' -> ['0.1', '(1,2)', '"a,b"']: commas at depth 0 only."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return out


def norm_key(key: str) -> str:
    key = key.strip()
    return key[len("config."):] if key.startswith("config.") else key


def flag_value(v) -> str:
    """A Python value from a sweep() function -> its --config.a.b=... text."""
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return "(" + ",".join(repr(x) if isinstance(x, str) else flag_value(x) for x in v) + \
            ("," if len(v) == 1 else "") + ")"
    return repr(v)


def grid(specs: list[str]) -> list[list[tuple[str, str]]]:
    """['config.a=1,2', 'config.b=x'] -> [[('a','1'),('b','x')], [('a','2'),('b','x')]]."""
    axes, seen = [], set()
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = norm_key(key)
        vals = split_values(values) if eq else []
        if not key or not vals or "" in vals:
            raise SweepError(f"--sweep {spec!r}: give KEY=V1,V2,... (e.g. "
                             "--sweep 'config.optimizer.lr=0.03,0.1').")
        if key in seen:
            raise SweepError(f"--sweep: config.{key} is swept twice; give its values once.")
        seen.add(key)
        axes.append([(key, v) for v in vals])
    return [list(p) for p in itertools.product(*axes)] if axes else []


def from_function(config_spec: str, name: str) -> list[list[tuple[str, str]]]:
    """The points a config file's `name(arg)` returns (a list of {"config.a.b": value})."""
    module = load_config_module(config_spec)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SweepError(f"--sweep_fn: {config_spec.partition(':')[0]} defines no function "
                         f"{name}(arg) returning a list of {{'config.a.b': value}} dicts.")
    arg = config_spec.partition(":")[2] or None
    points = fn(arg)
    if not isinstance(points, (list, tuple)) or not all(isinstance(p, dict) for p in points):
        raise SweepError(f"{name}() of {config_spec} must return a list of dicts "
                         "{'config.a.b': value}.")
    return [[(norm_key(k), flag_value(v)) for k, v in p.items()] for p in points]


def load_config_module(config_spec: str):
    from ssl_jax import config as cfg_lib
    path = config_spec.partition(":")[0]
    found = next((p for p in (path, os.path.join(REPO, path)) if os.path.isfile(p)), None)
    if found is None:
        raise SweepError(f"Config file {path!r} not found (--config {config_spec}).")
    return cfg_lib.load_module(found)


def combine(fn_points, grid_points):
    if fn_points and grid_points:
        out = [a + b for a in fn_points for b in grid_points]
    else:
        out = fn_points or grid_points
    for p in out:
        keys = [k for k, _ in p]
        if len(set(keys)) != len(keys):
            raise SweepError(f"config.{keys[0]}...: a key is set twice in one point {p}.")
    return out


def point_name(point, max_len: int = 100) -> str:
    """Filesystem-safe, readable: 'optimizer.lr=0.03,moco.temperature=0.1'."""
    def safe(s):
        return re.sub(r"[^A-Za-z0-9._=,+@-]+", "_", s).strip("_") or "_"
    def val(v):  # '(8, 16)' -> '8-16'
        return re.sub(r"[\s'\"()\[\]]", "", v).replace(",", "-")
    name = safe(",".join(f"{k}={val(v)}" for k, v in point))
    if len(name) > max_len:  # leaf names only, then cut with a hash of the whole
        name = safe(",".join(f"{k.rpartition('.')[2]}={val(v)}" for k, v in point))
    if len(name) > max_len:
        name = name[:max_len - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def name_points(points) -> list[str]:
    names = [point_name(p) for p in points]
    for i, n in enumerate(names):
        if names.count(n) > 1:  # e.g. '(8,16)' and '(8_16)' made safe alike
            full = json.dumps(points[i]).encode()
            names[i] = f"{n[:90]}-{hashlib.sha1(full).hexdigest()[:8]}"
    if len(set(names)) != len(names):
        raise SweepError("two points have the same values; drop the duplicate.")
    return names


# ----------------------------------------------------------------- validation

def config_flags(extra: list[str]) -> list[str]:
    """The --config.a.b overrides among the extra train flags (the rest pass through)."""
    return [a for a in extra if re.match(r"-{1,2}(no)?config\.", a)]


def validate(config_spec: str, point, extra: list[str]):
    """Parses the point as train would -> the config; SweepError naming the point."""
    from absl import flags
    from ssl_jax import cli
    from ssl_jax.errors import UserError
    swept = {k for k, _ in point}
    for a in cli.override_keys(config_flags(extra)):
        if a in swept:
            raise SweepError(f"config.{a} is swept and also given after --: give it once.")
    argv = (["sweep", "--config", config_spec] + [f"--config.{k}={v}" for k, v in point]
            + config_flags(extra))
    fv = flags.FlagValues()
    try:
        cli.parse(argv, cli.FILE, fv)
    except (UserError, flags.Error) as e:
        where = ",".join(f"{k}={v}" for k, v in point) or "(no swept keys)"
        message = re.sub(r"\s*\n\s*", " ", str(e).strip())
        raise SweepError(f"point {where}: {message}") from None
    return fv.config
