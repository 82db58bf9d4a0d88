"""Views, what they mean, through the composed view() / batch_views (not each op
alone, which test_augment.py pins): each op fires at its configured probability
over many per-example keys, independently of the others, and does what it says
when it fires (jitter changes pixels, grey equalises the channels to the luma,
blur lowers high frequencies); SimCLR's and MoCo's two views are independent
draws; the train step folds the step into the views' key, so each step's views
differ from the previous step's and are the documented fold_in(stream 1, step)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import experiment, parallel
from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec
from ssl_jax.methods import moco, simclr
from ssl_jax.views import augment

N = 2000  # examples per frequency: a binomial's sd is <= 0.011, the bounds 5 sd
KEY = jax.random.key(0)
OFF = dict(crop="center", crop_size=(8, 8), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
           blur_p=0.0, solarize_p=0.0, mean=(0.0,), std=(1.0,))  # the identity view

pytestmark = pytest.mark.usefixtures("fast_prng")  # conftest.py; nothing compares PRNG modes


def _image(channels=3):
    return np.random.default_rng(0).integers(0, 256, (8, 8, channels), dtype=np.uint8)


def _views(image, **fields):
    """N views of one image (each with its own key of split(KEY, N)) under OFF + fields,
    and the image as float in [0, 1]."""
    cfg = augment.simclr_view_config(**dict(OFF, **fields))
    images = jnp.broadcast_to(jnp.asarray(image), (N,) + image.shape)
    out = jax.jit(lambda r, x: augment.batch_views(r, x, cfg))(KEY, images)
    return np.asarray(out, np.float64), image.astype(np.float64) / 255.0


def _freq(mask, p):
    assert abs(float(np.mean(mask)) - p) < 0.055, (float(np.mean(mask)), p)


def _is(v, x):
    """(N,) bool: which of the views v (N, H, W, C) equal x (H, W, C)."""
    return np.all(np.abs(v - x) < 1e-5, axis=(1, 2, 3))


def test_flip_and_grey_fire_at_their_probabilities_independently():
    image = _image()
    v, x = _views(image, flip_p=0.3, grayscale_p=0.6)
    luma = x @ np.array([0.299, 0.587, 0.114])
    grey = np.repeat(luma[..., None], 3, -1)
    flip = lambda a: a[:, ::-1]
    outcomes = {(False, False): x, (True, False): flip(x),
                (False, True): grey, (True, True): flip(grey)}
    hits = {k: _is(v, want) for k, want in outcomes.items()}
    assert np.all(sum(h.astype(int) for h in hits.values()) == 1)  # each view is one of them
    for (flipped, grey_), h in hits.items():  # the joint frequencies factorise
        _freq(h, (0.3 if flipped else 0.7) * (0.6 if grey_ else 0.4))
    # Grey equalises the channels, to the luma (0.299, 0.587, 0.114).
    g = v[hits[(False, True)]]
    np.testing.assert_allclose(g[..., 0], g[..., 2], atol=1e-6)


@pytest.mark.parametrize("channels", [3, 1])  # 1: brightness and contrast only (Fashion-MNIST)
def test_jitter_fires_at_its_probability_and_changes_pixels(channels):
    v, x = _views(_image(channels), jitter_p=0.4)
    changed = ~_is(v, x)
    _freq(changed, 0.4)
    # When it fires the image really changes: mean |change| of a pixel > 1% of the range.
    assert np.mean(np.abs(v[changed] - x), axis=(1, 2, 3)).min() > 0.01


def test_blur_fires_at_its_probability_and_lowers_high_frequencies():
    # sigma >= 1: a sigma of 0.1 is (numerically) no blur at all on a 3-tap kernel.
    # A transpose-symmetric image: an isotropic blur (both axes) keeps it symmetric.
    image = _image(1)
    image = ((image.astype(np.int32) + image.transpose(1, 0, 2)) // 2).astype(np.uint8)
    v, x = _views(image, blur_p=0.3, blur_sigma=(1.0, 2.0))
    energy = lambda a: (np.sum(np.diff(a, axis=-3) ** 2, axis=(-3, -2, -1))
                        + np.sum(np.diff(a, axis=-2) ** 2, axis=(-3, -2, -1)))
    blurred = ~_is(v, x)
    _freq(blurred, 0.3)
    assert np.all(energy(v[blurred]) < 0.6 * energy(x))  # the neighbour differences shrink
    np.testing.assert_allclose(v[blurred].mean(axis=(1, 2, 3)), x.mean(), atol=0.03)
    np.testing.assert_allclose(v[blurred], v[blurred].transpose(0, 2, 1, 3), atol=1e-5)


@pytest.mark.parametrize("method", [simclr, moco], ids=["simclr", "moco"])
def test_a_methods_two_views_are_independent_draws(method):
    c = load_file(f"configs/{method.__name__.rsplit('.', 1)[-1]}.py:runlocal")
    c.aug.update(**dict(OFF, flip_p=0.5))
    image = _image(1)
    x = image.astype(np.float64) / 255.0
    images = jnp.broadcast_to(jnp.asarray(image), (N,) + image.shape)
    views = jax.jit(lambda r, im: method.views(r, im, c))(KEY, images)
    a, b = (np.asarray(v, np.float64) for v in views.values())
    fa, fb = _is(a, x[:, ::-1]), _is(b, x[:, ::-1])
    assert np.all(fa | _is(a, x)) and np.all(fb | _is(b, x))
    _freq(fa & fb, 0.25)   # both flipped
    _freq(fa & ~fb, 0.25)  # only the first
    _freq(~fa & fb, 0.25)  # only the second


def test_the_step_is_folded_into_the_views_key():
    """Two steps of the real train step on the same batch, with a loss that only
    reports what it was given: step s's views are SimCLR's views under
    split(fold_in(fold_in(key(seed), 1), s))[0], so they differ from step to step."""
    c = load_file("configs/simclr.py:runlocal")
    c.model.widths, c.model.conv = (4, 8), "xla"
    c.head.hidden, c.head.dim = 16, 8
    c.batch_size, c.total_steps = 8, 10
    c.aug.update(**dict(OFF, flip_p=0.5, jitter_p=0.8))
    spec = DataSpec(num_examples=64, image_shape=(8, 8, 1))
    exp = experiment.Experiment(c, spec, parallel.make_mesh())

    def report(params, state, views, batch, rng, config, spec):
        zero = 0.0 * sum(jnp.sum(p) for p in jax.tree.leaves(params))
        return zero, ({"views": views, "loss_key": jax.random.key_data(rng)}, state)
    exp.method = dataclasses.replace(exp.method, loss=report)
    step = exp.train_step()
    state = exp.initial_state()
    batch = {"image": np.random.default_rng(1).integers(0, 256, (8, 8, 8, 1), np.uint8),
             "index": np.arange(8, dtype=np.int32), "label": np.zeros(8, np.int32)}
    got = []
    for _ in range(2):
        state, metrics = step(state, batch)
        got.append(jax.device_get(metrics))
    base = jax.random.fold_in(jax.random.key(c.seed), 1)
    for s in range(2):
        r_views, r_loss = jax.random.split(jax.random.fold_in(base, s))
        want = simclr.views(r_views, jnp.asarray(batch["image"]), c)
        for name in ("view1", "view2"):
            np.testing.assert_allclose(got[s]["views"][name], want[name], atol=1e-6,
                                       err_msg=f"step {s} {name}")
        np.testing.assert_array_equal(got[s]["loss_key"], jax.random.key_data(r_loss))
    for name in ("view1", "view2"):  # the images' views change from step 0 to step 1
        diff = np.abs(got[0]["views"][name] - got[1]["views"][name]).max(axis=(1, 2, 3))
        # (an image may draw no jitter and the same flip twice: ~5% here)
        assert np.mean(diff > 1e-3) >= 0.75, (name, diff)
    assert not np.array_equal(got[0]["loss_key"], got[1]["loss_key"])
