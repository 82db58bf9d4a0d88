"""The evaluator registry (eval/evaluators.py) and result writing (eval/results.py) on
hand-made features: one interface for every evaluator, records in the files people read."""
import dataclasses
import json
import os

import ml_collections
import numpy as np

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
        if evaluator.needs != "splits":  # invariance: below
            continue
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
    assert "knn (offline, frozen, random init block1, avg2x2): k=10: top-1" in printed
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


def test_invariance_scores_each_split_of_the_sets_and_each_stage():
    """The invariance evaluator on hand-made sets: it asks Inputs.sets for each split
    (those of the dataset in the known order when none are named) and scores each
    stage's features with the metric, whose own tests pin its numbers."""
    from ssl_jax.eval import invariance
    rng = np.random.default_rng(0)
    set_id, label = np.repeat(np.arange(12), 4), np.repeat(np.arange(12) % 3, 4)
    # block2's features are constant within a set, block1's independent per image.
    made = {split: evaluators.SetFeatures(
        features={"block1": rng.normal(size=(48, 30)),
                  "block2": np.repeat(rng.normal(size=(12, 30)), 4, axis=0)},
        label=label, set_id=set_id, dataset="toy_invariance")
        for split in ("illumination", "extra", "occlusion")}
    asked = []
    feats = dataclasses.replace(
        inputs([]), set_splits=lambda dataset, data_dir: list(made),
        sets=lambda dataset, data_dir, split: asked.append((dataset, data_dir, split))
        or made[split])
    out = invariance.evaluate(feats, {"dataset": "", "data_dir": "", "splits": (),
                                      "top_k": (5, 10)})
    assert asked == [(None, None, "occlusion"), (None, None, "illumination"),
                     (None, None, "extra")]
    for stage in ("block1", "block2"):
        for split, sets in made.items():
            want = invariance.invariance_scores(sets.features[stage], set_id, label, (5, 10))
            assert out[stage]["scores"][split] == {"5": want[5], "10": want[10]}
            assert out[stage]["sets"][split] == 12 and out[stage]["images"][split] == 48
    assert out["block2"]["scores"]["occlusion"]["5"] > 1.5 * out["block1"]["scores"]["occlusion"]["5"]
    assert invariance.summary(out["block2"]).startswith("K=5/10: occlusion ")
    assert len(invariance.rows(out["block2"])) == 3 * 2
    asked.clear()
    invariance.evaluate(feats, {"dataset": "d", "data_dir": "/x", "splits": ("extra",),
                                "top_k": (5,)})
    assert asked == [("d", "/x", "extra")]


def test_a_record_merges_with_the_same_steps_and_keeps_earlier_steps_aside():
    def rec(step, **stages):
        final = list(stages)[-1]
        return {"step": step, "stage": final, **stages[final], "stages": stages}
    a = rec(6, block1={"top1": 50.0, "top5": 90.0}, block2={"top1": 60.0, "top5": 95.0})
    b = rec(6, block2={"top1": 61.0, "top5": 96.0})
    got = results.merge(a, b, ["block1", "block2"])
    assert got["stages"] == {"block1": a["stages"]["block1"], "block2": b["stages"]["block2"]}
    assert (got["stage"], got["top1"], got["top5"]) == ("block2", 61.0, 96.0)
    # Shallow to deep whatever came first: block1 evaluated after block2.
    got = results.merge(b, rec(6, block1={"top1": 1.0, "top5": 2.0}), ["block1", "block2"])
    assert list(got["stages"]) == ["block1", "block2"] and got["top1"] == 61.0
    later = results.merge(a, rec(9, block2={"top1": 70.0, "top5": 97.0}), ["block1", "block2"])
    assert list(later["stages"]) == ["block2"] and later["previous_steps"] == {"6": a["stages"]}
    assert results.merge(None, b) is b


def test_knn_says_the_k_it_used_when_the_train_split_is_smaller(tmp_path, capsys):
    """k larger than the train split is clipped to it: the printed line, eval_knn.json
    and results.md say which k ran (and the line that it was clipped)."""
    s = settings()
    s.knn.update(k=100000, also_k=(3, 500))  # 500 clipped to 200 too: reported once
    config = ml_collections.ConfigDict(dict(method="simclr", dataset="tiny", eval=s))
    evaluator = evaluators.REGISTRY["knn"]
    per_stage = evaluator.run(inputs([]), dict(s.knn))
    r = results.record(per_stage, "block2", pool="global", step=6, random_init=False,
                       seconds=1.0)
    results.show("knn", r, evaluator, "tiny", "test")
    results.write(str(tmp_path), config, "knn", r, evaluator)
    assert ("knn (offline, frozen block2): k=200 (k=100000 asked: clipped to the 200 train "
            "examples): top-1 ") in capsys.readouterr().out
    with open(tmp_path / "eval_knn.json") as f:
        stage = json.load(f)["stages"]["block2"]
    assert (stage["k"], stage["k_asked"], list(stage["also"])) == (200, 100000, ["k=3"])
    with open(tmp_path / "results.md") as f:
        rows = f.read().splitlines()[2:]
    assert ["| knn k=200 (offline) | block2 |" in rows[2],
            "| knn k=3 (offline) | block2 |" in rows[3]] == [True, True], rows
    # A k the split holds is not "asked": the record says only the k.
    s.knn.update(k=10, also_k=())
    assert "k_asked" not in evaluator.run(inputs([]), dict(s.knn))["block2"]
