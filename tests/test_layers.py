"""The import layering of ssl_jax (docs/extending.md, "Layout"), pinned so that a shortcut
import fails CI instead of slowly turning the layers into a web."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENTRY_POINTS = {"ssl_jax.train", "ssl_jax.evaluate", "ssl_jax.export", "ssl_jax.prepare"}
BUILDERS, PIPELINE = "ssl_jax.datasets", "ssl_jax.data"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for f in (ROOT / "ssl_jax").rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _imports(path: pathlib.Path) -> set[str]:
    """Every absolute module named by an import in the file, incl. `from a import b` as a.b."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_imports_point_down_the_layers():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        deps = _imports(path)
        bad += [f"{name} imports {d}" for d in deps
                if d.split(".")[0] in ("configs", "benchmarks", "tests")]
        if name in ENTRY_POINTS:
            bad += [f"entry point {name} imports {d}" for d in deps & ENTRY_POINTS]
        if name.startswith("ssl_jax.methods"):
            bad += [f"{name} imports {d}" for d in deps
                    if d.startswith(("ssl_jax.eval", "ssl_jax.data", "ssl_jax.experiment"))]
        if name not in ENTRY_POINTS:
            bad += [f"{name} imports {d}" for d in deps & ENTRY_POINTS]
        # The builders run once, offline; training and evaluation read only what they
        # wrote, through the pipeline. Only the prepare command imports a builder.
        if name != "ssl_jax.prepare" and not _within(name, BUILDERS):
            bad += [f"{name} imports the builder {d}" for d in deps if _within(d, BUILDERS)]
    assert not bad, "\n".join(bad)


def test_no_import_circle_between_modules():
    mods = _modules()
    graph = {m: {d for d in _imports(f) if d in mods and d != m} for m, f in mods.items()}

    def reach(src):
        seen, todo = set(), [src]
        while todo:
            for d in graph[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen
    circles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in reach(b)
                      and not (a.startswith(b + ".") or b.startswith(a + "."))})
    assert not circles, circles


def test_modules_stay_small():
    big = {n: len(f.read_text().splitlines()) for n, f in _modules().items()}
    assert not {n: k for n, k in big.items() if k > 400}, "split modules by what they hold"


def test_the_pipeline_and_the_builders_are_apart():
    """The input pipeline (ssl_jax/data) holds no builder, and the builders (ssl_jax/datasets)
    hold no pipeline stage: a module named for the other side is in the wrong package."""
    mods = _modules()
    pipeline = {n.rsplit(".", 1)[-1] for n in mods if n.startswith(PIPELINE + ".")}
    builders = {n.rsplit(".", 1)[-1] for n in mods if n.startswith(BUILDERS + ".")}
    assert {"sources", "pipeline", "decode", "shm_slots", "video_pairs"} <= pipeline
    assert {"base", "prepare", "fashion_mnist", "imagenet", "videos"} <= builders
    for name, path in mods.items():
        if _within(name, PIPELINE):
            text = path.read_text()
            assert "GeneratorBasedBuilder" not in text and "StreamingBuilder" not in text, \
                f"{name} defines or uses a dataset builder: it belongs in {BUILDERS}"
