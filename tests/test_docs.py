"""Every command that README.md and docs/*.md show in a fenced block runs as written.

A command is a line (`\\` continuations joined, comments dropped) that runs
`python -m ssl_jax.<module>`, `./run.sh`, `launch/<script>` or `python
launch/sweep.py | benchmarks/<script>`. For each: the module or script exists; every
--flag is one its real parser defines (`python -m ssl_jax.X --helpxml`, once a
module; `--noflag` for a boolean; a launcher's usage line; sweep's argparse), an enum
flag's value is one of its values; `--config FILE:ARGS --config.a.b=v` parses as
train parses it (ssl_jax/cli.py: the file loads with its preset arguments, every key
names a field, every value parses as its type), evaluate's --config.eval.* against
the evaluators' defaults; ./run.sh's subcommand exists; the command after a
launcher's `--` is checked as train's (or evaluate's). Placeholders are fine: the
brackets of an optional part and `...` are dropped, W, DIR, D taken as written.
The checker is parametrized over strings: mistakes planted in a copy of a page
must be reported.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT)
                              for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
sys.path.insert(0, os.path.join(ROOT, "launch"))
import sweep  # noqa: E402  (launch/sweep.py, as tests/test_sweep.py imports it)

PYTHON = re.compile(r"^(?:\S*/)?python3?$")
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")


# ------------------------------------------------------------------ reading pages

def commands(text: str) -> list[tuple[int, list[str]]]:
    """(line number, argv) of each command in the page's fenced blocks (not python ones)."""
    out, fence, lines = [], None, text.splitlines()
    i = 0
    while i < len(lines):
        line, start = lines[i], i + 1
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:].strip() or "sh"
            i += 1
            continue
        while line.endswith("\\") and i + 1 < len(lines):  # a continued command
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        if fence is None or fence == "python":
            continue
        argv = _argv(line)
        if argv:
            out.append((start, argv))
    return out


def _argv(line: str) -> list[str] | None:
    """The command's words without env assignments, comments, the brackets of optional
    parts and `...`; None if the line is not a command this test checks."""
    head = re.match(r"\s*(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(\S+)", line)
    if not head or not (PYTHON.match(head.group(1)) or head.group(1) in ("./run.sh", "run.sh")
                        or re.match(r"(launch|benchmarks)/\w+\.\w+$", head.group(1))):
        return None
    words = shlex.split(line, comments=True)
    while ENV.match(words[0]):
        words = words[1:]
    words = [w[1:] if w.startswith("[") and w.count("[") > w.count("]") else w for w in words]
    words = [w[:-1] if w.endswith("]") and w.count("]") > w.count("[") else w for w in words]
    return [w for w in words if w and w not in ("...", "|")]


# ------------------------------------------------------------------ real parsers

@functools.cache
def _parsers() -> dict[str, dict[str, dict] | str]:
    """module -> {flag: {"type", "enum"}} from its --helpxml (or why there is none), for
    every ssl_jax module a page runs: one subprocess each, all at once (~4 s, mostly jax)."""
    modules = {"ssl_jax.train", "ssl_jax.evaluate"}
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as f:
            modules |= set(re.findall(r"-m (ssl_jax[\w.]*)", f.read()))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--helpxml"], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m in sorted(modules) if not _module_missing(m)}
    out = {}
    for m, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        try:
            found = ET.fromstring(stdout).iter("flag")
        except ET.ParseError:
            out[m] = f"`python -m {m} --helpxml` printed no flags: {stderr.strip()[-300:]}"
            continue
        out[m] = {}
        for f in found:
            info = {"type": f.findtext("type"), "enum": [e.text for e in f.iter("enum_value")]}
            out[m].update({n: info for n in (f.findtext("name"), f.findtext("short_name")) if n})
    return out


def _module_missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


def _run_sh() -> tuple[set[str], str]:
    """(./run.sh's subcommands, the demo's --config spec)."""
    with open(os.path.join(ROOT, "run.sh")) as f:
        text = f.read()
    return set(re.findall(r"^  (\w+)\)$", text, re.M)), re.search(r'--config "([^"]+)"',
                                                                  text).group(1)


def _launch_usage(script: str) -> set[str]:
    with open(os.path.join(ROOT, "launch", script)) as f:
        usage = re.search(r'^USAGE="(.*)"$', f.read(), re.M)
    return set(re.findall(r"--\w+", usage.group(1))) | {"--help"} if usage else set()


# ------------------------------------------------------------------ checks

def _flags(args: list[str]) -> list[tuple[str, str, list[str]]]:
    """(name, value, its words) of each --flag: `--a=v`, `--a v` or `--a`."""
    out = []
    for i, word in enumerate(args):
        if word.startswith("-") and word not in ("-", "--"):
            name, eq, value = word.lstrip("-").partition("=")
            after = args[i + 1] if i + 1 < len(args) else "-"
            out.append((name, value, [word]) if eq or after.startswith("-")
                       else (name, after, [word, after]))
    return out


def check_module(module: str, args: list[str], config_spec: str | None = None) -> list[str]:
    """Problems of `python -m module args` (none: it parses as written)."""
    if _module_missing(module):
        return [f"no module {module} (python -m {module})"]
    flags = _parsers().get(module, f"{module}: not among the modules _parsers reads")
    if isinstance(flags, str):
        return [flags]
    problems, overrides = [], []
    for name, value, words in _flags(args):
        info = flags.get(name)
        if re.match(r"(no)?config\.", name):
            overrides += words
        elif info is None and flags.get(name[2:] if name.startswith("no") else "",
                                        {}).get("type") == "bool":
            continue  # --noflag
        elif info is None:
            problems.append(f"{module}: unknown flag --{name}")
        elif info["enum"] and value not in info["enum"] and not value.isupper():
            problems.append(f"{module}: --{name} {value}: not one of {info['enum']}")
        elif name == "config":
            config_spec = value
        elif module in ("ssl_jax.prepare", "ssl_jax.data.prepare") and name == "dataset":
            from ssl_jax.datasets.prepare import BUILDERS  # a string flag: the registry's names
            if value not in BUILDERS and not value.isupper():
                problems.append(f"{module}: --dataset {value}: not one of {sorted(BUILDERS)}")
        elif module == "ssl_jax.evaluate" and name == "eval":
            from ssl_jax.eval.evaluators import REGISTRY
            unknown = set(value.split(",")) - set(REGISTRY) - {""}
            problems += [f"{module}: --eval {value}: unknown {sorted(unknown)}"] if unknown else []
    return problems + _check_config(module, config_spec, overrides)


def _check_config(module: str, spec: str | None, overrides: list[str]) -> list[str]:
    """--config SPEC and --config.a.b=v, parsed as the command parses them (cli.parse)."""
    from absl import flags as absl_flags

    from ssl_jax import cli
    from ssl_jax import eval as eval_lib
    from ssl_jax.errors import UserError
    if module == "ssl_jax.evaluate" and overrides:
        schema, argv = {"eval": eval_lib.defaults()}, overrides
    elif module == "ssl_jax.train" and spec and spec != "..." and "<" not in spec:
        schema, argv = cli.FILE, ["--config", spec, *overrides]
    else:
        return []
    try:
        cli.parse([module, *argv], schema, absl_flags.FlagValues())
    except (UserError, absl_flags.Error) as e:
        return [f"{module}: {' '.join(argv)}: {e}"]
    return []


def check(argv: list[str]) -> list[str]:
    """Problems of one command (its words, as `commands` gives them)."""
    head, *rest = argv
    if PYTHON.match(head):
        if rest[:1] == ["-m"]:
            return check_module(rest[1], rest[2:]) if len(rest) > 1 else ["python -m what?"]
        if rest[:1] == ["launch/sweep.py"]:
            return check_sweep(rest[1:])
        head, rest = (rest or [""])[0], []
    if head in ("./run.sh", "run.sh"):
        subs, demo_config = _run_sh()
        if not rest or rest[0] not in subs:
            return [f"./run.sh {' '.join(rest[:1])}: the subcommands are {sorted(subs)}"]
        return check_module("ssl_jax.train", rest[1:], demo_config) if rest[0] == "demo" else []
    if not os.path.isfile(os.path.join(ROOT, head)):
        return [f"no script {head}"]
    if not head.startswith("launch/") or head.endswith(".sbatch"):
        return []
    split = rest.index("--") if "--" in rest else len(rest)
    own, after = rest[:split], rest[split + 1:]
    usage = _launch_usage(os.path.basename(head))
    problems = [f"{head}: unknown flag {w}" for w in own if w.startswith("--") and w not in usage]
    module = "ssl_jax.evaluate" if "evaluate" in own else "ssl_jax.train"
    return problems + (check_module(module, after) if after else [])


def check_sweep(args: list[str]) -> list[str]:
    """launch/sweep.py's own parser and checks (SweepError), nothing started."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parsed, extra = sweep.parse_args(args)
    except SystemExit:
        return [f"launch/sweep.py: {err.getvalue().strip().splitlines()[-1]}"]
    try:
        parsed.summarize or sweep.prepare(parsed, extra)
    except sweep.SweepError as e:
        return [f"launch/sweep.py: {e}"]
    return check_module("ssl_jax.train", extra)


def page_problems(path: str) -> list[str]:
    with open(path) as f:
        found = commands(f.read())
    return [f"{os.path.basename(path)}:{n}: {p}" for n, argv in found for p in check(argv)]


# ------------------------------------------------------------------ the tests

@pytest.mark.parametrize("page", PAGES)
def test_every_command_of_the_page_parses_as_written(page):
    path = os.path.join(ROOT, page)
    with open(path) as f:
        assert commands(f.read()), f"{page} shows no command"
    assert page_problems(path) == []


# A correct line of the README, then each mistake a page could make.
PLANTED = [
    ("python -m ssl_jax.evaluate --workdir runs/simclr --eval linear,knn --stagse all",
     "unknown flag --stagse"),
    ("python -m ssl_jax.evaluat --workdir runs/simclr", "no module ssl_jax.evaluat"),
    ("python -m ssl_jax.train --config configs/simclr.py:dataset=fashion_mnist "
     "--workdir runs/x --config.optimizer.lrr=0.1", "Unknown config key in --config.optimizer.lrr"),
    ("python -m ssl_jax.train --config configs/simclr.py:datset=fashion_mnist --workdir runs/x",
     "Unknown config argument 'datset'"),
    ("python -m ssl_jax.train --config configs/simclr.py:dataset=mnist --workdir runs/x",
     "dataset='mnist' has no preset"),
    ("python -m ssl_jax.train --config configs/simclrr.py --workdir runs/x", "not found"),
    ("python -m ssl_jax.evaluate --workdir W --config.eval.linear.epoch=3",
     "Unknown config key in --config.eval.linear.epoch"),
    ("python -m ssl_jax.evaluate --workdir W --eval linear,knnn", "unknown ['knnn']"),
    ("python -m ssl_jax.prepare --dataset fashion_mnst", "--dataset fashion_mnst: not one of"),
    ("./run.sh demo --config.total_epoch=4", "Unknown config key in --config.total_epoch"),
    ("./run.sh bench", "the subcommands are"),
    ("launch/local.sh --process 2 train -- --config configs/simclr.py:runlocal --workdir runs/mp",
     "launch/local.sh: unknown flag --process"),
    ("launch/slurm.sh --nodes 4 --gpus_per_node 8 --time 04:00:00 -- "
     "--config configs/simclr.py:dataset=imagenet2012 --work_dir /shared/x",
     "unknown flag --work_dir"),
    ("python launch/sweep.py --config configs/moco.py:dataset=fashion_mnist "
     "--sweep 'config.optimizer.lrr=0.03,0.1' --root runs/sweep", "optimizer.lrr"),
    ("python launch/sweep.py --root runs/sweep --sumarize", "unrecognized arguments: --sumarize"),
    ("python benchmarks/qualty.py", "no script benchmarks/qualty.py"),
]


@pytest.mark.parametrize("command, expected", PLANTED, ids=[e for _, e in PLANTED])
def test_a_mistake_planted_in_a_page_is_reported(command, expected, tmp_path):
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    copy = tmp_path / "README.md"
    copy.write_text(text + f"\n```bash\n{command}   # planted\n```\n")
    problems = page_problems(str(copy))
    assert any(expected in p for p in problems), problems
    line = len(text.splitlines()) + 3
    assert all(p.startswith(f"README.md:{line}: ") for p in problems), problems


def test_continuations_comments_brackets_and_placeholders_are_read_as_a_shell_would():
    text = ("```bash\n# a comment line\n"
            "XLA_FLAGS=--x=8 python -m ssl_jax.train --config configs/simclr.py:runlocal \\\n"
            "    --workdir runs/x   # what it does\n"
            "python -m ssl_jax.evaluate --exported E --eval linear [--data_dir DIR]\n"
            "pip install -r requirements-bench.txt\n```\n"
            "```python\npython -m ssl_jax.nothing\n```\n")
    assert commands(text) == [
        (3, ["python", "-m", "ssl_jax.train", "--config", "configs/simclr.py:runlocal",
             "--workdir", "runs/x"]),
        (5, ["python", "-m", "ssl_jax.evaluate", "--exported", "E", "--eval", "linear",
             "--data_dir", "DIR"])]


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES)
def test_every_link_of_the_page_leads_somewhere(page):
    with open(os.path.join(ROOT, page)) as f:
        text = f.read()
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path \
            else os.path.join(ROOT, page)
        if not os.path.exists(full):
            bad.append(target)
        elif anchor and full.endswith(".md"):
            with open(full) as f:
                headings = re.findall(r"^#+ (.*)$", f.read(), re.M)
            if anchor not in {_slug(h) for h in headings}:
                bad.append(target)
    assert bad == []


def test_the_readme_shows_the_commands_links_every_page_and_keeps_the_demo_numbers():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    shown = {" ".join(argv[:3] if argv[1] == "-m" else argv[:2]) for _, argv in commands(readme)}
    assert {"./run.sh demo", "./run.sh test", "python -m ssl_jax.prepare",
            "python -m ssl_jax.train", "python -m ssl_jax.evaluate", "python -m ssl_jax.export",
            "python launch/sweep.py"} <= shown
    assert [p for p in PAGES[1:] if f"]({p})" not in readme] == []
    block = readme.split("<!-- demo-numbers -->")[1].split("<!-- /demo-numbers -->")[0]
    assert "linear top-1" in block


def _layout() -> str:
    with open(os.path.join(ROOT, "docs", "extending.md")) as f:
        return f.read().split("## Layout", 1)[1].split("```")[1]


def test_the_layout_names_every_module_of_the_package():
    layout = set(re.findall(r"[\w]+", _layout()))
    package = os.path.join(ROOT, "ssl_jax")
    names = {os.path.splitext(n)[0] for n in os.listdir(package)
             if (n.endswith(".py") or os.path.isdir(os.path.join(package, n, "")) and
                 os.path.exists(os.path.join(package, n, "__init__.py")))} - {"__init__"}
    assert sorted(names - layout) == []


def test_the_compilation_cache_is_documented_where_train_puts_it():
    with open(os.path.join(ROOT, "ssl_jax", "train.py")) as f:
        where = re.search(r'expanduser\("([^"]*jax_compilation_cache[^"]*)"\)', f.read()).group(1)
    with open(os.path.join(ROOT, "docs", "faults.md")) as f:
        faults = f.read()
    assert where in faults and "JAX_COMPILATION_CACHE_DIR" in faults


# Images a class in each split of the sources whose invariance sets the docs make
# (one first frame a video for fashion_mnist_videos; neither has a validation split).
_PER_CLASS = {("fashion_mnist", "train"): 6000, ("fashion_mnist", "test"): 1000}


def test_every_documented_invariance_sets_command_fits_its_source_split():
    """prepare draws sets_per_class x set_size different images a class from the
    source split: the defaults (30 x 8 from test) do not fit fashion_mnist_videos'
    20 test videos a class, so a page must give --source_split and --sets_per_class."""
    from ssl_jax.datasets import invariance_sets, videos
    per_class = dict(_PER_CLASS)
    n = videos.DEFAULTS["videos_per_class"]
    per_class.update({("fashion_mnist_videos", "train"): n,
                      ("fashion_mnist_videos", "test"): max(1, n // 5)})
    seen, bad = 0, []
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as f:
            for line, argv in commands(f.read()):
                opts = {n: v for n, v, _ in _flags(argv[3:])} if "ssl_jax.prepare" in argv else {}
                if opts.get("dataset") != "invariance_sets":
                    continue
                key = (opts["source"], opts.get("source_split", "test"))
                need = (int(opts.get("sets_per_class", invariance_sets.DEFAULTS["sets_per_class"]))
                        * int(opts.get("set_size", invariance_sets.DEFAULTS["set_size"])))
                seen += key[0] == "fashion_mnist_videos"
                if key in per_class and need > per_class[key]:
                    bad.append(f"{page}:{line}: {need} images a class from {key}, "
                               f"which has {per_class[key]}")
    assert seen and bad == []
