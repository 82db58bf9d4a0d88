"""evaluate's arguments and its errors: each caught before any slow loading."""
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from ssl_jax import encoders, errors, evaluation
from ssl_jax import config as cfg_lib
from ssl_jax.datasets import arrays
from tests.test_train import tiny_config


def build_without_labels(data_dir: str, name: str, label: bool) -> None:
    """A 2-split TFDS dataset of 4 (8, 8, 1) images with no "label" feature, or
    (label=True) a plain integer one that does not say how many classes there are."""
    features = {"image": tfds.features.Image(shape=(8, 8, 1))}
    if label:
        features["label"] = tfds.features.Scalar(np.int64)
    dataset_name = name

    class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version("1.0.0")
        code_path = epath.Path(arrays.__file__)  # as arrays.build_from_arrays

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features),
                disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(), "test": self._generate_examples()}

        def _generate_examples(self):
            for i in range(4):
                record = {"image": arrays.encode_png(np.full((8, 8, 1), i, np.uint8))}
                yield i, dict(record, label=i) if label else record

    Builder(data_dir=data_dir, file_format="array_record").download_and_prepare()


def write_export(out: str, **meta) -> str:
    """An export.json alone (errors about the data come before the weights are read)."""
    os.makedirs(out, exist_ok=True)
    meta = {"format_version": 1, "model": {"name": "convnet", "widths": [4, 8]},
            "preprocessing": {"view": {"crop_size": [8, 8], "mean": [0.0], "std": [1.0]}},
            "stages": ["block1", "block2"], "source": {"step": 3, "method": "simclr"}, **meta}
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(meta, f)
    return out


def test_exactly_one_of_workdir_or_exported(tmp_path):
    for kwargs in ({}, {"workdir": "w", "exported": "e"}):
        with pytest.raises(ValueError, match="exactly one of --workdir .* or --exported"):
            evaluation.evaluate(**kwargs)
    with pytest.raises(ValueError, match="--data_dir, --test_split go with --exported"):
        evaluation.evaluate(str(tmp_path), data_dir="d", test_split="val")
    with pytest.raises(ValueError, match="--random_init needs --workdir"):
        evaluation.evaluate(exported=str(tmp_path), random_init=True)
    with pytest.raises(ValueError, match="pool='max2x2'"):
        evaluation.evaluate(str(tmp_path), pool="max2x2")
    with pytest.raises(errors.UserError, match="not an exported encoder"):
        evaluation.evaluate(exported=str(tmp_path))
    with pytest.raises(errors.UserError, match="not a training workdir"):
        evaluation.evaluate(str(tmp_path))


def test_workdir_without_a_checkpoint_says_train_first(tiny_data, tmp_path):
    workdir = str(tmp_path / "w")
    os.makedirs(workdir)
    cfg_lib.save(tiny_config("simclr", tiny_data), workdir)
    with pytest.raises(errors.UserError, match=r"No checkpoint in .*w/checkpoints: .*w has a "
                       r"config.json but no trained weights yet. Train first \(`python -m "
                       r"ssl_jax.train --config configs/simclr.py --workdir"):
        evaluation.evaluate(workdir, ("knn",))
    # A run started by `python -m ssl_jax.train` left its command: the hint is that one.
    command = "python -m ssl_jax.train --config configs/simclr.py:runlocal --workdir w"
    with open(os.path.join(workdir, "command.txt"), "w") as f:
        f.write(command + "\n")
    with pytest.raises(errors.UserError, match=rf"Train first \(`{command}`, the run's own "
                       r"command, resumes it\)"):
        evaluation.evaluate(workdir, ("knn",))


@pytest.mark.parametrize("label", [False, True], ids=["no label", "no class count"])
def test_dataset_without_labels_is_refused_by_name(tmp_path, label):
    data_dir = str(tmp_path / "data")
    build_without_labels(data_dir, "unlabelled", label)
    out = write_export(str(tmp_path / "exported"),
                       data={"dataset": "unlabelled", "data_dir": data_dir})
    with pytest.raises(ValueError, match=f"Dataset 'unlabelled' in {data_dir} has no labels .* "
                       r"the evaluators \['knn'\] need labelled"):
        evaluation.evaluate(exported=out, evals=("knn",))


def test_old_exports_fall_back_to_arguments_and_defaults():
    meta = json.loads(json.dumps({"model": {"name": "convnet", "widths": [4, 8]},
                                  "source": {"step": 3, "method": "simclr",
                                             "dataset": "fashion_mnist"}}))
    c = encoders.eval_config("out", meta)  # format 1 before "data" and "eval"
    assert (c.dataset, c.data_dir, c.train_split, c.eval.test_split) == (
        "fashion_mnist", None, "train", "test")
    assert c.seed == 0 and c.eval.batch_size == 512 and c.model.widths == (4, 8)
    c = encoders.eval_config("out", dict(meta, data={"dataset": "a", "data_dir": "/d",
                                                          "train_split": "t"},
                                              eval={"test_split": "v", "seed": 7,
                                                    "knn": {"k": 5}}),
                                  data_dir="/mine", test_split="val")
    assert (c.dataset, c.data_dir, c.train_split, c.eval.test_split) == ("a", "/mine", "t", "val")
    assert c.seed == 7 and c.eval.knn.k == 5
    del meta["source"]["dataset"]
    with pytest.raises(ValueError, match="names no dataset: pass --dataset"):
        encoders.eval_config("out", meta)
    assert encoders.eval_config("out", meta, dataset="cifar10").dataset == "cifar10"
