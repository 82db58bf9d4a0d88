"""On-device augmentations: shapes, ranges, determinism and each op's documented effect."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.views import augment, colour, ops

KEY = jax.random.key(0)


def rgb(seed=0, shape=(12, 12, 3)):
    return jax.random.uniform(jax.random.key(seed), shape)


def test_batch_views_shapes_dtype_determinism_and_keys(default_prng):
    images = jax.random.randint(KEY, (6, 28, 28, 1), 0, 256).astype(jnp.uint8)
    cfg = augment.simclr_view_config(crop_size=(20, 20), mean=(0.5,), std=(0.25,), blur_p=0.5)
    f = jax.jit(lambda r, x: augment.batch_views(r, x, cfg))
    a, b, c = f(KEY, images), f(KEY, images), f(jax.random.key(1), images)
    assert a.shape == (6, 20, 20, 1) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # Before normalisation values stay in [0, 1]: after it, in [(0-m)/s, (1-m)/s].
    assert float(a.min()) >= -2.0 - 1e-5 and float(a.max()) <= 2.0 + 1e-5
    # Each example gets its own randomness: two copies of one image differ.
    same = jnp.broadcast_to(images[:1], images.shape)
    v = f(KEY, same)
    assert not np.allclose(v[0], v[1])


def test_rgb_views_stay_in_range():
    images = (rgb(1, (4, 32, 32, 3)) * 255).astype(jnp.uint8)
    cfg = augment.simclr_view_config(crop_size=(32, 32), mean=(0.0,), std=(1.0,), solarize_p=0.5)
    v = jax.jit(lambda r, x: augment.batch_views(r, x, cfg))(KEY, images)
    assert v.shape == (4, 32, 32, 3) and float(v.min()) >= 0.0 and float(v.max()) <= 1.0 + 1e-6


def test_flip():
    x = rgb()
    np.testing.assert_array_equal(ops.random_flip(KEY, x, p=1.0), x[:, ::-1])
    np.testing.assert_array_equal(ops.random_flip(KEY, x, p=0.0), x)


def test_grayscale_equalises_channels_and_is_noop_on_one_channel():
    g = colour.random_grayscale(KEY, rgb(), p=1.0)
    np.testing.assert_allclose(g[..., 0], g[..., 1], atol=1e-6)
    np.testing.assert_allclose(g[..., 1], g[..., 2], atol=1e-6)
    gray = rgb(shape=(8, 8, 1))
    np.testing.assert_array_equal(colour.random_grayscale(KEY, gray, p=1.0), gray)


def test_colour_ops():
    x = rgb()
    np.testing.assert_allclose(colour.adjust_brightness(x, 1.0), x, atol=1e-6)
    np.testing.assert_allclose(colour.adjust_contrast(x, 1.0), x, atol=1e-6)
    np.testing.assert_allclose(colour.adjust_saturation(x, 1.0), x, atol=1e-6)
    np.testing.assert_allclose(colour.adjust_hue(x, 0.0), x, atol=1e-5)
    np.testing.assert_allclose(colour.hsv_to_rgb(colour.rgb_to_hsv(x)), x, atol=1e-5)
    # Contrast 0 gives a flat image at the mean grey level; brightness 0.5 halves.
    flat = colour.adjust_contrast(x, 0.0)
    assert float(jnp.ptp(flat)) < 1e-6
    np.testing.assert_allclose(colour.adjust_brightness(x, 0.5), x * 0.5, atol=1e-6)
    # A hue shift of a full turn is the identity; a third of a turn rotates R -> G.
    red = jnp.zeros((2, 2, 3)).at[..., 0].set(1.0)
    np.testing.assert_allclose(colour.adjust_hue(red, 1 / 3)[0, 0], [0, 1, 0], atol=1e-5)
    # On one channel, saturation and hue are no-ops; jitter changes only brightness/contrast.
    g = rgb(shape=(8, 8, 1))
    np.testing.assert_array_equal(colour.adjust_saturation(g, 0.0), g)
    np.testing.assert_array_equal(colour.adjust_hue(g, 0.3), g)
    j = colour.color_jitter(KEY, g, brightness=0.0, contrast=0.0, saturation=0.8, hue=0.2, p=1.0)
    np.testing.assert_array_equal(j, g)


def test_solarize():
    x = rgb()
    np.testing.assert_allclose(ops.solarize(KEY, x, threshold=0.0, p=1.0), 1.0 - x, atol=1e-6)
    np.testing.assert_array_equal(ops.solarize(KEY, x, threshold=1.1, p=1.0), x)


def test_blur_keeps_constants_and_smooths_noise():
    const = jnp.full((16, 16, 1), 0.3)
    np.testing.assert_allclose(ops.gaussian_blur(KEY, const, (1.0, 1.0), 5, p=1.0), const,
                               atol=1e-6)
    noise = rgb(2, (16, 16, 1))
    blurred = ops.gaussian_blur(KEY, noise, (1.5, 1.5), 5, p=1.0)
    assert float(blurred.var()) < 0.5 * float(noise.var())
    np.testing.assert_allclose(float(blurred.mean()), float(noise.mean()), atol=0.02)
    with pytest.raises(ValueError, match="odd"):
        ops.gaussian_blur(KEY, noise, (1.0, 1.0), 4, p=1.0)


def test_crops():
    x = rgb(3, (16, 16, 3))
    same = ops.random_resized_crop(KEY, x, (16, 16), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(same, x, atol=1e-5)
    small = ops.random_resized_crop(KEY, x, (8, 8), scale=(0.2, 0.5))
    assert small.shape == (8, 8, 3)
    assert float(small.min()) >= float(x.min()) - 1e-6 and float(small.max()) <= float(x.max()) + 1e-6
    padded = ops.random_crop_with_padding(jax.random.key(4), x, pad=2)
    assert padded.shape == x.shape
    # A padded crop is a shift: the middle of the image appears somewhere in it.
    dy, dx = [int(v) for v in jax.random.randint(jax.random.key(4), (2,), 0, 5) - 2]
    np.testing.assert_allclose(padded[4:12, 4:12], x[4 + dy:12 + dy, 4 + dx:12 + dx], atol=1e-6)


def test_rotate90():
    x = rgb(5, (6, 6, 2))
    np.testing.assert_array_equal(ops.rotate90(x, 4), x)
    np.testing.assert_array_equal(ops.rotate90(x, 1), np.rot90(np.asarray(x), 1, axes=(0, 1)))
    with pytest.raises(ValueError, match="square"):
        ops.rotate90(jnp.zeros((4, 6, 1)), 1)


def test_normalize_and_config_errors():
    x = rgb()
    np.testing.assert_allclose(ops.normalize(x, (0.5, 0.4, 0.3), (0.2, 0.2, 0.1)),
                               (x - jnp.array([0.5, 0.4, 0.3])) / jnp.array([0.2, 0.2, 0.1]),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="mean has 2 values"):
        ops.normalize(x, (0.5, 0.5), (1.0,))
    with pytest.raises(ValueError, match="crop_scale"):
        augment.simclr_view_config(crop_scael=(0.2, 1.0))
    # Evaluation view: deterministic centre crop, no randomness.
    e = augment.eval_view_config(crop_size=(12, 12), mean=(0.0,), std=(1.0,))
    np.testing.assert_allclose(augment.view(KEY, x, e), augment.view(jax.random.key(9), x, e))
    np.testing.assert_allclose(augment.view(KEY, x, e), x, atol=1e-5)
