"""Video positives in the train loop: the pipeline's pairs (data/pipeline.py with a
video_pairs.PairSampler), the methods' views of a views.pair.Pair, and tiny end-to-end
runs of configs/moco_video.py (train, crash, resume, evaluate), on the small generated
fashion_mnist_videos of tests/test_videos.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import config as cfg_lib
from ssl_jax import evaluation, experiment, parallel, train
from ssl_jax.data import pipeline, sources, video_pairs, video_sampler
from ssl_jax.datasets import videos
from ssl_jax.errors import UserError
from ssl_jax.methods import moco, simclr
from ssl_jax.views import pair
from tests.test_train import train_crash_resume
from tests.test_videos import make

pytestmark = pytest.mark.usefixtures("fast_prng")
B = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return make(tmp_path_factory, "video_train")


def sampler(data_dir, max_gap=2, region=False, seed=0):
    index = video_sampler.video_index(videos.DATASET, "train", data_dir)
    boxes = (np.stack(sources.column(videos.DATASET, "train", data_dir, "box"))
             if region else None)
    return video_pairs.PairSampler(index, max_gap=max_gap, seed=seed, boxes=boxes)


def batches(src, pairs, n, **kw):
    it = pipeline.train_iterator(src, global_batch_size=B, seed=0, pairs=pairs, **kw)
    return it, [next(it) for _ in range(n)]


# ------------------------------------------------------------------- the pipeline


def test_each_query_gets_a_frame_of_its_own_video_within_max_gap(data_dir):
    src = sources.open_source(videos.DATASET, "train", data_dir)
    pairs = sampler(data_dir, max_gap=2)
    index, images = pairs.index, src.image
    epoch = len(src) // B
    _, got = batches(src, pairs, epoch)
    queries = np.concatenate([b["index"] for b in got])
    assert len(set(queries.tolist())) == len(queries)  # each frame once an epoch
    gaps = []
    for b in got:
        q, k = b["index"], b["key_index"]
        np.testing.assert_array_equal(index.video_of[k], index.video_of[q])  # never across
        gap = index.position[k] - index.position[q]
        assert np.all((np.abs(gap) >= 1) & (np.abs(gap) <= 2)), gap
        gaps.append(gap)
        # The images are the records named: the query's frame and its key's frame.
        np.testing.assert_array_equal(b["image"], images[q])
        np.testing.assert_array_equal(b["key_image"], images[k])
    # Both directions and both distances are drawn.
    assert set(np.concatenate(gaps).tolist()) == {-2, -1, 1, 2}


def test_pairs_resume_exactly_and_do_not_depend_on_the_process_count(data_dir):
    src = sources.open_source(videos.DATASET, "train", data_dir)
    pairs = sampler(data_dir, max_gap=3)
    it, whole = batches(src, pairs, 6)
    # Two processes read the same global batches, pairs included, half each.
    halves = [batches(src, pairs, 6, process_index=p, process_count=2)[1] for p in (0, 1)]
    for s in range(6):
        for key in ("index", "key_index", "key_image"):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][s][key], halves[1][s][key]]), whole[s][key])
    # A restored iterator continues with the same pairs.
    it, _ = batches(src, pairs, 3)
    state = it.get_state()
    later = [next(it) for _ in range(3)]
    again, _ = batches(src, pairs, 0)
    again.set_state(state)
    for a, b in zip(later, [next(again) for _ in range(3)]):
        for key in ("index", "key_index", "key_image"):
            np.testing.assert_array_equal(a[key], b[key])
    # grain worker processes draw and read the same pairs (the sampler pickles).
    _, in_workers = batches(src, pairs, 2, worker_count=1)
    for a, b in zip(in_workers, whole):
        for key in ("index", "key_index", "key_image"):
            np.testing.assert_array_equal(a[key], b[key])
    # Another seed draws other keys for the same queries' order.
    other = batches(src, sampler(data_dir, max_gap=3, seed=1), 1)[1][0]
    assert not np.array_equal(other["key_index"], whole[0]["key_index"])


def test_region_batches_are_the_object_cropped_in_both_frames(data_dir):
    src = sources.open_source(videos.DATASET, "train", data_dir)
    pairs = sampler(data_dir, region=True)
    _, (b,) = batches(src, pairs, 1)
    assert b["image"].shape == b["key_image"].shape == (B, 64, 64, 1)  # region_size
    for crops, rows in ((b["image"], b["index"]), (b["key_image"], b["key_index"])):
        frames = src.image[rows].astype(np.float64)
        # The garment fills more of the crop than of its frame, in every example.
        assert np.all(crops.mean(axis=(1, 2, 3)) > 1.5 * frames.mean(axis=(1, 2, 3)))


def test_one_frame_videos_are_left_out_and_short_ones_counted():
    # Videos 7 (one frame), 3 (two frames), 5 (six frames), records interleaved.
    video_id = np.array([5, 3, 5, 7, 5, 5, 3, 5, 5])
    frame = np.array([0, 1, 1, 0, 2, 3, 0, 4, 5])
    index = video_pairs.VideoIndex.from_columns(video_id, frame, name="clips")
    s = video_pairs.PairSampler(index, max_gap=3, seed=0)
    np.testing.assert_array_equal(s.queries, [0, 1, 2, 4, 5, 6, 7, 8])  # not record 3
    drawn = s.draw(s.queries, step=0)
    assert np.all(video_id[drawn["key"]] == video_id[drawn["query"]])
    assert s.describe() == (
        "temporal positives from 3 videos (9 frames), key frame at most max_gap=3 frames "
        "away; 1 videos (2 frames) are shorter than 4 frames and paired at the gaps they "
        "have; 1 one-frame videos have no key and are left out")
    with pytest.raises(UserError, match="every video has one frame"):
        video_pairs.PairSampler(video_pairs.VideoIndex.from_columns([1, 2], [0, 0]), 2, 0)


# ------------------------------------------------------------------ the views


@pytest.mark.parametrize("method", [moco, simclr])
def test_a_pair_makes_each_view_from_its_own_image(method):
    c = cfg_lib.load_file("configs/moco_video.py:runlocal")
    c.aug.crop_size = (24, 24)
    rng = np.random.default_rng(0)
    query = jnp.asarray(rng.integers(30, 256, (4, 64, 64, 1)), jnp.uint8)
    key = jnp.zeros_like(query)
    out = list(method.METHOD.views(jax.random.key(0), pair.Pair(query, key), c).values())
    assert np.ptp(np.asarray(out[0])) > 0.5  # the query frames' view
    assert np.ptp(np.asarray(out[1])) == 0  # the black key frames': one value
    plain = method.METHOD.views(jax.random.key(0), query, c)  # two views of one image
    assert all(np.ptp(np.asarray(v)) > 0.5 for v in plain.values())


# ------------------------------------------------------------------ end to end


def tiny_video_config(data_dir, positives, method="moco_video"):
    arg = f"positives={positives},runlocal" if method == "moco_video" else (
        f"dataset=fashion_mnist_videos,positives={positives},runlocal")
    c = cfg_lib.load_file(f"configs/{method}.py:{arg}")
    c.data_dir = data_dir
    c.batch_size, c.total_steps, c.ckpt_every_steps, c.log_every_steps = B, 6, 3, 3
    c.model.widths, c.model.conv = (4, 8), "xla"
    c.head.hidden, c.head.dim = 16, 8
    c.aug.crop_size = (24, 24)
    c.video.max_gap = 2
    c.eval.batch_size, c.eval.linear.epochs = 64, 5
    if "moco" in c:
        c.moco.queue_size, c.moco.bn_groups = 64, 4
    return c


@pytest.mark.parametrize("positives", ["temporal", "region"])
def test_moco_video_trains_resumes_exactly_and_evaluates(positives, data_dir, tmp_path,
                                                         capsys):
    config = tiny_video_config(data_dir, positives)
    if positives == "temporal":  # the online probes read the query frames of the pairs
        config.online.update(linear=True, every_steps=3, knn_train_examples=64)
    _, resumed, workdir = train_crash_resume(config, tmp_path)
    out = capsys.readouterr().out
    if positives == "temporal":
        assert out.count("online_knn/top1") == 3 and "online" in resumed
    assert f"{positives} positives from 30 videos" in out  # the sampler's report
    assert "0 videos (0 frames) are shorter than 3 frames" in out
    r = evaluation.evaluate(workdir, ("linear",))["linear"]
    n_test = sources.dataset_info(videos.DATASET, data_dir)["num_examples"]["test"]
    assert r["test_examples"] == n_test and r["step"] == 6  # the videos' frames, by garment


def test_simclr_takes_video_positives_too(data_dir, tmp_path):
    config = tiny_video_config(data_dir, "temporal", method="simclr")
    config.total_steps = 2
    state = jax.device_get(train.train(config, str(tmp_path / "w")))
    assert int(state["step"]) == 2


@pytest.mark.parametrize("positives", ["temporal", "region"])
def test_real_frames_of_varying_size_train(positives, tmp_path):
    """got10k_videos (frames of two sizes, decoded onto canvases): temporal pairs of
    canvases, region crops of fixed size from them."""
    from tests import test_video_folders as got

    folder, data_dir = tmp_path / "got10k", tmp_path / "data"
    got.make_layout(folder)
    got.build(data_dir, folder, frame_size=got.SMALL)  # 160x120 and 120x240 frames
    c = cfg_lib.load_file(f"configs/moco_video.py:dataset=got10k_videos,"
                          f"positives={positives},runlocal")
    c.data_dir, c.data.canvas, c.video.region_size = str(data_dir), 240, 48
    c.batch_size, c.total_steps, c.ckpt_every_steps, c.log_every_steps = 8, 2, 2, 1
    c.model = dict(name="convnet", widths=(4, 8), dtype="float32", conv="xla")
    c.head.hidden, c.head.dim = 16, 8
    c.aug.crop_size = (32, 32)
    c.moco.queue_size, c.moco.bn_groups = 16, 2
    workdir = str(tmp_path / "w")
    state = jax.device_get(train.train(c, workdir))
    assert int(state["step"]) == 2


# ------------------------------------------------------------------ bad input


def test_bad_video_settings_are_named(data_dir, tiny_data, tmp_path):
    mesh = parallel.make_mesh()
    spec = experiment.data_spec(tiny_video_config(data_dir, "temporal"))

    def refused(config, match):
        with pytest.raises(UserError, match=match):
            experiment.Experiment(config, spec, mesh)
            video_sampler.pair_sampler(config, spec.image_shape)

    config = tiny_video_config(data_dir, "sideways")
    refused(config, r"positives='sideways' unknown; valid: frame, temporal, region")
    config = cfg_lib.load_file("configs/rotnet.py:dataset=fashion_mnist_videos,runlocal")
    config.data_dir, config.video = data_dir, {"positives": "temporal", "max_gap": 2}
    refused(config, "rotnet does not take positive pairs")
    config = tiny_video_config(data_dir, "temporal")
    config.video.max_gap = 0
    refused(config, r"max_gap 0 must be an integer >= 1 \(config.video.max_gap\)")
    config = tiny_video_config(data_dir, "temporal")
    config.data.skip_corrupt = True
    refused(config, "skip_corrupt cannot be used with video positives")
    config = tiny_video_config(data_dir, "region")
    config.video.region_size = 8
    refused(config, r"region_size=8 must be an integer >= the crop 24")
    # A dataset that is not a video dataset: named, with the command that makes one.
    config = tiny_video_config(data_dir, "temporal")
    config.dataset, config.data_dir = "tiny_squares", tiny_data
    with pytest.raises(UserError, match=r"no 'video_id' feature.*prepare --dataset "
                       "fashion_mnist_videos"):
        train.train(config, str(tmp_path / "w"))


def test_invariance_sets_of_videos_take_one_frame_a_video(data_dir, tmp_path):
    """Frames of one video are one garment: instance sets made from a video dataset must
    hold different videos' garments, so only each video's first frame is drawn."""
    import shutil

    from ssl_jax.datasets import prepare

    own = str(tmp_path / "data")
    shutil.copytree(data_dir, own)
    prepare.prepare("invariance_sets", own, source=videos.DATASET, source_split="train",
                    sets_per_class=1, set_size=3)  # 3 videos a class: every first frame
    src = sources.open_source(videos.DATASET, "train", own)
    frame = sources.column(videos.DATASET, "train", own, "frame_index")
    first = {src.image[i].tobytes(): i for i in np.flatnonzero(frame == 0)}
    sets = sources.open_source(f"{videos.DATASET}_invariance", "instance", own)
    set_id = sources.column(f"{videos.DATASET}_invariance", "instance", own, "set_id")
    for s in np.unique(set_id):
        rows = [first.get(im.tobytes()) for im in sets.image[set_id == s]]
        assert None not in rows  # every image is a video's first frame ...
        assert len(set(rows)) == 3  # ... of three videos
        assert len(set(src.label[rows])) == 1
