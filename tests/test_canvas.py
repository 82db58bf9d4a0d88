"""Images of varying size: decoded on the host onto a canvas (data/decode.py), every
view cropped on device from the valid region (views/canvas.py) -- the same crops as
from the image alone, with the papers' crop distribution."""
import io
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ssl_jax.data import decode
from ssl_jax.views import augment, canvas, ops
from ssl_jax.views import jigsaw as puzzle

KEY = jax.random.key(0)


def _jpeg(w, h, seed=0, mode="RGB", quality=90) -> bytes:
    """A smooth (w, h) test picture (gradients + a few blobs), JPEG-encoded."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    chans = [np.sin(6 * x + 3 * c + rng.uniform(0, 3)) + np.cos(5 * y * (c + 1)) for c in range(3)]
    img = (np.stack(chans, -1) * 60 + 128).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _on_canvas(images, size):
    """[(h, w, C) uint8] -> Canvas of (B, size, size, C) pixels, (B, 2) hw."""
    pix = np.zeros((len(images), size, size, images[0].shape[-1]), np.uint8)
    for i, im in enumerate(images):
        pix[i, :im.shape[0], :im.shape[1]] = im
    return canvas.Canvas(jnp.asarray(pix), jnp.asarray([im.shape[:2] for im in images], jnp.int32))


def _images(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


SHAPES = [(30, 40), (40, 22), (40, 40)]


def _noisy(c: canvas.Canvas) -> canvas.Canvas:
    """The same canvases with the padding outside every image set to 255."""
    size = c.pixels.shape[1]
    inside = ((np.arange(size)[None, :, None] < np.asarray(c.hw)[:, :1, None])
              & (np.arange(size)[None, None, :] < np.asarray(c.hw)[:, 1:, None]))
    return canvas.Canvas(jnp.where(inside[..., None], c.pixels, 255), c.hw)


def test_views_of_a_canvas_equal_views_of_the_images_alone():
    """The same key gives the same crop (and colour) from the canvas as from the
    image itself; the padding around it is never read (views, centre crops, tiles)."""
    images = _images(SHAPES)
    # The crop and flip: what a canvas changes (colour ops act on the crop after it).
    cfg = augment.simclr_view_config(crop_size=(16, 16), blur_p=0.0, jitter_p=0.0,
                                     grayscale_p=0.0)
    keys = jax.random.split(KEY, len(images))
    batch = _on_canvas(images, 48)
    got = jax.jit(lambda x: augment.batch_views(KEY, x, cfg))(batch)
    one = jax.jit(lambda k, x: augment.view(k, x, cfg))  # compiles once per image shape
    for i, im in enumerate(images):
        np.testing.assert_allclose(got[i], one(keys[i], jnp.asarray(im)), atol=2e-5)
    center = augment.eval_view_config(crop_size=(12, 12), crop_frac=0.875)
    f = jax.jit(lambda x: augment.batch_views(KEY, x, center))
    np.testing.assert_array_equal(f(_noisy(batch)), f(batch))
    tiles_cfg = puzzle.tile_view_config(crop_size=(27, 27), tile_side=8, tile_size=8,
                                        jitter_p=0.0, grayscale_p=0.0)
    g = jax.jit(lambda x: puzzle.batch_jigsaw(KEY, x, tiles_cfg, puzzle.permutations(4))[0])
    tiles = g(batch)
    assert tiles.shape == (3, 9, 8, 8, 3)
    np.testing.assert_array_equal(g(_noisy(batch)), tiles)


def test_center_crop_of_a_canvas_keeps_the_aspect_ratio():
    """The eval crop of a canvas image: the central square of crop_frac of its
    shorter side (resize the shorter side, centre crop), not the stretched image."""
    h, w = 20, 40
    im = np.zeros((h, w, 1), np.float32)
    im[:, 10:30] = 1.0  # the central 20 x 20 square is white, the sides black
    pix = jnp.zeros((48, 48, 1)).at[:h, :w].set(im)
    out = ops.center_crop_resize(pix, (10, 10), 1.0, hw=(jnp.float32(h), jnp.float32(w)))
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def reference_boxes(rng, H, W, n, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, in numpy: the definition.
    -> (n, 2) float64 (h, w). benchmarks/crop_distribution.py uses it too."""
    out = []
    for _ in range(n):
        for _ in range(10):
            area = H * W * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= W and 0 < h <= H:
                out.append((h, w))
                break
        else:
            in_ratio = W / H
            if in_ratio < ratio[0]:
                out.append((round(W / ratio[0]), W))
            elif in_ratio > ratio[1]:
                out.append((H, round(H * ratio[1])))
            else:
                out.append((H, W))
    return np.array(out, np.float64)


@pytest.mark.parametrize("H,W", [(375, 500), (600, 150)])
def test_crop_distribution_on_a_canvas_is_torchvisions(H, W):
    """10,000 boxes drawn on device inside a canvas image's valid region against
    torchvision's definition drawn on the image: area fraction and aspect ratio
    have the same distribution (quantiles within sampling error)."""
    n = 10_000
    hw = (jnp.float32(H), jnp.float32(W))
    boxes = jax.jit(jax.vmap(lambda k: jnp.stack(ops._sample_box(k, *hw, (0.08, 1.0),
                                                                 (3 / 4, 4 / 3)))))(
        jax.random.split(KEY, n))
    boxes = np.asarray(boxes, np.float64)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= H).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= W).all()
    ref = reference_boxes(np.random.default_rng(0), H, W, n)
    ours = {"area": boxes[:, 2] * boxes[:, 3] / (H * W), "aspect": boxes[:, 3] / boxes[:, 2]}
    theirs = {"area": ref[:, 0] * ref[:, 1] / (H * W), "aspect": ref[:, 1] / ref[:, 0]}
    q = np.linspace(0.05, 0.95, 19)
    for k in ours:
        a, b = np.quantile(ours[k], q), np.quantile(theirs[k], q)
        # Sampling error of a quantile at n = 10,000: ~1-2% of the spread here.
        np.testing.assert_allclose(a, b, atol=0.03 * (b[-1] - b[0]), err_msg=k)


def test_to_canvas_keeps_small_images_whole_and_shrinks_large_ones():
    small = decode.ToCanvas(64)(_jpeg(50, 30), 3)
    assert small[0].shape == (64, 64, 3) and small[1] == (30, 50)
    assert not small[0][30:].any() and not small[0][:, 50:].any()  # zero outside
    ref = np.asarray(Image.open(io.BytesIO(_jpeg(50, 30))).convert("RGB"))
    np.testing.assert_array_equal(small[0][:30, :50], ref)  # untouched: a plain decode

    big = _jpeg(600, 300, seed=1)
    pix, (h, w) = decode.ToCanvas(128)(big, 3)
    assert (h, w) == (64, 128)  # aspect ratio kept, longer side = canvas
    full = Image.open(io.BytesIO(big)).convert("RGB").resize((128, 64), Image.BILINEAR)
    # DCT-scaled decoding, then a resize: close to a full decode and resize.
    assert np.abs(pix[:h, :w].astype(float) - np.asarray(full, float)).mean() < 4.0

    grey = decode.ToCanvas(64)(_jpeg(40, 20, mode="L"), 3)
    assert grey[0].shape == (64, 64, 3) and grey[1] == (20, 40)
    assert np.array_equal(grey[0][..., 0], grey[0][..., 2])  # greyscale -> RGB
    cmyk = decode.ToCanvas(64)(_jpeg(40, 20, mode="CMYK"), 3)
    assert cmyk[1] == (20, 40) and cmyk[0][:20, :40].mean() > 20


def test_a_batch_decodes_into_one_buffer_as_each_image_alone():
    """decode_batch (the pipeline's path) equals the images decoded one at a time, zero
    outside each image although the buffer starts uninitialised."""
    datas = [_jpeg(50, 30), _jpeg(600, 300, seed=1), _jpeg(40, 20, mode="L"), _jpeg(64, 64)]
    for _ in range(3):  # fresh np.empty buffers may reuse the earlier ones' memory
        batch, hw = decode.ToCanvas(64).decode_batch(datas, 3)
        assert batch.shape == (4, 64, 64, 3) and hw.dtype == np.int32
        for data, pixels, size in zip(datas, batch, hw):
            alone, (h, w) = decode.ToCanvas(64)(data, 3)
            assert tuple(size) == (h, w)
            np.testing.assert_array_equal(pixels, alone)
            assert not pixels[h:].any() and not pixels[:, w:].any()
    crops, none = decode.CenterCrop(16).decode_batch(datas, 1)
    assert none is None and crops.shape == (4, 16, 16, 1)
    for data, crop in zip(datas, crops):
        np.testing.assert_array_equal(crop, decode.CenterCrop(16)(data, 1)[0])


def test_center_crop_is_resize_256_then_crop_224():
    """CenterCrop(224, 0.875) equals the papers' protocol done the long way: the
    shorter side resized to 256, the central 224 x 224 cut out."""
    data = _jpeg(500, 375, seed=2)
    got, hw = decode.CenterCrop(224, 0.875)(data, 3)
    assert got.shape == (224, 224, 3) and hw is None
    im = Image.open(io.BytesIO(data)).convert("RGB")
    im = im.resize((round(500 * 256 / 375), 256), Image.BILINEAR)
    left = (im.size[0] - 224) // 2
    ref = np.asarray(im)[16:240, left:left + 224]
    assert np.abs(got.astype(float) - ref.astype(float)).mean() < 2.0
    # A large image decodes DCT-scaled, to the same picture.
    big, _ = decode.CenterCrop(64, 0.875)(_jpeg(1200, 900, seed=3), 3)
    im = Image.open(io.BytesIO(_jpeg(1200, 900, seed=3))).convert("RGB")
    im = im.resize((round(1200 * 64 / 0.875 / 900), round(64 / 0.875)), Image.BILINEAR)
    left, top = (im.size[0] - 64) // 2, (im.size[1] - 64) // 2
    assert np.abs(big.astype(float) - np.asarray(im)[top:top + 64, left:left + 64]).mean() < 4.0


# ------------------------------------------------------ a dataset of varying sizes

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An image_folder dataset `photos` of JPEGs of varying size (24-90 px, aspect
    0.5-2, a greyscale one): 4 classes told apart by colour, 48 train, 16 val.
    Returns its data_dir."""
    from ssl_jax.datasets import prepare

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("photos_src")
    colours = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40)]
    for split, n in (("train", 48), ("val", 16)):
        for i in range(n):
            label = i % 4
            w, h = int(rng.integers(24, 90)), int(rng.integers(24, 90))
            img = np.clip(rng.normal(colours[label], 30, (h, w, 3)), 0, 255).astype(np.uint8)
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).convert("L" if i == 5 else "RGB").save(
                folder / f"{i:03d}.jpg", quality=90)
    data_dir = str(tmp_path_factory.mktemp("photos_tfds"))
    prepare.prepare("image_folder", data_dir, manual_dir=str(root), name="photos")
    return data_dir


def _photos_config(method, data_dir, **overrides):
    from tests.test_train import tiny_config

    c = tiny_config(method, data_dir)
    c.dataset, c.eval.test_split = "photos", "validation"
    c.batch_size, c.eval.batch_size, c.eval.knn.k = 16, 16, 5
    c.data.canvas = 96
    c.aug.update(crop_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    for k, v in overrides.items():
        c[k] = v
    return c


def test_sources_decode_varying_sizes_onto_canvases_or_centre_crops(photos):
    from ssl_jax.data import pipeline, sources

    info = sources.dataset_info("photos", photos)
    assert info["image_shape"] == (None, None, 3) and info["num_examples"]["train"] == 48
    with pytest.raises(ValueError, match="vary in size"):
        sources.open_source("photos", "train", photos)
    for limit in (0, sources.MEMORY_LIMIT):  # read lazily, and decoded into memory
        src = sources.open_source("photos", "train", photos, memory_limit=limit,
                                  decode=decode.ToCanvas(96))
        batch = next(pipeline.train_iterator(src, global_batch_size=8, seed=0))
        assert batch["image"].shape == (8, 96, 96, 3) and batch["image_hw"].shape == (8, 2)
        h, w = batch["image_hw"][0]
        assert 24 <= h < 90 and 24 <= w < 90 and not batch["image"][0, h:].any()
        ev = next(pipeline.eval_batches(
            sources.open_source("photos", "validation", photos, memory_limit=limit,
                                decode=decode.CenterCrop(32)), 16))
        assert ev["image"].shape == (16, 32, 32, 3) and "image_hw" not in ev


def test_every_method_views_canvases(photos):
    """Each method's views (two crops, rotations, jigsaw tiles, PIRL's image + tiles)
    come from the canvas's valid region, one shape per batch."""
    from ssl_jax import methods
    from ssl_jax.data import pipeline, sources

    src = sources.open_source("photos", "train", photos, decode=decode.ToCanvas(96))
    batch = next(pipeline.train_iterator(src, global_batch_size=4, seed=0))
    images = canvas.images_of(batch)
    from ssl_jax.config import load_file

    def preset(name):
        c = load_file(f"configs/{name}.py:runlocal")
        c.aug.update(crop_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
        return c
    for name in ("moco", "rotnet", "pirl"):
        c = preset(name)
        if name == "rotnet":  # the CIFAR crop needs one size: ImageNet's recipe crops
            c.aug.update(crop="resized", crop_scale=(0.766, 0.766), crop_ratio=(1.0, 1.0))
        views = jax.jit(lambda r, x: methods.get(name).views(r, x, c))(KEY, images)
        for v in jax.tree.leaves(views):
            assert np.isfinite(np.asarray(v, np.float32)).all(), name
    c = preset("rotnet")  # its CIFAR crop: a clear error, not a crash
    from ssl_jax.errors import UserError
    with pytest.raises(UserError, match="crop='padded'"):
        methods.get("rotnet").views(KEY, images, c)


def test_train_resume_evaluate_on_images_of_varying_size(photos, tmp_path):
    """SimCLR on JPEGs of varying size: trains from canvases, resumes bitwise after a
    crash, and evaluates (linear, kNN) on the val split's centre crops."""
    from ssl_jax import evaluation
    from tests.test_train import train_crash_resume

    c = _photos_config("simclr", photos)
    full, resumed, workdir = train_crash_resume(c, tmp_path)
    results = evaluation.evaluate(workdir, ("linear", "knn"))
    for name in ("linear", "knn"):
        assert results[name]["step"] == 6 and 0.0 <= results[name]["top1"] <= 100.0
    # 4 classes told apart by colour: far above chance (25%) even for this encoder.
    assert results["linear"]["top1"] >= 75.0, results["linear"]
    # The probe's light augmentation crops each whole decoded image (a canvas), at the
    # eval view's size: its features are cached under their own key, then used.
    augmented = evaluation.evaluate(workdir, ("linear",), overrides={
        "eval.linear.augment.views": "1"})["linear"]
    assert augmented["top1"] >= 75.0, augmented
    cached = os.listdir(os.path.join(workdir, "features"))
    assert sum("train" in f for f in cached) == 2, cached  # centre view, augmented view
    # A canvas smaller than the crop is refused before anything is written.
    from ssl_jax import errors, experiment
    with pytest.raises(errors.UserError, match="config.data.canvas=16"):
        experiment.data_spec(_photos_config("simclr", photos, data=dict(
            worker_count=0, skip_corrupt=False, canvas=16)))


def test_canvas_batches_from_worker_processes_equal_and_resume(photos):
    """grain worker processes decode too (the policy pickles): the same batches as
    in-process, and an iterator restored from its state continues exactly."""
    from ssl_jax.data import pipeline, sources

    src = sources.open_source("photos", "train", photos, memory_limit=0,
                              decode=decode.ToCanvas(96))
    def iterator(workers):
        return pipeline.train_iterator(src, global_batch_size=8, seed=1, worker_count=workers)
    it = iterator(0)
    ref = [next(it) for _ in range(4)]
    it = iterator(1)  # a worker process decodes: the policy pickles
    got = [next(it) for _ in range(2)]
    state = it.get_state()
    got += [next(it) for _ in range(2)]
    fresh = iterator(2)  # the state is the step: any worker count restores it
    fresh.set_state(state)
    rest = [next(fresh) for _ in range(2)]
    for a, b in zip(ref, got):
        for k in ("image", "image_hw", "index"):
            np.testing.assert_array_equal(a[k], b[k])
    for a, b in zip(ref[2:], rest):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_an_undecodable_image_names_its_record_or_is_skipped(photos):
    """A record whose bytes no longer decode (disk damage after preparing): a
    CorruptRecordError naming it, or with skip_corrupt a readable record instead."""
    from ssl_jax.data import sources

    class Damaged:  # the prepared split, record 3's JPEG cut short
        def __init__(self, src):
            self.src = src

        def __len__(self):
            return len(self.src)

        def __getitems__(self, ix):
            out = self.src.__getitems__(ix)
            return [dict(r, image=r["image"][:200]) if i == 3 else r for i, r in zip(ix, out)]

    raw = sources.open_source("photos", "train", photos, memory_limit=0,
                              decode=decode.ToCanvas(96)).src.src
    damaged = sources.DecodedSource(Damaged(raw), decode.ToCanvas(96), 3)
    with pytest.raises(sources.CorruptRecordError, match="Record 3 of photos"):
        sources.read_batch(sources.CheckedSource(damaged, "photos train"), [2, 3, 4])
    batch = sources.read_batch(sources.CheckedSource(damaged, "photos train", skip=True),
                               [2, 3, 4])
    assert batch["image"].shape == (3, 96, 96, 3) and batch["image_hw"].shape == (3, 2)
