"""Data layer: the Fashion-MNIST builder, the prepare CLI and the grain pipelines."""
from __future__ import annotations

import gzip
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ssl_jax import errors
from ssl_jax.data import pipeline, sources
from ssl_jax.datasets import arrays, fashion_mnist, prepare
from tests.conftest import FASHION_MNIST_SOURCE, write_idx
from tests.test_cifar import NOISE, run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------- the real Fashion-MNIST

def test_real_fashion_mnist_info(fashion_mnist_dir):
    info = sources.dataset_info("fashion_mnist", fashion_mnist_dir)
    assert info["num_examples"] == {"train": 60000, "test": 10000}
    assert info["image_shape"] == (28, 28, 1)
    assert info["num_classes"] == 10
    assert info["class_names"][0] == "T-shirt/top" and info["class_names"][9] == "Ankle boot"


def test_real_train_records_match_idx_files(fashion_mnist_dir):
    images, labels = fashion_mnist.read_split(FASHION_MNIST_SOURCE, "train")
    src = sources.open_source("fashion_mnist", "train", fashion_mnist_dir, memory_limit=0)
    assert len(src) == 60000
    ix = [0, 1, 2, 777, 31415, 59999]
    batch = sources.read_batch(src, ix)
    assert batch["image"].shape == (6, 28, 28, 1) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["image"], images[ix])
    np.testing.assert_array_equal(batch["label"], labels[ix])
    assert list(labels[:3]) == [9, 0, 0]  # the published first labels: boot, top, top


def test_real_test_split_in_memory_equals_idx_files(fashion_mnist_dir):
    images, labels = fashion_mnist.read_split(FASHION_MNIST_SOURCE, "test")
    src = sources.open_source("fashion_mnist", "test", fashion_mnist_dir)
    assert isinstance(src, sources.ArraySource)
    assert src.image.shape == (10000, 28, 28, 1) and src.image.dtype == np.uint8
    assert src.label.dtype == np.int32
    np.testing.assert_array_equal(src.image, images)  # every pixel of every image
    np.testing.assert_array_equal(src.label, labels)
    assert np.bincount(src.label).tolist() == [1000] * 10


# ------------------------------------------------- builder on generated IDX files

def test_builder_on_generated_idx_files(fake_idx_dir, tmp_path):
    source_dir, data = fake_idx_dir
    data_dir = str(tmp_path / "tfds")
    path, built = prepare.prepare("fashion_mnist", data_dir, source_dir)
    assert built and path == os.path.join(data_dir, "fashion_mnist", "3.0.1")
    assert prepare.prepare("fashion_mnist", data_dir, source_dir) == (path, False)
    assert sources.dataset_info("fashion_mnist", data_dir)["num_examples"] == {
        "train": 40, "test": 12}
    for split, (images, labels) in data.items():
        for memory_limit in (0, sources.MEMORY_LIMIT):
            src = sources.open_source("fashion_mnist", split, data_dir, memory_limit=memory_limit)
            batch = sources.read_batch(src, np.arange(len(labels)))
            np.testing.assert_array_equal(batch["image"], images[..., None])
            np.testing.assert_array_equal(batch["label"], labels)


def test_missing_source_files_name_the_debian_package(tmp_path):
    with pytest.raises(errors.UserError, match="apt-get install dataset-fashion-mnist` or pass "
                       "the folder that holds the IDX files as --manual_dir"):
        prepare.prepare("fashion_mnist", str(tmp_path / "tfds"),
                        manual_dir=str(tmp_path / "nowhere"))
    assert not os.path.exists(tmp_path / "tfds")  # not even an empty fashion_mnist/, downloads/


_IMAGES, _LABELS = fashion_mnist.FILES["train"]


def _truncate_gzip(d):
    raw = open(os.path.join(d, _IMAGES), "rb").read()
    open(os.path.join(d, _IMAGES), "wb").write(raw[: len(raw) // 2])


def _not_gzip(d):
    open(os.path.join(d, _IMAGES), "wb").write(b"\x00\x00\x08\x03" + bytes(100))


def _bad_magic(d):
    write_idx(os.path.join(d, _IMAGES), np.zeros((40, 28 * 28), np.uint8))  # 2-d, not 3-d


def _short_data(d):
    with gzip.open(os.path.join(d, _IMAGES), "rb") as f:
        raw = f.read()
    with gzip.open(os.path.join(d, _IMAGES), "wb") as f:
        f.write(raw[:-100])


def _extra_label(d):
    write_idx(os.path.join(d, _LABELS), np.zeros(41, np.uint8))


@pytest.mark.parametrize("corrupt, message", [
    (_truncate_gzip, "not a readable gzip file"),
    (_not_gzip, "not a readable gzip file"),
    (_bad_magic, "IDX header"),
    (_short_data, "truncated or corrupt"),
    (_extra_label, "do not make a Fashion-MNIST split"),
])
def test_corrupt_idx_file_raises_clear_error(fake_idx_dir, tmp_path, corrupt, message):
    source_dir, _ = fake_idx_dir
    corrupt(source_dir)
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(fashion_mnist.IdxError, match=message):
        prepare.prepare("fashion_mnist", data_dir, source_dir)
    with pytest.raises(sources.DatasetNotFoundError):  # nothing half-written is visible
        sources.open_source("fashion_mnist", "train", data_dir)


def test_prepare_cli_builds_once(fake_idx_dir, tmp_path):
    source_dir, _ = fake_idx_dir
    data_dir = str(tmp_path / "tfds")
    out = run_command(["-m", "ssl_jax.prepare", "--dataset", "fashion_mnist", "--data_dir",
                       data_dir, "--source_dir", source_dir])
    assert out.returncode == 0, out.stderr
    assert f"Prepared fashion_mnist in {data_dir}/fashion_mnist/3.0.1" in out.stdout
    assert prepare.prepare("fashion_mnist", data_dir, source_dir)[1] is False
    # TFDS's "Downloading and preparing dataset Unknown size ...", its warning about the
    # version folder, and its nested progress bars redrawn into a file stay off.
    assert not [n for n in NOISE if n in out.stdout + out.stderr], out.stdout + out.stderr


# ------------------------------------------------- missing datasets

@pytest.mark.parametrize("name, cmd", [
    ("fashion_mnist", "python -m ssl_jax.prepare --dataset fashion_mnist --data_dir {}"),
    ("no_such_dataset", "python -m ssl_jax.prepare --dataset image_folder --data_dir {} "
                        "--name no_such_dataset --manual_dir DIR"),
])
def test_missing_dataset_names_the_prepare_command(tmp_path, name, cmd):
    cmd = cmd.format(tmp_path)
    with pytest.raises(sources.DatasetNotFoundError, match=cmd.replace(".", r"\.")):
        sources.open_source(name, "train", str(tmp_path))
    with pytest.raises(ValueError, match="ssl_jax.prepare"):
        sources.dataset_info(name, str(tmp_path))


# ------------------------------------------------- train_iterator

@pytest.fixture(params=["memory", "lazy"])
def tiny_train(request, tiny_dataset):
    data_dir, data = tiny_dataset
    limit = sources.MEMORY_LIMIT if request.param == "memory" else 0
    src = sources.open_source("tiny_rgb", "train", data_dir, memory_limit=limit)
    assert isinstance(src, sources.ArraySource) == (request.param == "memory")
    return src, data["train"]


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_train_batches_have_right_content(tiny_train):
    src, (images, labels) = tiny_train
    it = pipeline.train_iterator(src, global_batch_size=16, seed=0)
    for batch in _take(it, 8):  # crosses into the second epoch (6 batches each)
        assert batch["image"].shape == (16, 6, 6, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
        np.testing.assert_array_equal(batch["image"], images[batch["index"]])
        np.testing.assert_array_equal(batch["label"], labels[batch["index"]])


def test_process_shards_are_disjoint_and_cover_the_epoch(tiny_train):
    src, _ = tiny_train
    seen = []
    for p in range(2):
        it = pipeline.train_iterator(src, global_batch_size=16, seed=5,
                                     process_index=p, process_count=2)
        idx = np.concatenate([b["index"] for b in _take(it, 6)])  # one epoch of 48
        assert all(b["image"].shape[0] == 8 for b in _take(it, 1))
        assert len(set(idx)) == 48
        seen.append(set(idx))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(96))


def test_global_batches_do_not_depend_on_the_process_count(tiny_train):
    """Process p's rows are slice p of the one-process batch: a 2-host run trains on
    exactly the batches of a 1-host run with the same global batch."""
    src, _ = tiny_train
    one = _take(pipeline.train_iterator(src, global_batch_size=16, seed=3), 8)
    two = [_take(pipeline.train_iterator(src, global_batch_size=16, seed=3, process_index=p,
                                         process_count=2), 8) for p in range(2)]
    for step, batch in enumerate(one):
        np.testing.assert_array_equal(
            batch["index"], np.concatenate([two[0][step]["index"], two[1][step]["index"]]))


def test_epochs_are_reshuffled_and_seeded():
    src = sources.ArraySource(np.zeros((100, 2, 2, 1), np.uint8), np.zeros(100, np.int32))
    def epochs(seed, k=4):
        it = pipeline.train_iterator(src, global_batch_size=10, seed=seed)
        return [np.concatenate([b["index"] for b in _take(it, 10)]) for _ in range(k)]
    e = epochs(3)
    for a in e:
        assert sorted(a) == list(range(100))  # every epoch is a permutation
    assert not any(np.array_equal(e[i], e[j]) for i in range(4) for j in range(i))
    assert not np.array_equal(e[0], np.arange(100))
    for a, b in zip(e, epochs(3)):
        np.testing.assert_array_equal(a, b)  # same seed, same order
    assert not np.array_equal(e[0], epochs(4, 1)[0])


def test_epoch_remainder_is_dropped_per_epoch():
    src = sources.ArraySource(np.zeros((25, 2, 2, 1), np.uint8), np.zeros(25, np.int32))
    it = pipeline.train_iterator(src, global_batch_size=10, seed=0)
    for _ in range(3):  # 2 batches per epoch: no batch mixes two epochs
        idx = np.concatenate([b["index"] for b in _take(it, 2)])
        assert len(set(idx)) == 20


def test_bad_batch_sizes_raise():
    src = sources.ArraySource(np.zeros((25, 2, 2, 1), np.uint8), np.zeros(25, np.int32))
    with pytest.raises(ValueError, match="multiple of the process count"):
        pipeline.train_iterator(src, global_batch_size=9, seed=0, process_count=2)
    with pytest.raises(ValueError, match="cannot fill a batch"):
        pipeline.train_iterator(src, global_batch_size=32, seed=0)
    with pytest.raises(ValueError, match="multiple of the process count"):
        next(pipeline.eval_batches(src, 9, 0, 2))


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_iterator_state_round_trips_through_orbax(tiny_train, tmp_path):
    src, _ = tiny_train
    make = lambda: pipeline.train_iterator(src, global_batch_size=16, seed=7)
    it = make()
    _take(it, 5)
    mgr = ocp.CheckpointManager(tmp_path / "ckpt")
    mgr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    expected = _take(it, 4)  # crosses the epoch boundary after batch 6
    mgr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))
    _assert_same(_take(it, 4), expected)
    fresh = make()
    mgr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same(_take(fresh, 4), expected)
    mgr.close()


def test_worker_processes_give_the_same_batches_and_restore(tiny_dataset, tmp_path):
    data_dir, _ = tiny_dataset
    src = sources.open_source("tiny_rgb", "train", data_dir, memory_limit=0)
    make = lambda w: pipeline.train_iterator(src, global_batch_size=16, seed=2, worker_count=w)
    expected = _take(make(0), 9)
    it = make(2)
    _assert_same(_take(it, 4), expected[:4])
    state = it.get_state()
    _assert_same(_take(it, 5), expected[4:])
    fresh = make(2)
    fresh.set_state(state)
    _assert_same(_take(fresh, 5), expected[4:])
    # The state is the step: a checkpoint restores into any worker count
    # (config.data.worker_count "auto" differs between machines).
    assert state == {"step": 4}
    for workers in (0, 1):
        other = make(workers)
        other.set_state(state)
        _assert_same(_take(other, 5), expected[4:])
    # States that grain's own iterators wrote (checkpoints of earlier versions).
    for old in ({"next_index": 4}, {"next_index_in_cycle": 0, "iterators_in_use_states": [
            {"next_index": 2}, {"next_index": 2}], "exhausted": [0, 0]}):
        other = make(0)
        other.set_state(old)
        _assert_same(_take(other, 2), expected[4:6])
    with pytest.raises(errors.UserError, match="not one this version reads"):
        make(0).set_state({"cursor": 4})


def test_worker_count_auto_reads_in_process_where_workers_cannot_help(tiny_dataset, monkeypatch):
    """"auto": no workers for an in-memory split or on <= 2 cores; else one per core
    of this process's affinity but one, at most 32. A bad setting names itself."""
    data_dir, _ = tiny_dataset
    on_disk = sources.open_source("tiny_rgb", "train", data_dir, memory_limit=0)
    in_memory = sources.open_source("tiny_rgb", "train", data_dir)
    assert isinstance(in_memory, sources.ArraySource)
    for cores, workers in ((1, 0), (2, 0), (3, 2), (16, 15), (240, 32)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _, n=cores: set(range(n)))
        assert pipeline.worker_count("auto", on_disk) == workers, cores
        assert pipeline.worker_count("auto", in_memory) == 0
    assert pipeline.worker_count("4", on_disk) == pipeline.worker_count(4, in_memory) == 4
    for bad in (-1, "many", None):
        with pytest.raises(errors.UserError, match="config.data.worker_count="):
            pipeline.worker_count(bad, on_disk)


def test_a_resume_may_read_with_other_worker_processes():
    """The workers change how batches are read, not which: no 'different config'."""
    from ssl_jax import config as cfg_lib
    config = cfg_lib.load_file("configs/simclr.py:dataset=fashion_mnist")
    stored = config.to_dict()
    stored["data"]["worker_count"] = 0
    cfg_lib.check_same_config(config, stored)
    stored["optimizer"]["lr"] = 123.0
    with pytest.raises(errors.UserError, match="optimizer.lr"):
        cfg_lib.check_same_config(config, stored)


# ------------------------------------------------- eval_batches

@pytest.mark.parametrize("num_examples", [None, 30])
def test_eval_batches_cover_every_example_once(tiny_dataset, num_examples):
    data_dir, data = tiny_dataset
    images, labels = data["test"]  # 37 examples
    n = 37 if num_examples is None else num_examples
    src = sources.open_source("tiny_rgb", "test", data_dir, memory_limit=0)
    per_process = [list(pipeline.eval_batches(src, 8, p, 2, num_examples=num_examples))
                   for p in range(2)]
    assert len(per_process[0]) == len(per_process[1]) == -(-n // 8)
    idx = []
    for step in zip(*per_process):  # a global batch: process 0's rows, then process 1's
        for b in step:
            assert b["image"].shape == (4, 6, 6, 3) and b["mask"].dtype == bool
            m = b["mask"]
            np.testing.assert_array_equal(b["image"][m], images[b["index"][m]])
            np.testing.assert_array_equal(b["label"][m], labels[b["index"][m]])
            assert (b["index"][~m] == -1).all() and (b["image"][~m] == 0).all()
            idx.append(b["index"][m])
    np.testing.assert_array_equal(np.concatenate(idx), np.arange(n))  # in order, once


def test_eval_batches_single_process_in_memory(tiny_dataset):
    data_dir, data = tiny_dataset
    src = sources.open_source("tiny_rgb", "test", data_dir)
    batches = list(pipeline.eval_batches(src, 16))
    assert [int(b["mask"].sum()) for b in batches] == [16, 16, 5]
    np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in batches]),
                                  data["test"][1])


# ------------------------------------------------- sizes and channels

def test_decode_policies_keep_channels_and_one_size_datasets_ignore_them(tiny_dataset):
    from ssl_jax.data import decode

    data_dir, data = tiny_dataset
    for limit in (0, sources.MEMORY_LIMIT):
        src = sources.open_source("tiny_rgb", "train", data_dir, memory_limit=limit,
                                  decode=decode.ToCanvas(64))
        batch = next(pipeline.train_iterator(src, global_batch_size=8, seed=0))
        assert batch["image"].shape == (8, 6, 6, 3) and "image_hw" not in batch
    png = arrays.encode_png(np.full((10, 20, 1), 7, np.uint8))
    pixels, hw = decode.ToCanvas(24)(png, 1)
    assert pixels.shape == (24, 24, 1) and hw == (10, 20)
    assert (pixels[:10, :20] == 7).all() and not pixels[10:].any()
    crop, _ = decode.CenterCrop(5)(png, 1)
    assert crop.shape == (5, 5, 1) and (crop == 7).all()
    rgb, _ = decode.CenterCrop(5)(png, 3)  # a grey image read as RGB: 3 equal channels
    assert rgb.shape == (5, 5, 3) and (rgb == 7).all()


def test_build_from_arrays_round_trips_grayscale(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, 3, 4, 1), dtype=np.uint8)
    labels = [0, 1, 1, 0, 1]
    path = arrays.build_from_arrays("tiny_gray", str(tmp_path), {"train": (images, labels)},
                                    class_names=["a", "b"])
    assert path.endswith("tiny_gray/1.0.0")
    info = sources.dataset_info("tiny_gray", str(tmp_path))
    assert info["image_shape"] == (3, 4, 1) and info["class_names"] == ["a", "b"]
    src = sources.open_source("tiny_gray", "train", str(tmp_path))
    np.testing.assert_array_equal(src.image, images)
    np.testing.assert_array_equal(src.label, labels)


def test_a_dataset_of_another_version_names_both_versions_and_the_command(tmp_path):
    # What a folder from another TFDS release looks like: fashion_mnist/2.0.0 only.
    (tmp_path / "fashion_mnist" / "2.0.0").mkdir(parents=True)
    with pytest.raises(sources.DatasetNotFoundError,
                       match=r"'fashion_mnist' version 3\.0\.1 is not prepared .*found version\(s\) "
                             r"\['2\.0\.0'\].*python -m ssl_jax\.prepare --dataset "
                             r"fashion_mnist"):
        sources.open_source("fashion_mnist", "train", str(tmp_path))
