"""How the commands (train, evaluate, export) read their command line and speak
to people: absl's app.run, one --config flag, and one-line errors.

    cli.run(main)                      # flags only (export)
    cli.run(main, config=cli.FILE)     # --config configs/x.py[:args] [--config.a.b=value ...]
    cli.run(main, config=schema)       # only --config.a.b=value, of schema's fields (evaluate)

--config.a.b=value is ml_collections' override flag, typed by the field it
sets; there is no other path. Around it, two rules (ssl_jax/config.py): every
key names a field, checked against the loaded config before ml_collections
defines a flag per key (whose own error for a missing field is a traceback
from inside flag parsing); and a length or interval given in one unit clears
the preset's other units (config.clear_other_units). `schema` is a ConfigDict
(or dict) of the fields a command may change in a stored config, with the types to
parse them as (evaluate: the evaluators' defaults, {"eval": ...}); the values
given are flags.FLAGS["config"].override_values.

A UserError (ssl_jax/errors.py), or a command line absl or ml_collections
refuses, prints one line, `error: <message>`, on stderr and exits with status
2, before or while main runs. Any other exception is a crash: its traceback stays.

--help (also -h, --helpshort) prints, on stdout, the command's docstring, its own
flags, the process flags where it has them, and the config's fields one a line
(--config.a.b=value), then exits 0; --helpfull adds every library's flags. absl's
own help exits 1 and shows a config flag's default as YAML.
"""
from __future__ import annotations

import os
import re
import sys
import textwrap
from typing import NoReturn

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ssl_jax import config as cfg_lib
from ssl_jax import parallel
from ssl_jax.errors import UserError

FILE = "file"  # config=FILE: --config names a config file
EXIT_USAGE = 2  # the shell's convention for a command used wrongly (argparse's too)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class _Refused(flags.Error):
    """A UserError met inside absl's parsing of --config: raised as a flags.Error
    because absl rewrites a ValueError as "flag --config=<the whole value>: ..."."""


class _ConfigFile(flags.ArgumentParser):
    """--config's parser, in place of ml_collections' own: the file loaded as
    config.load_file loads it (the one way, shared with tests and benchmarks),
    then every --config.a.b checked against it."""

    def __init__(self, keys):
        self.keys = keys

    def flag_type(self):
        return "config object"

    def parse(self, spec):
        try:
            config = cfg_lib.load_file(spec)
            for key in self.keys:
                cfg_lib.check_override(config, key)
        except UserError as e:
            raise _Refused(str(e)) from None
        except (TypeError, ValueError) as e:  # a bug in the config file, not the command
            raise RuntimeError(f"--config {spec}: the config file failed") from e
        config.lock()
        return config


def override_keys(argv, name: str = "config") -> list[str]:
    """The dotted keys of --config.a.b=value (or --config.a.b value, --noconfig.a.b)
    in argv, as ml_collections finds them."""
    return [a.split("=", 1)[0].split(".", 1)[1]
            for a in argv if re.match(rf"-{{1,2}}(no)?{name}\.", a)]


def parse(argv, config=None, flag_values=flags.FLAGS):
    """Defines --config (see the module docstring) and parses argv into
    flag_values; -> the arguments left. Raises UserError or flags.Error."""
    argv = flag_values.read_flags_from_files(argv, force_gnu=False)  # --flagfile
    keys = override_keys(argv)
    from_file = isinstance(config, str) and config == FILE
    if from_file:
        config_flags.DEFINE_config_file(
            "config", None, "A config file and its arguments, configs/<method>.py[:key=value,"
            "...]; then --config.a.b=value sets any field.", flag_values=flag_values,
            sys_argv=argv)
        flag_values["config"].parser = _ConfigFile(keys)
        flags.mark_flag_as_required("config", flag_values=flag_values)
    elif isinstance(config, (dict, ml_collections.ConfigDict)):
        schema = ml_collections.ConfigDict(config)
        for key in keys:
            cfg_lib.check_override(schema, key, settable=tuple(schema.keys()))
        config_flags.DEFINE_config_dict(
            "config", schema, "Only --config.a.b=value: changes a field of the stored config, "
            "typed as below (the default shown; the stored value is used unless changed).",
            flag_values=flag_values, sys_argv=argv)
    elif config is not None:
        raise TypeError(f"config={config!r}: cli.FILE, a ConfigDict or dict, or None.")
    if config is not None:  # the command's own flag, listed by its --helpshort
        flag_values.register_key_flag_for_module(sys.argv[0], flag_values["config"])
    rest = flag_values(argv)
    if from_file:
        cfg_lib.clear_other_units(flag_values.config, flag_values["config"].override_values)
    return rest


HELP, HELPFULL = ("--help", "-help", "--helpshort", "-helpshort", "-h", "-?"), "--helpfull"
PROCESS_FLAGS = ("coordinator", "num_processes", "process_id", "initialization_timeout",
                 "heartbeat_timeout")


def wants_help(argv) -> str | None:
    """"short" or "full" when argv (before a "--") asks for help, else None."""
    args = list(argv[1:])
    args = args[:args.index("--")] if "--" in args else args
    if any(a.split("=")[0] in (HELPFULL, HELPFULL[1:]) for a in args):
        return "full"
    return "short" if any(a in HELP or a == "--help=true" for a in args) else None


def _wrap(text: str, indent: str = "  ") -> str:
    return textwrap.fill(text, width=88, initial_indent=indent, subsequent_indent=indent + "    ",
                         break_on_hyphens=False, break_long_words=False)


def _flag_help(flag) -> str:
    name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
    default = f" (default: {flag.default_as_str})" if flag.default is not None else ""
    return _wrap(f"{name}: {flag.help}{default}")


def _fields_help(config) -> list[str]:
    out = []
    for key, value, typ in cfg_lib.fields(config):
        shown = repr(value) if value is not None else f"None ({typ.__name__})"
        out.append(f"  --config.{key}={shown}")
    return out


def help_text(argv, config=None, flag_values=flags.FLAGS, full: bool = False) -> str:
    """What --help prints (module docstring): the running module's docstring, its
    flags, the process flags, and the fields --config.<key>=value may set. Raises
    UserError for a --config file that does not load."""
    main = sys.modules["__main__"]
    lines = [(main.__doc__ or f"USAGE: {sys.argv[0]} [flags]").strip(), "", "Flags:"]
    own = sorted((f for f in flag_values.get_key_flags_for_module(sys.argv[0])
                  if f.name not in PROCESS_FLAGS + ("config",)), key=lambda f: f.name)
    lines += [_flag_help(f) for f in own]
    if isinstance(config, str) and config == FILE:
        lines.append(_wrap("--config: A config file and its arguments, "
                           "configs/<method>.py[:key=value,...]; then --config.a.b=value sets "
                           "any of its fields."))
    elif config is not None:
        lines.append(_wrap("--config.<field>=value: changes a field of the stored config "
                           "(below)."))
    process = [flag_values[n] for n in PROCESS_FLAGS if n in flag_values]
    if process:
        lines += ["", "Multi-process runs (launch/ sets these; not needed on one host):"]
        lines += [_flag_help(f) for f in process]
    if isinstance(config, str) and config == FILE:
        spec = _config_spec(argv)
        if spec is None:
            lines += ["", _wrap(f"Config files: {', '.join(cfg_lib.config_files())}. With "
                                "--config FILE[:args], --help lists that config's fields.", "")]
        else:
            doc = textwrap.indent(cfg_lib.file_doc(spec), "  ")
            lines += ["", f"--config {spec}:", doc, "",
                      "Its fields (set any with --config.<field>=value):"]
            lines += _fields_help(cfg_lib.load_file(spec))
    elif config is not None:
        lines += ["", _wrap("Fields (--config.<field>=value; a stored config's value is used "
                            "unless given; the defaults shown):", "")]
        lines += _fields_help(ml_collections.ConfigDict(config))
    if full:
        others = sorted(m for m in flag_values.flags_by_module_dict()
                        if m not in (sys.argv[0], __name__))
        lines += ["", "Every other flag (absl, JAX, the libraries):"]
        lines += [flag_values.module_help(m) for m in others]
    else:
        lines += ["", "--helpfull: every other flag too (absl's, JAX's)."]
    return "\n".join(lines) + "\n"


def _config_spec(argv) -> str | None:
    """The value of --config (--config=X or --config X) in argv, if given."""
    for i, a in enumerate(argv):
        if a.startswith(("--config=", "-config=")):
            return a.split("=", 1)[1]
        if a in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def define_process_flags(flag_values=flags.FLAGS) -> None:
    """--coordinator/--num_processes/--process_id/--initialization_timeout of the
    commands that run on every host of a multi-process run (train, evaluate)."""
    flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, to run as one of "
                        "several processes (jax.distributed); also SSL_JAX_COORDINATOR. "
                        "Not needed under SLURM or on a TPU pod (launch/).",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "How many processes the run has "
                         "(with --coordinator).", flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process's index, 0 on the coordinator's "
                         "host (with --coordinator).", flag_values=flag_values)
    flags.DEFINE_integer("initialization_timeout", 300, "Seconds to wait for the "
                         "coordinator and the other processes before failing.",
                         flag_values=flag_values)
    flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds after which the processes of a "
                         "multi-process run give up on one that stopped answering (died, "
                         "lost its network) and exit with an error.", flag_values=flag_values)


def join_processes(flag_values=flags.FLAGS) -> None:
    """Joins the multi-process run the flags (or the environment) describe."""
    parallel.initialize(flag_values.coordinator, flag_values.num_processes,
                        flag_values.process_id, timeout_s=flag_values.initialization_timeout,
                        heartbeat_s=flag_values.heartbeat_timeout)


EXIT_PEER_LOST = 3  # another process of a multi-process run died


def _fail(e: Exception) -> NoReturn:
    message = re.sub(r"\s*\n\s*", " ", str(e).strip())
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def run(main, config=None):
    """app.run(main) with --config as `config` says (FILE, a schema ConfigDict
    or dict, or None) and a UserError or refused flag as one line and exit status 2."""
    def parse_or_fail(argv):
        try:
            asked = wants_help(argv)
            if asked:  # before parsing: --help needs no required flag, exits 0
                sys.stdout.write(help_text(argv, config, full=asked == "full"))
                sys.exit(0)
            return parse(argv, config)
        except (UserError, flags.Error) as e:
            _fail(e)

    def main_or_fail(argv):
        # The libraries' INFO (TFDS opening splits, the TPU backend missing on a CPU,
        # orbax's ~50 lines per save) is not for the console; --verbosity=0 brings it
        # back. What the commands say is printed (train: and kept in train.log).
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except UserError as e:
            _fail(e)
        except KeyboardInterrupt:
            # Ctrl-C where a command does not catch it (train's first one stops with a
            # checkpoint: faults.Preemption); the user asked for it: no traceback.
            print("\nInterrupted (Ctrl-C): stopped at once. A training run keeps its newest "
                  "complete checkpoint; re-run the same command to resume.",
                  file=sys.stderr, flush=True)
            sys.exit(EXIT_INTERRUPTED)
        except jax.errors.JaxRuntimeError as e:
            if jax.process_count() == 1 or not parallel.peer_lost(e):
                raise
            # Another process died (or its host left the network) and this one's
            # collective failed. Say so in one line and leave at once: JAX's exit
            # handler would wait for the dead process at a shutdown barrier, then abort.
            print(f"error: process {jax.process_index()} of {jax.process_count()} lost "
                  f"contact with the others ({str(e).strip().splitlines()[0]}). Another "
                  "process died or lost its network: see its log. Restart every process with "
                  "the same command to resume from the newest checkpoint.",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_PEER_LOST)

    app.run(main_or_fail, flags_parser=parse_or_fail)
