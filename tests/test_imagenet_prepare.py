"""ImageNet (the ILSVRC2012 tars) and folders of images prepared as TFDS datasets,
offline, without TensorFlow: ssl_jax/datasets/imagenet.py, image_folder.py, prepare.py."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import shuffle
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as tfds_imagenet

from ssl_jax.data import decode, sources
from ssl_jax.datasets import base, imagenet, prepare
from ssl_jax.errors import UserError
from tests import imagenet_fixture as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TFDS_LABELS = tfds_imagenet.imagenet_common.label_names_file()
JPEG = b"\xff\xd8\xff"


def raw_records(name: str, split: str, data_dir: str) -> list[dict]:
    """Every record of a split as stored: image bytes, file_name bytes, label int."""
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                           decoders={"image": tfds.decode.SkipDecoding()})
    return src.__getitems__(list(range(len(src))))


def as_str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def is_prepared(name: str, data_dir) -> bool:
    return tfds.builder(name, data_dir=str(data_dir)).is_prepared()


def digest(folder) -> dict:
    """{relative path: sha256} of every file under folder."""
    out = {}
    for parent, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(parent, n)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory):
    """The default fixture archive (10 synsets x 30 train, 100 val), prepared once."""
    root = tmp_path_factory.mktemp("ilsvrc")
    info = fx.make_ilsvrc(root / "manual")
    data_dir = str(root / "tfds")
    path, built = prepare.prepare("imagenet2012", data_dir, manual_dir=str(root / "manual"))
    assert built
    return dict(info, data_dir=data_dir, path=path)


# ------------------------------------------------- the same dataset as TFDS's

def test_same_name_version_features_as_tfds_builder(ilsvrc, tmp_path):
    theirs = tfds_imagenet.Builder(data_dir=str(tmp_path)).info  # declared, not prepared
    ours = tfds.builder_from_directory(ilsvrc["path"]).info  # read back from the files
    assert ilsvrc["path"] == os.path.join(ilsvrc["data_dir"], "imagenet2012",
                                          str(tfds_imagenet.Builder.VERSION))
    assert (ours.name, str(ours.version)) == (theirs.name, str(theirs.version))
    assert ours.features.to_json() == theirs.features.to_json()
    labels = open(TFDS_LABELS).read().split()
    assert len(labels) == 1000
    assert ours.features["label"].names == theirs.features["label"].names == labels
    assert ours.features["image"].encoding_format == "jpeg"
    assert tuple(ours.supervised_keys) == tuple(theirs.supervised_keys) == ("image", "label")
    assert (ours.description, ours.citation) == (theirs.description, theirs.citation)
    assert ours.file_format.value == "array_record"
    assert set(ours.splits) == {"train", "validation"}  # no test tar: no test split
    # A reader asking for "imagenet2012" gets TFDS's own (registered) builder
    # class: it must find this dataset prepared, at its version, with its splits.
    registered = tfds.builder("imagenet2012", data_dir=ilsvrc["data_dir"])
    assert type(registered).__module__ == tfds_imagenet.__name__
    assert registered.is_prepared()
    assert registered.info.splits["train"].num_examples == 300
    assert registered.info.splits["validation"].num_examples == 100


def test_records_sorted_with_labels_from_synset_tar_and_labels_file(ilsvrc):
    names = imagenet.label_names()
    for split, truth in (("train", ilsvrc["train"]), ("validation", ilsvrc["val"])):
        records = raw_records("imagenet2012", split, ilsvrc["data_dir"])
        files = [as_str(r["file_name"]) for r in records]
        assert files == sorted(truth)  # written shuffled, read back sorted
        assert [names[int(r["label"])] for r in records] == [truth[f] for f in files]
    train = raw_records("imagenet2012", "train", ilsvrc["data_dir"])
    assert all(names[int(r["label"])] == as_str(r["file_name"]).split("_")[0] for r in train)


def test_cmyk_and_png_become_rgb_jpeg_grey_and_rgb_jpegs_kept(ilsvrc):
    records = {as_str(r["file_name"]): r for s in ("train", "validation")
               for r in raw_records("imagenet2012", s, ilsvrc["data_dir"])}
    assert len(ilsvrc["cmyk"]) == 3 and len(ilsvrc["png"]) == 1 and len(ilsvrc["grey"]) == 4
    for f in ilsvrc["cmyk"] + ilsvrc["png"]:
        data = records[f]["image"]
        written = ilsvrc["data"][f]
        assert written[:3] != JPEG or Image.open(io.BytesIO(written)).mode == "CMYK"
        assert data[:3] == JPEG
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")
            error = np.abs(np.asarray(im, np.float32) - ilsvrc["rgb"][f]).mean()
        assert error < 8, (f, error)  # the same picture, not just any RGB JPEG
    for f in ilsvrc["grey"]:
        assert records[f]["image"] == ilsvrc["data"][f]
        assert Image.open(io.BytesIO(records[f]["image"])).mode == "L"
    plain = sorted(set(records) - set(ilsvrc["cmyk"] + ilsvrc["png"] + ilsvrc["grey"]))
    assert all(records[f]["image"] == ilsvrc["data"][f] for f in plain)


def test_our_reader_reads_it_and_labels_are_learnable(ilsvrc):
    info = sources.dataset_info("imagenet2012", ilsvrc["data_dir"])
    assert info["image_shape"] == (None, None, 3)
    assert info["num_examples"] == {"train": 300, "validation": 100}
    assert info["num_classes"] == 1000 and info["class_names"] == imagenet.label_names()
    feats = {}
    for split in ("train", "validation"):
        src = sources.open_source("imagenet2012", split, ilsvrc["data_dir"], memory_limit=0,
                                  decode=decode.CenterCrop(32))
        assert isinstance(src, sources.CheckedSource)
        files = sorted(ilsvrc["train" if split == "train" else "val"])
        grey = [files.index(f) for f in ilsvrc["grey"] if f in files]
        records = src.__getitems__(grey)
        assert [as_str(r["file_name"]) for r in records] == [files[i] for i in grey]
        assert all(r["image"].shape == (32, 32, 3) for r in records)  # greyscale read as RGB
        batch = sources.read_batch(src, np.arange(len(src)))
        assert batch["image"].shape == (len(src), 32, 32, 3)
        feats[split] = (batch["image"].reshape(len(src), -1, 3).mean(1), batch["label"])
    # Nearest class-mean colour: far above chance (10%) only if labels match images.
    (x, y), (vx, vy) = feats["train"], feats["validation"]
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    pred = classes[np.argmin(((vx[:, None] - means[None]) ** 2).sum(-1), axis=1)]
    assert (pred == vy).mean() > 0.6


# ------------------------------------------------- bad input

def test_missing_tars_say_what_and_where(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / imagenet.VAL_TAR).write_bytes(b"")
    with pytest.raises(UserError) as e:
        prepare.prepare("imagenet2012", str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
    msg = str(e.value)
    assert "not found: ILSVRC2012_img_train.tar." in msg
    assert str(tmp_path / "manual") in msg and "https://image-net.org/download-images" in msg
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in msg
    assert not is_prepared("imagenet2012", tmp_path / "tfds")


def test_synset_not_in_tfds_labels_is_named(tmp_path):
    fx.make_ilsvrc(tmp_path, synsets=2, train_per_class=2, val=2)
    with tarfile.open(tmp_path / imagenet.TRAIN_TAR, "a") as train:
        train.addfile(tarfile.TarInfo("n99999999.tar"), io.BytesIO(b""))
    with pytest.raises(UserError, match="'n99999999.tar', which is not <synset>.tar"):
        prepare.prepare("imagenet2012", str(tmp_path / "tfds"), manual_dir=str(tmp_path))


def test_test_tar_gives_an_unlabelled_test_split(tmp_path):
    info = fx.make_ilsvrc(tmp_path, synsets=2, train_per_class=2, val=2)
    test_files = ["ILSVRC2012_test_00000002.JPEG", "ILSVRC2012_test_00000001.JPEG"]
    with tarfile.open(tmp_path / "ILSVRC2012_img_test_v10102019.tar", "w") as tar:
        for f, data in zip(test_files, list(info["data"].values())):
            member = tarfile.TarInfo(f"test/{f}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    data_dir = str(tmp_path / "tfds")
    prepare.prepare("imagenet2012", data_dir, manual_dir=str(tmp_path))
    records = raw_records("imagenet2012", "test", data_dir)
    assert [as_str(r["file_name"]) for r in records] == sorted(f"test/{f}" for f in test_files)
    assert [int(r["label"]) for r in records] == [-1, -1]


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize("file, damage, member, reason", [
    ("n01440764_3.JPEG", lambda d: b"", "ILSVRC2012_img_train.tar/n01440764.tar/n01440764_3.JPEG",
     "is empty (0 bytes)"),
    ("n01443537_1.JPEG", _truncate, "ILSVRC2012_img_train.tar/n01443537.tar/n01443537_1.JPEG",
     "cannot be decoded (OSError: image file is truncated"),
    ("ILSVRC2012_val_00000004.JPEG", _truncate,
     "ILSVRC2012_img_val.tar/ILSVRC2012_val_00000004.JPEG", "cannot be decoded"),
])
def test_bad_image_is_named_or_skipped(tmp_path, file, damage, member, reason):
    fx.make_ilsvrc(tmp_path / "manual", synsets=2, train_per_class=4, val=6, edit={file: damage})
    data_dir, manual = str(tmp_path / "tfds"), str(tmp_path / "manual")
    with pytest.raises(UserError) as e:
        prepare.prepare("imagenet2012", data_dir, manual_dir=manual)
    assert str(e.value).startswith(f"{member} {reason}")
    assert "download it again" in str(e.value) and "--skip_bad_images" in str(e.value)
    assert not is_prepared("imagenet2012", data_dir)

    builder = prepare.make_builder("imagenet2012", data_dir, manual_dir=manual,
                                   skip_bad_images=True)
    assert prepare.build(builder)[1]
    assert len(builder.bad_images) == 1 and builder.bad_images[0].startswith(member)
    counts = sources.dataset_info("imagenet2012", data_dir)["num_examples"]
    split = "validation" if "val" in file else "train"
    assert counts == {"train": 8, "validation": 6, split: counts[split]}
    assert counts[split] == (6 if split == "validation" else 8) - 1
    files = [as_str(r["file_name"]) for r in raw_records("imagenet2012", split, data_dir)]
    assert file not in files and files == sorted(files)


def test_failure_half_way_keeps_what_was_prepared_and_prepares_nothing(tmp_path, monkeypatch):
    data_dir = tmp_path / "tfds"
    fx.make_image_folder(tmp_path / "folder")
    prepare.prepare("image_folder", str(data_dir), manual_dir=str(tmp_path / "folder"),
                    name="mine")
    before = digest(data_dir / "mine")
    # The last val image is broken: train is written (to TFDS's temporary
    # folder) by the time preparation fails.
    fx.make_ilsvrc(tmp_path / "manual", synsets=2, train_per_class=4, val=6,
                   edit={"ILSVRC2012_val_00000006.JPEG": _truncate})
    seen, fix_image = [], base.fix_image

    def spy(data, quality):  # what the dataset's folder holds while images are checked
        folder = data_dir / "imagenet2012"
        seen.append({d: sorted(os.listdir(folder / d)) for d in os.listdir(folder)})
        return fix_image(data, quality)

    monkeypatch.setattr(base, "fix_image", spy)
    with pytest.raises(UserError, match="ILSVRC2012_val_00000006.JPEG cannot be decoded"):
        prepare.prepare("imagenet2012", str(data_dir), manual_dir=str(tmp_path / "manual"))
    assert all(len(s) == 1 and next(iter(s)).startswith("incomplete.") for s in seen)
    assert any("imagenet2012-train.array_record-00000-of-00001" in next(iter(s.values()))
               for s in seen)  # train was written before the failure, in that folder only
    assert not os.path.exists(data_dir / "imagenet2012")  # and the folder is gone, empty too
    assert not is_prepared("imagenet2012", data_dir)
    with pytest.raises(sources.DatasetNotFoundError):
        sources.open_source("imagenet2012", "train", str(data_dir))
    assert digest(data_dir / "mine") == before
    assert sources.dataset_info("mine", str(data_dir))["num_examples"] == {
        "train": 18, "validation": 6}


# ------------------------------------------------- image_folder

def test_image_folder_labels_from_sorted_folders(tmp_path, monkeypatch):
    # TFDS's shuffling writer needs TensorFlow past 1 GB: it must not be used at all.
    monkeypatch.setattr(shuffle, "Shuffler", None)
    monkeypatch.setattr(base, "SHARD_BYTES", 100_000)  # several shards, still in order
    truth = fx.make_image_folder(tmp_path / "imgs", classes=("zebra", "ant", "moth"))
    data_dir = str(tmp_path / "tfds")
    path, built = prepare.prepare("image_folder", data_dir, manual_dir=str(tmp_path / "imgs"),
                                  name="my_images")
    assert built and path == os.path.join(data_dir, "my_images", "1.0.0")
    info = sources.dataset_info("my_images", data_dir)
    assert info["class_names"] == ["ant", "moth", "zebra"]
    assert info["num_examples"] == {"train": 18, "validation": 6}
    assert info["image_shape"] == (None, None, 3)
    shards = sorted(f for f in os.listdir(path) if "-train." in f)
    assert len(shards) > 2
    assert shards[0] == f"my_images-train.array_record-00000-of-{len(shards):05d}"
    ours = tfds.builder_from_directory(path).info.features
    imagenet_features = base.features(["ant", "moth", "zebra"])
    assert ours.to_json() == imagenet_features.to_json()
    for split, key in (("train", "train"), ("validation", "val")):
        records = raw_records("my_images", split, data_dir)
        files = [as_str(r["file_name"]) for r in records]
        assert files == sorted(truth[key])
        assert [info["class_names"][int(r["label"])] for r in records] == [
            truth[key][f] for f in files]
        assert all(r["image"][:3] == JPEG for r in records)  # PNGs re-encoded
        original = open(tmp_path / "imgs" / key / files[0], "rb").read()
        assert records[0]["image"] == original  # a JPEG kept byte for byte


def test_image_folder_without_split_folders_is_all_train(tmp_path):
    fx.make_image_folder(tmp_path / "imgs", classes=("b", "a"), train_per_class=2, splits=False)
    prepare.prepare("image_folder", str(tmp_path), manual_dir=str(tmp_path / "imgs"), name="flat")
    info = sources.dataset_info("flat", str(tmp_path))
    assert info["num_examples"] == {"train": 4} and info["class_names"] == ["a", "b"]


def _empty_class(root):
    os.makedirs(root / "train" / "newt")


def _val_only_class(root):
    os.makedirs(root / "val" / "newt")
    (root / "val" / "newt" / "x.jpg").write_bytes(fx.encode(np.zeros((8, 8, 3), np.uint8)))


@pytest.mark.parametrize("damage, message", [
    (_empty_class, r"Class folder .*train/newt holds no images"),
    (_val_only_class, r"has class folder\(s\) \['newt'\] that .*train does not"),
])
def test_image_folder_layout_errors(tmp_path, damage, message):
    fx.make_image_folder(tmp_path / "imgs", train_per_class=1, val_per_class=1)
    damage(tmp_path / "imgs")
    with pytest.raises(UserError, match=message):
        prepare.prepare("image_folder", str(tmp_path / "tfds"),
                        manual_dir=str(tmp_path / "imgs"), name="x")
    assert not os.path.exists(tmp_path / "tfds" / "x")


@pytest.mark.parametrize("dataset, name, message", [
    ("image_folder", "My-Images", "not a valid TFDS dataset name"),
    ("image_folder", "2images", "not a valid TFDS dataset name"),
    ("image_folder", "mnist", "a dataset TFDS itself defines"),
    ("image_folder", None, "needs --name NAME"),
    ("imagenet2012", "mine", "--name is for image_folder, not imagenet2012"),
    ("fashion_mnist", None, "--skip_bad_images is for imagenet2012 and image_folder"),
])
def test_option_errors(tmp_path, dataset, name, message):
    with pytest.raises(UserError, match=message):
        prepare.prepare(dataset, str(tmp_path), manual_dir=str(tmp_path), name=name,
                        skip_bad_images=dataset == "fashion_mnist")


# ------------------------------------------------- the command line

def test_cli_prepares_and_says_where(tmp_path):
    fx.make_ilsvrc(tmp_path / "manual", synsets=2, train_per_class=3, val=4)
    data_dir = str(tmp_path / "tfds")
    cmd = [sys.executable, "-m", "ssl_jax.prepare", "--dataset", "imagenet2012",
           "--manual_dir", str(tmp_path / "manual"), "--data_dir", data_dir]
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    version = str(tfds_imagenet.Builder.VERSION)
    assert f"Prepared imagenet2012 in {data_dir}/imagenet2012/{version} in " in out.stdout
    assert "(train: 6, validation: 4)." in out.stdout
    assert prepare.prepare("imagenet2012", data_dir, manual_dir=str(tmp_path / "manual")) == (
        f"{data_dir}/imagenet2012/{version}", False)
    # A mistake the user can fix: one line, exit 2, no traceback.
    cmd[cmd.index("--manual_dir") + 1] = str(tmp_path / "nowhere")
    cmd[-1] = str(tmp_path / "tfds2")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ImageNet needs")
    assert "Traceback" not in out.stderr
