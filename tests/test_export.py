"""Encoder export: a fresh process reproduces the training checkpoint's features exactly."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ssl_jax import evaluate, export, parallel, train
from ssl_jax.data import pipeline
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
                                                              compilation_cache):
    c = tiny_config("simclr", tiny_data)
    workdir, out = str(tmp_path / "w"), str(tmp_path / "exported")
    train.train(c, workdir)
    meta = export.export(workdir, out)
    assert meta["source"]["step"] == c.total_steps and meta["stages"][-1] == "block4"
    assert meta["preprocessing"]["input_shape"] == [28, 28, 1]
    with open(os.path.join(out, "export.json")) as f:
        assert json.load(f)["model"]["widths"] == [4, 8, 8, 16]

    # Features straight from the training checkpoint, in this process.
    mesh = parallel.make_mesh()
    config, encoder, variables, _ = evaluate.load_encoder(workdir, mesh)
    images = pipeline.read_batch(pipeline.open_source("tiny_squares", "test", tiny_data),
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

    # A newer format version is refused with a clear error.
    meta["format_version"] = export.FORMAT_VERSION + 1
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="format version 2; this ssl_jax reads versions <= 1"):
        export.load(out)
    with pytest.raises(FileNotFoundError, match="not an exported encoder"):
        export.load(str(tmp_path))
