"""Multi-crop views (views/multicrop.py) and SimCLR with multi-crop: the encoder once
per resolution group, each crop's recipe on its crop only, canvases, bad input, the
loss against a NumPy version of its equation (one device and eight), a real run."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import losses, methods, train
from ssl_jax.config import load_file
from ssl_jax.errors import UserError
from ssl_jax.methods import simclr
from ssl_jax.views import augment, canvas, multicrop, pair
from tests.test_precision import equations

pytestmark = pytest.mark.usefixtures("fast_prng")
B = 8


def tiny_config(arg="local_crops=6", **multicrop_fields):
    c = load_file(f"configs/simclr.py:runlocal,{arg}")
    c.batch_size = B
    c.model.update(widths=(4, 8), conv="xla")
    c.head.hidden, c.head.dim = 16, 8
    for k, v in multicrop_fields.items():
        c.multicrop[k] = v
    return c


def _images(n=B, side=28, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, side, side, 1), np.uint8))


# ------------------------------------------------------------- one call per group

def _first_layer_inputs(config):
    """The input shapes of the encoder's first convolution (kernel fed by the image's one
    channel) in SimCLR's forward loss: one per encoder call."""
    m = methods.get("simclr")  # traced only: shapes, nothing compiled
    views = jax.eval_shape(lambda x: m.views(jax.random.key(0), x, config), _images())
    params, state = jax.eval_shape(lambda v: m.init(jax.random.key(1), v, config, None), views)
    jaxpr = jax.make_jaxpr(lambda p, s, v: m.loss(p, s, v, {}, None, config, None)[0])(
        params, state, views)
    return sorted(tuple(e.invars[0].aval.shape) for e in equations(jaxpr.jaxpr)
                  if e.primitive.name == "conv_general_dilated" and e.invars[1].aval.shape[2] == 1)


@pytest.mark.parametrize("global_crops,local_crops", [(2, 2), (2, 6), (4, 6), (3, 0)])
def test_encoder_runs_once_per_resolution_group(global_crops, local_crops):
    c = tiny_config(global_crops=global_crops, local_crops=local_crops)
    want = [(B * global_crops, 28, 28, 1)]
    if local_crops:  # the locals at their own size: never padded up to the global one
        want.insert(0, (B * local_crops, 12, 12, 1))
    assert _first_layer_inputs(c) == sorted(want)


def test_two_view_simclr_is_one_call():
    assert _first_layer_inputs(tiny_config("local_crops=0")) == [(2 * B, 28, 28, 1)]


def test_encode_groups_calls_once_per_group_and_keeps_image_rows_together():
    calls = []

    def fn(x, carry):
        calls.append(x.shape)
        return {"z": x[:, 0, 0, 0], "x": x}, carry + 1

    groups = {"global": jnp.arange(B * 3 * 4 * 4.0).reshape(B, 3, 4, 4, 1),
              "local": jnp.arange(B * 5 * 2 * 2.0).reshape(B, 5, 2, 2, 1)}
    out, carry = multicrop.encode_groups(fn, groups, 0)
    assert calls == [(B * 3, 4, 4, 1), (B * 5, 2, 2, 1)] and carry == 2
    for name, x in groups.items():  # row b * n + k of the call is image b's crop k
        np.testing.assert_array_equal(out[name]["x"], x)
        assert out[name]["z"].shape == x.shape[:2]


def test_bn_statistics_thread_from_the_global_call_into_the_local_call():
    """SimCLR's multi-crop step updates the running BN statistics twice, the local group's
    update applied to the global group's result (what one forward per group means for
    BN); giving both calls the step's initial statistics and keeping the last (the
    global update lost) fails it."""
    from ssl_jax.methods import network
    c = tiny_config("local_crops=2")
    m = methods.get("simclr")
    # Each piece jitted: run op by op, its hundreds of primitives compiled one at a
    # time took ~20 CPU-s; the values compared are the same functions'.
    views = jax.jit(lambda k, x: m.views(k, x, c))(jax.random.key(0), _images())
    params, state = jax.jit(lambda k, v: m.init(k, v, c, None))(jax.random.key(1), views)
    _, (_, new_state) = jax.jit(lambda p, s, v: m.loss(p, s, v, {}, None, c, None))(
        params, state, views)
    net = network.make_network(c)
    forward = jax.jit(lambda bs, x: network.apply(net, params, bs, x, train=True)[2])
    bs = state["batch_stats"]
    for name in ("global", "local"):  # by hand: one forward per group, in order
        bs = forward(bs, views[name].reshape((-1,) + views[name].shape[2:]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 new_state["batch_stats"], bs)
    only_local = forward(  # the wrong threading differs from it
        state["batch_stats"], views["local"].reshape((-1,) + views["local"].shape[2:]))
    assert not all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(np.allclose(a, b)), new_state["batch_stats"], only_local)))


# ------------------------------------------------------------- per-crop recipes

def test_dino_spec_is_dinos_recipe():
    base = augment.simclr_view_config(mean=(0.5,), std=(0.25,))
    g, l = multicrop.dino_spec(base, global_crops=2, local_crops=3, global_size=224,
                               local_size=96)
    assert (g.name, g.size, g.crops, l.name, l.size, l.crops) == (
        "global", (224, 224), 2, "local", (96, 96), 3)
    for r in g.recipes + l.recipes:
        assert (r["brightness"], r["contrast"], r["saturation"], r["hue"], r["jitter_p"],
                r["grayscale_p"], r["flip_p"], r["blur_sigma"]) == (
            0.4, 0.4, 0.2, 0.1, 0.8, 0.2, 0.5, (0.1, 2.0))
        assert r["mean"] == (0.5,) and r["std"] == (0.25,)
    blur_sol = [(r["blur_p"], r["solarize_p"], r["crop_scale"], r["crop_size"])
                for r in g.recipes + l.recipes]
    assert blur_sol == [(1.0, 0.0, (0.4, 1.0), (224, 224)), (0.1, 0.2, (0.4, 1.0), (224, 224))] \
        + [(0.5, 0.0, (0.05, 0.4), (96, 96))] * 3


def _geometry_and_blur_only(spec):
    """The spec with each crop's blur and solarisation kept, its crop the whole image
    (scale and ratio 1), and flip, colour and normalisation off: what is left to see."""
    quiet = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, mean=(0.0,), std=(1.0,),
                 crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), blur_sigma=(1.0, 2.0))
    return tuple(dataclasses.replace(g, recipes=tuple(dict(r, **quiet) for r in g.recipes))
                 for g in spec)


def _high_frequency(x):
    """Mean squared difference of horizontal neighbours per crop: x (..., h, w, C)."""
    return np.mean(np.diff(np.asarray(x), axis=-2) ** 2, axis=(-3, -2, -1))


def test_blur_only_on_first_global_solarisation_only_on_second():
    n = 64
    spec = _geometry_and_blur_only(multicrop.dino_spec(
        augment.simclr_view_config(), global_crops=2, local_crops=2, global_size=28,
        local_size=12))
    # The same crops (same keys) with blur and solarisation off: what each op changed.
    plain = tuple(dataclasses.replace(g, recipes=tuple(
        dict(r, blur_p=0.0, solarize_p=0.0) for r in g.recipes)) for g in spec)
    noise = _images(n) % 115               # below the threshold 0.5: blur shows, solarise not
    bright = jnp.full((n, 28, 28, 1), 204, jnp.uint8)        # 0.8: solarised it is 0.2
    made = jax.jit(lambda x: (multicrop.make_views(jax.random.key(0), x, spec),
                              multicrop.make_views(jax.random.key(0), x, plain)))
    (v_noise, ref), (v_bright, _) = made(noise), made(bright)
    blurred = {k: (_high_frequency(v_noise[k]) < 0.8 * _high_frequency(ref[k])).T for k in ref}
    solarised = {k: np.isclose(np.asarray(v_bright[k])[..., 0, 0, 0], 0.2).T for k in ref}
    assert np.allclose(v_bright["global"][~solarised["global"].T], 0.8)
    assert blurred["global"][0].all() and not solarised["global"][0].any()   # p 1.0; never
    assert 0 < blurred["global"][1].sum() < 0.25 * n                      # p 0.1
    assert 0.1 * n < solarised["global"][1].sum() < 0.35 * n              # p 0.2
    assert 0.3 * 2 * n < blurred["local"].sum() < 0.7 * 2 * n             # p 0.5
    assert not solarised["local"].any()
    # Nothing but these two ops differs: an untouched crop is the reference's.
    keep = ~blurred["global"][1]
    np.testing.assert_array_equal(np.asarray(v_noise["global"])[keep, 1],
                                  np.asarray(ref["global"])[keep, 1])


def test_canvas_crops_come_from_the_valid_region_each_with_its_own_key():
    side, n = 40, 6
    hw = np.array([[40, 40], [20, 33], [13, 40], [40, 9], [25, 25], [31, 17]], np.int32)
    pixels = np.zeros((n, side, side, 1), np.uint8)          # zero outside the image
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(hw):
        pixels[i, :h, :w] = rng.integers(128, 256, (h, w, 1))
    spec = multicrop.uniform_spec(  # crops and flips alone: compiles fast
        augment.simclr_view_config(crop_size=(16, 16), jitter_p=0.0, grayscale_p=0.0,
                                   blur_p=0.0, mean=(0.0,), std=(1.0,)),
        global_crops=2, local_crops=3, local_size=8)
    v = jax.jit(lambda r, x: multicrop.make_views(r, x, spec))(
        jax.random.key(1), canvas.Canvas(jnp.asarray(pixels), jnp.asarray(hw)))
    assert v["global"].shape == (n, 2, 16, 16, 1) and v["local"].shape == (n, 3, 8, 8, 1)
    for x in v.values():
        assert float(x.min()) >= 127 / 255    # no crop reached the zero padding
        for k in range(1, x.shape[1]):         # crops of one image differ: their own keys
            assert not np.allclose(x[:, 0], x[:, k])


# ------------------------------------------------------------- bad input

@pytest.mark.parametrize("make,says", [
    (lambda a: multicrop.uniform_spec(a, global_crops=0, local_crops=6, local_size=12),
     "global_crops=0 (config.multicrop.global_crops): set it to 1 or more"),
    (lambda a: multicrop.dino_spec(a, global_crops=0, local_crops=6),
     "global_crops=0 (config.multicrop.global_crops): set it to 1 or more"),
    (lambda a: multicrop.uniform_spec(a, local_crops=2, local_size=32),
     "local crops of 32x32 are larger than the global crops of 28x28: set local_size "
     "(config.multicrop.local_size) to at most the global size"),
    (lambda a: multicrop.uniform_spec(a, local_crops=2),
     "local_crops > 0 needs local_size"),
    (lambda a: multicrop.uniform_spec(a, local_crops=-1, local_size=8),
     "local_crops=-1 (config.multicrop.local_crops): set it to 0"),
])
def test_bad_spec_is_one_line_naming_the_fix(make, says):
    with pytest.raises(UserError) as e:
        make(augment.simclr_view_config(crop_size=(28, 28)))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_video_pairs_are_refused():
    spec = multicrop.uniform_spec(augment.simclr_view_config(crop_size=(16, 16)))
    with pytest.raises(UserError, match="use positives=frame"):
        multicrop.make_views(jax.random.key(0), pair.Pair(_images(), _images()), spec)
    c = tiny_config()
    c.video = dict(positives="temporal")
    with pytest.raises(UserError, match="use positives=frame"):
        simclr.check(c, None, None)


@pytest.mark.parametrize("fields,says", [
    (dict(global_crops=0), "global_crops=0 (config.multicrop.global_crops): set it to 1 or more"),
    (dict(global_crops=1, local_crops=0), "needs two crops of each image or more"),
    (dict(local_size=40), "to at most the global size"),
])
def test_train_refuses_before_writing(fields, says, tiny_data, tmp_path):
    c = tiny_config(**fields)
    c.dataset, c.data_dir = "tiny_squares", tiny_data
    workdir = tmp_path / "w"
    with pytest.raises(UserError) as e:
        train.train(c, str(workdir))
    assert says in str(e.value) and "\n" not in str(e.value)
    assert not workdir.exists()


def test_two_view_simclr_has_no_multicrop_block():
    # The demo's config (and so its number) stays what it was unless asked for.
    assert "multicrop" not in load_file("configs/simclr.py:dataset=fashion_mnist")
    assert "multicrop" not in load_file("configs/simclr.py:dataset=imagenet2012")
    mc = load_file("configs/simclr.py:dataset=imagenet2012,local_crops=6").multicrop
    assert (mc.global_crops, mc.local_crops, mc.local_size) == (2, 6, 96)
    assert (mc.global_scale, mc.local_scale) == ((0.14, 1.0), (0.05, 0.14))


# ------------------------------------------------------------- the loss

def multicrop_nt_xent_reference(z, t):
    """SwAV's appendix A.8, Eq. 7, one (anchor, positive) pair at a time, in float64: the
    pair's softmax is over the positive and every crop of the other images (the anchor's
    other positives are not negatives). z: (B, V, D)."""
    b, v, _ = z.shape
    z = z.astype(np.float64) / np.linalg.norm(z, axis=-1, keepdims=True)
    total, pairs = 0.0, 0
    for i in range(b):
        for a in range(v):
            others = sum(np.exp(z[i, a] @ z[j, c] / t) for j in range(b) if j != i
                         for c in range(v))
            for c in range(v):
                if c != a:
                    pos = np.exp(z[i, a] @ z[i, c] / t)
                    total += -np.log(pos / (pos + others))
                    pairs += 1
    assert pairs == b * v * (v - 1)
    return total / pairs


def test_two_crops_is_nt_xent():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(6, 2, 5)), jnp.float32)
    f = lambda z: losses.multicrop_nt_xent(z, 0.2)
    g = lambda z: losses.nt_xent(z[:, 0], z[:, 1], 0.2)
    (fv, fm), fg = jax.jit(jax.value_and_grad(f, has_aux=True))(z)
    (gv, gm), gg = jax.jit(jax.value_and_grad(g, has_aux=True))(z)
    np.testing.assert_allclose(fv, gv, rtol=1e-6)
    np.testing.assert_allclose(fg, gg, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fm["contrast_acc"], gm["contrast_acc"])


def test_global_and_local_crops_match_the_equation():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(5, 2 + 3, 4))
    f = jax.jit(lambda z: losses.multicrop_nt_xent(z, 0.3))
    got, _ = f(jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(float(got), multicrop_nt_xent_reference(z, 0.3), rtol=1e-5)
    # Crops of one image pointing one way, of the others other ways: every top-1 a positive.
    easy = np.repeat(np.eye(5)[:, None], 5, axis=1) + 0.01 * rng.normal(size=(5, 5, 5))
    assert float(f(jnp.asarray(easy, jnp.float32))[1]["contrast_acc"]) == 1.0


# ------------------------------------------------------------- a real run

def test_simclr_multicrop_trains_through_the_loop(tiny_data, tmp_path):
    c = tiny_config("local_crops=2", local_size=12)
    c.dataset, c.data_dir = "tiny_squares", tiny_data
    c.batch_size, c.total_steps, c.log_every_steps, c.ckpt_every_steps = 32, 4, 2, 4
    state = jax.device_get(train.train(c, str(tmp_path / "w")))
    assert int(state["step"]) == 4
    log = (tmp_path / "w" / "train.log").read_text()
    assert "loss" in log
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
