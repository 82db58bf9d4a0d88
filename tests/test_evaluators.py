"""The evaluator registry (eval/evaluators.py) and result writing (eval/results.py) on
hand-made features: one interface for every evaluator, records in the files people read."""
import json
import os

import ml_collections

from ssl_jax import eval as eval_lib
from ssl_jax.eval import evaluators, results
from tests.test_eval import clusters


def inputs(asked: list) -> evaluators.Inputs:
    (xtr, ytr), (xte, yte) = clusters(200, seed=1), clusters(80, seed=2)
    return evaluators.Inputs(
        train={"block1": xtr[:, :4], "block2": xtr}, train_y=ytr,
        test={"block1": xte[:, :4], "block2": xte}, test_y=yte, num_classes=4, seed=0,
        train_views=lambda augment: asked.append(dict(augment)) or [])


def settings() -> ml_collections.ConfigDict:
    s = eval_lib.defaults()
    s.linear.epochs, s.mlp.epochs = 2, 2
    s.knn.update(k=10, also_k=(3,))
    s.lowshot.update(shots=(1, 4), seeds=(0,), steps=5)
    return s


def test_every_evaluator_gives_a_record_per_stage_and_only_linear_asks_for_views():
    asked, s = [], settings()
    feats = inputs(asked)
    for name, evaluator in evaluators.REGISTRY.items():
        out = evaluator.run(feats, dict(s[name]))
        assert list(out) == ["block1", "block2"], name
        for record in out.values():
            assert 0.0 <= record["top1"] <= record["top5"] <= 100.0
            for v in evaluator.extra(record).values():
                assert 0.0 <= v["top1"] <= v["top5"] <= 100.0
            assert all(isinstance(line, str) for line in evaluator.details(record))
    assert asked == [s.linear.augment.to_dict()]  # once, by the linear probe


def test_records_are_printed_and_written_with_their_extra_rows(tmp_path, capsys):
    s = settings()
    config = ml_collections.ConfigDict(dict(method="simclr", dataset="tiny", eval=s))
    feats = inputs([])
    for name in ("knn", "lowshot"):
        evaluator = evaluators.REGISTRY[name]
        r = results.record(evaluator.run(feats, dict(s[name])), "block2", pool="avg2x2", step=6,
                           random_init=True, train_examples=200, test_examples=80,
                           seconds=1.0, exported="out")
        results.show(name, r, evaluator, "tiny", "test")
        results.write(str(tmp_path), config, name, r, evaluator)
    printed = capsys.readouterr().out
    assert "knn (offline, frozen, random init block1, avg2x2): top-1" in printed
    assert "    k=3: top-1" in printed and "    k=1: " in printed  # kNN's extra k, low-shot curve
    with open(tmp_path / "eval_knn_avg2x2_random_init.json") as f:
        r = json.load(f)
    assert r["stage"] == "block2" and r["top1"] == r["stages"]["block2"]["top1"]
    assert r["exported"] == os.path.abspath("out") and r["stages"]["block1"]["also"]["k=3"]
    with open(tmp_path / "results.md") as f:
        rows = f.read().splitlines()
    assert rows[0] == results.TABLE_HEADER.splitlines()[0] and len(rows) == 2 + 2 * 2 + 2
    assert "| simclr (random init) | tiny | 6 | knn k=3 (offline) | block1 (avg2x2) |" in rows[3]
    assert "| lowshot (offline) | block2 (avg2x2) |" in rows[-1]
