"""eval/report.py on hand-written evaluation records: table cells, figures, retrieval frames."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ssl_jax.eval import figures, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STAGES = ("block1", "block2", "block3", "block4")
PER_K = {1: (31.5, 2.25), 2: (40.0, 2.0), 4: (47.0, 1.5), 8: (55.5, 1.25), 16: (62.0, 1.0),
         32: (67.0, 0.5), 64: (71.25, 0.75)}


def record(top1: dict, per_k: dict | None = None, random_init: bool = False) -> dict:
    """{stage: top1} -> an eval_<name>.json record as evaluate.py writes it (per_k keys
    are strings after a JSON round trip, as in real files)."""
    stages = {}
    for s, v in top1.items():
        stages[s] = {"top1": v, "top5": min(100.0, v + 10)}
        if per_k is not None:
            stages[s]["per_k"] = {str(k): {"mean": m, "std": sd, "top1": [m] * 5}
                                  for k, (m, sd) in per_k.items()}
    final = list(top1)[-1]
    return {"top1": top1[final], "top5": stages[final]["top5"], "stage": final, "stages": stages,
            "step": 0 if random_init else 468, "random_init": random_init,
            "train_examples": 60000, "test_examples": 10000, "seconds": 1.0}


def write_run(path, method: str, records: dict) -> str:
    """records: {file stem after "eval_": record} -> a workdir with config.json."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"method": method, "dataset": "fashion_mnist"}, f)
    for name, r in records.items():
        with open(os.path.join(path, f"eval_{name}.json"), "w") as f:
            json.dump(r, f)
    return str(path)


@pytest.fixture
def runs(tmp_path):
    """Two runs: simclr (every stage, linear + knn + lowshot, a random-init baseline)
    and moco (linear at block4 only)."""
    a = write_run(tmp_path / "a", "simclr", {
        "linear": record(dict(zip(STAGES, (69.85, 80.1, 84.68, 86.92)))),
        "knn": record({"block4": 81.9}),
        "lowshot": record({"block4": 71.25}, PER_K),
        "linear_random_init": record({"block4": 84.08}, random_init=True)})
    b = write_run(tmp_path / "b", "moco", {"linear": record({"block4": 85.31})})
    return a, b


def parse_table(markdown: str) -> dict:
    """A Markdown table -> {first cell: {header: cell}}, plus "" -> the header list."""
    lines = [l for l in markdown.splitlines() if l.startswith("|")]
    split = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
    header = split[0]
    table = {cells[0]: dict(zip(header[1:], cells[1:])) for cells in split[2:]}
    table[""] = header
    return table


def test_compare_table_cells(runs):
    table = parse_table(report.compare_table(report.load_rows(runs)))
    assert table[""] == (["run"] + [f"linear {s}" for s in STAGES] + ["knn block4"]
                         + [f"lowshot block4 k={k}" for k in (1, 8, 64)])
    assert list(table) == ["simclr", "simclr (random init)", "moco", ""]
    assert table["simclr"]["linear block2"] == "80.10"
    assert table["simclr"]["knn block4"] == "81.90"
    assert table["simclr"]["lowshot block4 k=1"] == "31.50±2.25"
    assert table["simclr"]["lowshot block4 k=8"] == "55.50±1.25"
    assert table["simclr"]["lowshot block4 k=64"] == "71.25±0.75"
    assert table["simclr (random init)"]["linear block4"] == "84.08"
    assert table["simclr (random init)"]["linear block1"] == report.MISSING
    assert table["simclr (random init)"]["knn block4"] == report.MISSING
    assert table["moco"]["linear block4"] == "85.31"
    assert table["moco"]["linear block1"] == report.MISSING == "–"
    assert table["moco"]["lowshot block4 k=8"] == "–"
    # --norandom_init leaves the baseline out; --names replaces config.json's method.
    names = list(parse_table(report.compare_table(
        report.load_rows(runs, names=["SimCLR", "MoCo"], random_init=False))))
    assert names == ["SimCLR", "MoCo", ""]


def test_same_method_twice_is_told_apart_by_workdir(tmp_path):
    rec = {"linear": record({"block4": 80.0})}
    rows = report.load_rows([write_run(tmp_path / "lr01", "simclr", rec),
                             write_run(tmp_path / "lr03", "simclr", rec)])
    assert [r.label for r in rows] == ["simclr (lr01)", "simclr (lr03)"]


def test_stages_of_different_encoders_keep_their_order(tmp_path):
    resnet = ("stem", "stage1", "stage2", "stage3", "stage4")
    rows = report.load_rows([
        write_run(tmp_path / "r", "simclr", {"linear": record({s: 50.0 for s in resnet})}),
        write_run(tmp_path / "c", "moco", {"linear": record({"block2": 1.0, "block4": 2.0})})])
    assert report.stages(rows, "linear") == list(resnet) + ["block2", "block4"]


def check_png(path, min_size=(300, 200), colours=()):
    """A real PNG of at least min_size, and each of `colours` (tab10 indices: a row's
    bars or line) drawn over at least 200 pixels: a figure that lost a run's bars,
    or drew nothing, fails."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 10_000, (path, len(data))  # axes, text and bars, not a blank canvas
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    import matplotlib
    for i in colours:
        rgb = np.round(np.asarray(matplotlib.colormaps["tab10"](i)[:3]) * 255)
        near = np.abs(pixels - rgb).max(axis=1) <= 8
        assert near.sum() >= 200, (path, i, int(near.sum()))


def test_cli_writes_table_and_figures(runs, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "ssl_jax.eval.report", "--workdirs",
                           ",".join(runs), "--names", "SimCLR,MoCo", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    markdown = (out / "compare.md").read_text()
    assert report.compare_table(report.load_rows(runs, ["SimCLR", "MoCo"])) in markdown
    assert "| SimCLR (random init) | – | – | – | 84.08 |" in done.stdout  # also printed
    check_png(out / "accuracy_per_stage.png", colours=(0, 1))  # SimCLR's and MoCo's bars
    check_png(out / "lowshot.png", colours=(0,))  # only SimCLR has a low-shot curve


def test_write_figures_for_one_workdir(runs):
    paths = report.write_figures(runs[0])
    assert [os.path.relpath(p, runs[0]) for p in paths] == [
        os.path.join("figures", "accuracy_per_stage.png"), os.path.join("figures", "lowshot.png")]
    for p in paths:
        check_png(p)
    with pytest.raises(ValueError, match=r"stage 'block9'; they have stages \['block4'\]"):
        report.plot_lowshot(report.load_rows([runs[0]]), os.path.join(runs[0], "l.png"), "block9")
    # No low-shot record: no curve (write_figures then writes the bar chart alone).
    assert not report.plot_lowshot(report.load_rows([runs[1]]), os.path.join(runs[1], "l.png"))
    assert not os.path.exists(os.path.join(runs[1], "l.png"))


def test_workdir_without_records_says_what_to_run(tmp_path):
    empty = write_run(tmp_path / "never_evaluated", "simclr", {})
    with pytest.raises(ValueError, match=r"never_evaluated.*python -m ssl_jax\.evaluate "
                                         r"--workdir .*never_evaluated --eval"):
        report.load_rows([empty])
    with pytest.raises(ValueError, match="never_evaluated"):
        report.write_figures(empty)
    with pytest.raises(ValueError, match="--names has 1 entries for 2 workdirs"):
        report.load_rows([empty, empty], names=["x"])


def is_red(pixel) -> bool:
    r, g, b = (int(c) for c in pixel[:3])
    return r > 200 and g < 80 and b < 80


def test_retrieval_grid_frames_exactly_the_mismatches(tmp_path):
    q, k, size = 2, 3, 12
    # Every image one flat colour of its own (none reddish), so each is found in the PNG.
    colours = {(i, j): (20 + 60 * j, 40 + 100 * i, 200) for i in range(q) for j in range(k + 1)}
    tile = lambda c: np.broadcast_to(np.array(c, np.uint8), (size, size, 3))
    queries = np.stack([tile(colours[i, 0]) for i in range(q)])
    neighbours = np.stack([np.stack([tile(colours[i, j + 1]) for j in range(k)])
                           for i in range(q)])
    query_labels = np.array([3, 7])
    neighbour_labels = np.array([[3, 5, 3], [1, 7, 7]])  # mismatches: (0, #2), (1, #1)
    path = tmp_path / "grid.png"
    figures.retrieval_grid(queries, neighbours, str(path), query_labels, neighbour_labels)
    check_png(path, min_size=(k * 80, q * 80))
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)

    def outside_edges(colour):
        """The four pixels 1 px outside the middle of each side of an image's area."""
        ys, xs = np.nonzero(np.abs(pixels - colour).max(-1) <= 2)
        assert len(ys) > 50, colour  # drawn, and larger than a few pixels
        top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
        cy, cx = (top + bottom) // 2, (left + right) // 2
        return [pixels[top - 2, cx], pixels[bottom + 2, cx], pixels[cy, left - 2],
                pixels[cy, right + 2]]

    for i in range(q):
        for j in range(k + 1):
            wrong = j > 0 and neighbour_labels[i, j - 1] != query_labels[i]
            assert [is_red(p) for p in outside_edges(colours[i, j])] == [wrong] * 4, (i, j)
    # Without labels nothing is framed red.
    figures.retrieval_grid(queries, neighbours, str(path))
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert not any(is_red(p) for j in range(1, k + 1) for p in outside_edges(colours[0, j]))
    with pytest.raises(ValueError, match=r"\(Q, K, H, W, C\)"):
        figures.retrieval_grid(queries, neighbours[0], str(path))


def test_retrieval_grid_greyscale(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "grey.png"
    figures.retrieval_grid(rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8),
                          rng.integers(0, 256, (3, 5, 28, 28, 1), dtype=np.uint8), str(path),
                          np.array([0, 1, 2]), rng.integers(0, 3, (3, 5)))
    check_png(path)


def test_figures_of_one_run_name_it_and_draw_only_its_newest_step(tmp_path):
    """An export evaluated in place is named by its run's method (export.json), not its
    folder; an evaluator last run on an earlier checkpoint stays out of the figures;
    a pooled record's panel is titled in words."""
    out = write_run(tmp_path / "exported", "x", {
        "linear": record({"block4": 86.0}),
        "knn": dict(record({"block4": 80.0}), step=100),  # an earlier checkpoint's
        "linear_avg2x2": record({"block4": 87.0})})
    os.remove(os.path.join(out, "config.json"))
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump({"source": {"method": "moco", "dataset": "fashion_mnist", "step": 468}}, f)
    info, trained, _ = report.load_records(out)
    assert info["method"] == "moco" and set(trained) == {"linear", "knn", "linear_avg2x2"}
    assert set(report.newest_step_only(trained)) == {"linear", "linear_avg2x2"}
    assert figures.panel_title("linear_avg2x2") == "linear probe, avg2x2 pooling"
    assert figures.panel_title("knn") == "kNN (cosine)"
    assert figures.panel_title("invariance") == "invariance"
    paths = report.write_figures(out)
    assert [os.path.basename(p) for p in paths] == ["accuracy_per_stage.png"]
    check_png(paths[0], min_size=(640, 200))  # one stage: wide enough for its title
