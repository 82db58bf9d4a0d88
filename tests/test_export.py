"""Encoder export: a fresh process reproduces the training checkpoint's features
exactly, and evaluating the export gives the workdir's numbers (features cached)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ssl_jax import encoders, evaluation, experiment, export, parallel, train
from ssl_jax.data import sources
from ssl_jax.eval import features
from tests.test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOAD_AND_EXTRACT = """
import sys, numpy as np
from ssl_jax import export
fn, variables = export.load(sys.argv[1])
feats = fn(variables, np.load(sys.argv[2]))
np.savez(sys.argv[3], **{k: np.asarray(v) for k, v in feats.items()})
"""


def test_exported_encoder_reproduces_the_checkpoints_features(tiny_data, tmp_path, fast_prng,
                                                              compilation_cache, monkeypatch,
                                                              capsys):
    c = tiny_config("simclr", tiny_data)
    c.eval.knn.also_k = (5, 20)  # 20 is the run's k: reported once
    workdir, out = str(tmp_path / "w"), str(tmp_path / "exported")
    final = jax.device_get(train.train(c, workdir))
    meta = export.export(workdir, out)
    assert meta["source"]["step"] == c.total_steps and meta["stages"][-1] == "block2"
    assert meta["preprocessing"]["input_shape"] == [28, 28, 1]
    assert meta["data"] == {"dataset": "tiny_squares", "data_dir": tiny_data,
                            "train_split": "train", "num_classes": 10}
    assert meta["eval"]["knn"]["k"] == 20 and meta["eval"]["seed"] == c.seed
    with open(os.path.join(out, "export.json")) as f:
        assert json.load(f)["model"]["widths"] == [4, 8]

    # Features straight from the training checkpoint, in this process.
    mesh = parallel.make_mesh()
    config, encoder, variables, _ = encoders.load_run(workdir, mesh)
    # Read alone from the checkpoint (orbax partial restore): the train state's encoder.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables),
                 experiment.encoder_variables(final, config))
    images = sources.read_batch(sources.open_source("tiny_squares", "test", tiny_data),
                                 np.arange(16))["image"]
    want = jax.jit(features.make_features_fn(encoder, features.eval_view_config(config)))(
        variables, images)

    # The same from the export, in a fresh process that imports no method code.
    np.save(tmp_path / "images.npy", images)
    subprocess.run([sys.executable, "-c", LOAD_AND_EXTRACT, out, str(tmp_path / "images.npy"),
                    str(tmp_path / "feats.npz")], cwd=ROOT, check=True, timeout=300)
    got = np.load(tmp_path / "feats.npz")
    assert sorted(got.files) == sorted(want) == meta["stages"]
    for k in want:
        np.testing.assert_array_equal(got[k], np.asarray(want[k]), err_msg=k)

    # The flat arrays for other frameworks are the same parameters.
    flat = np.load(os.path.join(out, "params.npz"))
    np.testing.assert_array_equal(flat["params/conv1/kernel"],
                                  np.asarray(variables["params"]["conv1"]["kernel"]))
    assert any(k.startswith("batch_stats/bn1/") for k in flat.files)

    # Offline evaluation of the run: the features are extracted once, then read back.
    calls = []
    real_extract = features.extract
    monkeypatch.setattr(features, "extract",
                        lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    first = evaluation.evaluate(workdir, ("knn",))["knn"]
    assert list(first["stages"]["block2"]["also"]) == ["k=5"]  # kNN at a further k
    with open(os.path.join(workdir, "results.md")) as f:
        assert "| knn k=5 (offline) | block2 |" in f.read()
    assert len(calls) == 2 and capsys.readouterr().out.count("features: extracted") == 2
    cached = sorted(os.listdir(os.path.join(workdir, "features")))
    assert len(cached) == 2 and all(f.startswith(f"step{c.total_steps}_") for f in cached)
    again = evaluation.evaluate(workdir, ("knn",), plot=True)["knn"]
    printed = capsys.readouterr().out
    assert len(calls) == 2 and printed.count("features: cached") == 2
    assert sorted(os.listdir(os.path.join(workdir, "figures"))) == [
        "accuracy_per_stage.png", "retrieval.png"] and "Figures: " in printed
    assert again["stages"] == first["stages"] and first["pool"] == "global"
    with open(os.path.join(workdir, "features", cached[0]), "wb") as f:
        f.write(b"half a file")  # damaged: ignored, extracted again and rewritten
    assert evaluation.evaluate(workdir, ("knn",))["knn"]["stages"] == first["stages"]
    out_text = capsys.readouterr().out
    assert len(calls) == 3 and "features: extracted (test" in out_text
    assert "features: cached (train" in out_text
    assert np.load(os.path.join(workdir, "features", cached[0]))["label"].shape == (128,)
    evaluation.evaluate(workdir, ("knn",), cache=False)
    assert len(calls) == 5 and "features: cached" not in capsys.readouterr().out

    # The export evaluates to the same numbers, its results where asked.
    results = str(tmp_path / "results")
    ex = evaluation.evaluate(exported=out, evals=("knn",), results_dir=results)["knn"]
    assert ex["stages"] == first["stages"] and ex["step"] == first["step"] == c.total_steps
    assert ex["exported"] == os.path.abspath(out)
    with open(os.path.join(results, "eval_knn.json")) as f:
        assert json.load(f)["top1"] == first["top1"]
    with open(os.path.join(results, "results.md")) as f:
        assert "| simclr | tiny_squares | 6 | knn k=20 (offline) | block2 |" in f.read()
    assert len(os.listdir(os.path.join(results, "features"))) == 2
    # VISSL's grid pooling: 2 x 2 x 16 features, named in the record and the table.
    grid = evaluation.evaluate(exported=out, evals=("knn",), pool="avg2x2")["knn"]
    assert grid["pool"] == "avg2x2" and "block2 (avg2x2) 32-d" in capsys.readouterr().out
    with open(os.path.join(out, "eval_knn_avg2x2.json")) as f:
        assert json.load(f)["pool"] == "avg2x2"
    with open(os.path.join(out, "results.md")) as f:
        assert "| knn k=20 (offline) | block2 (avg2x2) |" in f.read()

    # An export into a folder that holds one is refused; --overwrite replaces it whole,
    # results evaluated on the old encoder included; a folder of other files never is.
    with pytest.raises(ValueError, match=r"holds an export already .*pass --overwrite"):
        export.export(workdir, out)
    export.export(workdir, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["encoder", "export.json", "params.npz"]
    with pytest.raises(ValueError, match=r"holds files and no export"):
        export.export(workdir, results, overwrite=True)
    assert "results.md" in os.listdir(results)

    # features_fn says what it takes instead of running on the wrong input.
    fn, variables = export.load(out)
    np.testing.assert_array_equal(fn(variables, images)["block2"], want["block2"])
    for bad, match in ((images[0], r"batch of uint8 images \(B, 28, 28, 1\).*got uint8 "
                                   r"\(28, 28, 1\): add a batch axis"),
                       (images / 255.0, r"uint8 pixels .*got float64 \(16, 28, 28, 1\)"),
                       (np.repeat(images, 3, axis=-1), r"got uint8 \(16, 28, 28, 3\)")):
        with pytest.raises(ValueError, match=match):
            fn(variables, bad)

    # A newer format version is refused with a clear error.
    meta["format_version"] = encoders.FORMAT_VERSION + 1
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="format version 2; this ssl_jax reads versions <= 1"):
        export.load(out)
    with pytest.raises(ValueError, match="not an exported encoder"):
        export.load(str(tmp_path))
