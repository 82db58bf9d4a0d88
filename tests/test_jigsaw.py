"""Jigsaw: the permutation set, the tiles, the method on 1 and 8 devices, and a
tiny train -> resume -> evaluate run."""
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import evaluation
from ssl_jax.views import jigsaw, ops
from tests import multidevice, test_train

KEY = jax.random.key(0)
ALL = np.array(list(itertools.permutations(range(9))), np.int8)   # the reference: all 9!


pytestmark = pytest.mark.usefixtures("fast_prng")  # conftest.py


def hamming(a, b):
    """(n, 9), (m, 9) -> (n, m) int8: the positions in which rows differ."""
    out = np.zeros((len(a), len(b)), np.int8)
    for k in range(9):   # one column at a time: (n, m, 9) would not fit for n = 9!
        out += a[:, k, None] != b[None, :, k]
    return out


# ---------------------------------------------------------------- permutations

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("perm_cache"))


def test_permutation_set_is_the_greedy_max_min_hamming_set(cache):
    p = jigsaw.permutations(40, 0, cache_dir=cache)
    assert p.shape == (40, 9) and p.dtype == np.int32
    assert (np.sort(p, axis=1) == np.arange(9)).all()
    assert len(np.unique(p, axis=0)) == 40
    # Brute force over all 9! candidates: each row is as far (in minimum Hamming
    # distance) from the rows before it as any permutation could be.
    to_rows_before = np.minimum.accumulate(hamming(ALL, p), axis=1)   # (9!, 40)
    for i in range(1, 40):
        assert hamming(p[i:i + 1], p[:i]).min() == to_rows_before[:, i - 1].max(), i
    d = hamming(p, p) + 99 * np.eye(40, dtype=int)
    # Up to 9 rows can differ everywhere (a Latin square's rows), and the greedy
    # choice always finds them; a 10th shares a position with one of them.
    assert d[:9, :9].min() == 9 and d[:10, :10].min() == 8
    assert d.min() >= 2


def test_permutations_deterministic_cached_and_prefix_stable(cache):
    a = jigsaw.permutations(30, 1, cache_dir=cache)
    assert os.path.exists(os.path.join(cache, "jigsaw_perms_v1_30_1.npy"))
    jigsaw.permutations.cache_clear()                      # from the disk cache now
    b = jigsaw.permutations(30, 1, cache_dir=cache)
    np.testing.assert_array_equal(a, b)
    assert jigsaw.permutations(30, 1, cache_dir=cache) is b   # and from memory
    assert not b.flags.writeable
    np.testing.assert_array_equal(jigsaw._greedy_max_hamming(30, 1), a)
    np.testing.assert_array_equal(jigsaw.permutations(12, 1, cache_dir=cache), a[:12])
    assert not np.array_equal(jigsaw.permutations(30, 2, cache_dir=cache), a)
    # A corrupt cache file is recomputed, not trusted.
    np.save(os.path.join(cache, "jigsaw_perms_v1_5_1.npy"), np.zeros((5, 9), np.int32))
    np.testing.assert_array_equal(jigsaw.permutations(5, 1, cache_dir=cache), a[:5])
    with pytest.raises(ValueError, match="num_perms"):
        jigsaw.permutations(0, cache_dir=cache)


# ---------------------------------------------------------------- tiles

PLAIN = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, mean=(0.0,), std=(1.0,))


def image(seed=0, shape=(30, 26, 3)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, shape), jnp.uint8)


def test_tiles_are_regions_of_the_crop():
    x = image()
    cfg = dict(crop_size=(36, 36), tile_side=8, **PLAIN)   # cells 12 px, tiles 8 px

    @jax.jit
    def f(rng):
        k_crop = jax.random.split(rng, 3)[0]             # tiles' first key makes the crop
        crop = ops.random_resized_crop(k_crop, x.astype(jnp.float32) / 255, (36, 36),
                                           (0.6, 1.0))
        return (crop, jigsaw.tiles(rng, x, jigsaw.tile_view_config(tile_jitter=False, **cfg)),
                jigsaw.tiles(rng, x, jigsaw.tile_view_config(**cfg)))
    crop, still, moved = map(np.asarray, f(KEY))
    assert still.shape == moved.shape == (9, 8, 8, 3) and still.dtype == np.float32
    # Centred without jitter (offset 2), anywhere in 0..4 with it.
    offsets = set()
    for j in range(9):
        r, c = divmod(j, 3)
        np.testing.assert_allclose(still[j], crop[12 * r + 2:12 * r + 10, 12 * c + 2:12 * c + 10],
                                   atol=1e-5)
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if np.allclose(moved[j], crop[12 * r + dy:12 * r + dy + 8, 12 * c + dx:12 * c + dx + 8],
                                atol=1e-5)]
        assert found, j
        offsets.add(found[0])
    assert len(offsets) > 1


def test_tile_resize_augmentation_and_standardisation():
    x = image(1, (28, 28))                                # (H, W) grey images work too
    cfg = jigsaw.tile_view_config(crop_size=(64, 64), tile_side=16, tile_size=20, mean=(0.3,),
                                  std=(0.4,), standardize=True)
    t = jax.jit(lambda r: jigsaw.tiles(r, x, cfg))(KEY)
    assert t.shape == (9, 20, 20, 1)
    np.testing.assert_allclose(t.mean(axis=(1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(t.std(axis=(1, 2)), 1.0, atol=1e-3)


def test_tile_config_errors():
    with pytest.raises(ValueError, match="tile_side"):
        jigsaw.tile_view_config(tile_sid=3)
    with pytest.raises(ValueError, match="tile_side=30"):
        jigsaw.tiles(KEY, image(), jigsaw.tile_view_config(crop_size=(64, 64), tile_side=30))


def test_batch_jigsaw_shuffles_by_the_drawn_permutation():
    images = jnp.stack([image(s, (20, 20, 1)) for s in range(6)])
    perms = jigsaw.permutations(7, cache_dir=None)
    cfg = jigsaw.tile_view_config(crop_size=(30, 30), tile_side=8, **PLAIN)

    @jax.jit
    def f(rng):
        # Also the unshuffled tiles, from the keys batch_jigsaw gives each example.
        keys = jax.vmap(lambda k: jax.random.split(k)[0])(jax.random.split(rng, 6))
        return (*jigsaw.batch_jigsaw(rng, images, cfg, perms),
                jax.vmap(lambda k, x: jigsaw.tiles(k, x, cfg))(keys, images))
    tiles, index, original = f(KEY)
    assert tiles.shape == (6, 9, 8, 8, 1) and tiles.dtype == jnp.float32
    assert index.shape == (6,) and index.dtype == jnp.int32
    assert ((0 <= index) & (index < 7)).all() and len(set(np.asarray(index))) > 1
    # Tile position j of example b shows original tile perms[index[b], j].
    for b in range(6):
        np.testing.assert_allclose(tiles[b], original[b][perms[int(index[b])]], atol=1e-6)
    again, index_again, _ = f(KEY)
    np.testing.assert_array_equal(again, tiles)
    np.testing.assert_array_equal(index_again, index)
    other, _, _ = f(jax.random.key(1))
    assert not np.allclose(other, tiles)


# ---------------------------------------------------------------- the method

def tiny(c):
    """Shrinks a jigsaw config to seconds: 54 px grid crops, 16 px tiles, P=8."""
    c.model.widths, c.model.conv = (4, 8), "xla"  # compiles in half the time
    c.head.hidden, c.head.dim = 16, 8
    c.jigsaw.num_perms = 8
    c.jigsaw.tiles.update(crop_size=(54, 54), tile_side=16)
    return c


SNIPPET = """
import jax, jax.numpy as jnp
jax.config.update("jax_threefry_partitionable", False)  # as fast_prng (conftest.py)
from ssl_jax import methods, parallel
from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec
from tests.test_jigsaw import tiny
spec = DataSpec(16, (28, 28, 1))
mesh = parallel.make_mesh()
out["devices"] = len(jax.devices())
images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1)), jnp.uint8)
c = tiny(load_file("configs/jigsaw.py:runlocal"))
m = methods.get("jigsaw")
with jax.set_mesh(mesh):
    sh = parallel.batch_sharding(mesh)
    views = jax.jit(lambda r, x: m.views(r, x, c))(jax.random.key(1), jax.device_put(images, sh))
    params, state = m.init(jax.random.key(2), views, c, spec)
    f = jax.jit(jax.value_and_grad(lambda p, s, v: m.loss(p, s, v, {}, None, c, spec),
                                   has_aux=True))
    (loss, (metrics, new_state)), grads = f(params, state, views)
out["loss"], out["acc"] = loss, metrics["perm_acc"]
out["tiles"], out["index"] = views["tiles"], views["perm_index"]
for i, g in enumerate(jax.tree.leaves(grads)):
    out[f"grad{i}"] = g
for i, s in enumerate(jax.tree.leaves(new_state)):
    out[f"state{i}"] = s
"""


def test_loss_gradients_and_state_equal_on_one_and_eight_devices(tmp_path_factory):
    one, eight = multidevice.run_one_and_eight(SNIPPET, tmp_path_factory)
    assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
    assert one["tiles"].shape == (16, 9, 16, 16, 1)
    keys = [k for k in one if k not in ("devices",)]
    assert len(keys) > 10
    for k in keys:
        np.testing.assert_allclose(eight[k], one[k], rtol=2e-4, atol=2e-5, err_msg=k)
    assert np.isfinite(one["loss"]) and abs(float(one["loss"]) - np.log(8)) < 1.0


def test_train_resume_evaluate(tiny_data, tmp_path, monkeypatch, compilation_cache):
    config = tiny(test_train.tiny_config("jigsaw", tiny_data))
    _, _, workdir = test_train.train_crash_resume(config, tmp_path)

    results = evaluation.evaluate(workdir, ("linear", "knn"))
    for name in ("linear", "knn"):
        assert 0.0 <= results[name]["top1"] <= results[name]["top5"] <= 100.0
        # tiny_squares' 10 classes (chance 10%; a swapped split or labels scores ~10%):
        # 6 steps of any of these methods keep its final stage far above chance.
        assert results[name]["top1"] > 25.0 and results[name]["step"] == 6
