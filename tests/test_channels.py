"""CMC's channel views (views=channels): Lab as scikit-image's rgb2lab (a NumPy
transcription of its formulas and known colours), CMC's normalisation (train_CMC.py),
the cmc_lab split model (two half-width encoders, L and ab each to its own, stages the
concatenation and each half), the method's loss == multiview.cmc of the two heads'
outputs recomputed outside, the refusals, RECIPES.md's rows, and one train + linear
evaluate on the ImageNet-layout fixture probing both halves and their concatenation."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import evaluation, models, train
from ssl_jax.config import load_file
from ssl_jax.datasets import prepare
from ssl_jax.dataspec import DataSpec
from ssl_jax.errors import UserError
from ssl_jax.methods import network, polyview
from ssl_jax.models.heads import projection_head
from ssl_jax.views import channels
from tests import imagenet_fixture as fx
from tests import test_multiview as ref
from tests import test_recipes

pytestmark = pytest.mark.usefixtures("fast_prng")
B, SIDE = 8, 12
RGB = DataSpec(num_examples=64, image_shape=(SIDE, SIDE, 3))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------- Lab, NumPy from the formulas

def lab_reference(rgb):
    """skimage.color.rgb2lab (colorconv.py: rgb2xyz, xyz2lab; D65, 2 degrees), in NumPy
    float64, one formula at a time."""
    c = np.clip(np.asarray(rgb, np.float64), 0, 1)
    lin = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.412453, 0.357580, 0.180423],
                  [0.212671, 0.715160, 0.072169],
                  [0.019334, 0.119193, 0.950227]])
    t = (lin @ m.T) / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], -1)


# Colours and their Lab from Bruce Lindbloom's calculator, which skimage's own tests hold
# rgb2lab to at 2 decimals (test_colorconv.py test_rgb2lab_brucelindbloom; its matrix rows
# sum to 0.950456, not the white's 0.95047: white's a, b are ~0.005, not 0). The corners of
# the sRGB cube that bound a and b are where CMC's constants come from.
KNOWN = {
    "black": ((0, 0, 0), (0.0, 0.0, 0.0)),
    "white": ((1, 1, 1), (100.0, 0.0, 0.0)),
    "red": ((1, 0, 0), (53.2408, 80.0925, 67.2032)),
    "green": ((0, 1, 0), (87.7347, -86.1827, 83.1793)),
    "blue": ((0, 0, 1), (32.2970, 79.1875, -107.8602)),
    "yellow": ((1, 1, 0), (97.1393, -21.5537, 94.4780)),
    "magenta": ((1, 0, 1), (60.3242, 98.2343, -60.8249)),
}


def test_rgb_to_lab_is_skimages_formulas_and_known_colours():
    rng = np.random.default_rng(0)
    # Random colours, both sides of each piecewise threshold (sRGB 0.04045; f's t 0.008856
    # is reached by dark greys), and values outside [0, 1] (clipped, as uint8 input is).
    x = np.concatenate([rng.uniform(0, 1, (200, 3)), np.full((1, 3), 0.04045 - 1e-4),
                        np.full((1, 3), 0.04045 + 1e-4), np.full((1, 3), 0.08),
                        np.full((1, 3), 0.1), [[-0.2, 0.5, 1.3]]])
    got = np.asarray(jax.jit(channels.rgb_to_lab)(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, lab_reference(x), atol=2e-3)
    for name, (rgb, lab) in KNOWN.items():
        np.testing.assert_allclose(channels.rgb_to_lab(jnp.asarray(rgb, jnp.float32)), lab,
                                   atol=1e-2, err_msg=name)
    # Any leading shape, channels last.
    assert channels.rgb_to_lab(jnp.zeros((2, 4, 5, 3))).shape == (2, 4, 5, 3)


def test_cmc_normalisation_maps_the_gamut_onto_minus_one_one():
    """train_CMC.py's mean / std are each channel's mid-point and half-range over the sRGB
    gamut: black and white are L = -1, +1; green and magenta a = -1, +1; blue and yellow
    b = -1, +1. Swapping a's and b's constants, or using L's for ab, moves them."""
    x = {n: np.asarray(channels.normalize_lab(channels.rgb_to_lab(jnp.asarray(rgb, jnp.float32))))
         for n, (rgb, _) in KNOWN.items()}
    for name, axis, value in (("black", 0, -1), ("white", 0, 1), ("green", 1, -1),
                              ("magenta", 1, 1), ("blue", 2, -1), ("yellow", 2, 1)):
        assert x[name][axis] == pytest.approx(value, abs=1e-4), name
    l, ab = channels.split_lab(jnp.zeros((2, 3, 3, 3)))
    assert l.shape == (2, 3, 3, 1) and ab.shape == (2, 3, 3, 2)


# ------------------------------------------------------------- the split model

class Echo(nn.Module):
    """An 'encoder' whose one stage is its input plus a parameter's zero: what the split
    model hands each half."""

    @nn.compact
    def __call__(self, x, train: bool):
        return {"x": x + self.param("b", nn.initializers.zeros, (x.shape[-1],))}


def _rgb(n=B, seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, SIDE, SIDE, 3))


def test_each_half_sees_its_own_normalised_channels():
    """The split model undoes the view's normalisation, converts to Lab, normalises as CMC
    does and gives L (1 channel) to the L encoder and ab (2) to the ab encoder."""
    rgb = np.asarray(_rgb())
    x = (rgb - np.asarray(MEAN)) / np.asarray(STD)  # the usual normalised view
    m = models.LabSplit(l_encoder=Echo(), ab_encoder=Echo(), mean=MEAN, std=STD)
    out, _ = m.init_with_output(jax.random.key(0), jnp.asarray(x), train=False)
    want = (lab_reference(rgb) - np.asarray(channels.LAB_MEAN)) / np.asarray(channels.LAB_STD)
    np.testing.assert_allclose(out["l_x"], want[..., :1], atol=1e-4)
    np.testing.assert_allclose(out["ab_x"], want[..., 1:], atol=1e-4)
    np.testing.assert_allclose(out["x"], want, atol=1e-4)


CONVNET = dict(widths=(8, 16), conv="xla")


def _split(encoder="convnet", **fields):
    return models.make_encoder("cmc_lab", encoder=encoder, mean=MEAN, std=STD,
                               **(fields or CONVNET))


def _params(name, channels_in, **fields):
    """The parameter shapes of encoder `name` on (2, SIDE, SIDE, channels_in) images."""
    x = jnp.zeros((2, SIDE, SIDE, channels_in))
    return jax.eval_shape(lambda: models.make_encoder(name, **fields).init(
        jax.random.key(0), x, train=False))["params"]


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("encoder,full,half", [
    ("convnet", CONVNET, dict(widths=(4, 8), conv="xla")),
    ("resnet18", dict(stem="small", width=0.5), dict(stem="small", width=0.25)),
])
def test_two_separate_encoders_of_half_width(encoder, full, half):
    """Each half has the parameters of the encoder at half the width on its own number of
    input channels (the authors' resnet50(in_channel=1 | 2, width=0.5)); shapes only."""
    split = _params("cmc_lab", 3, encoder=encoder, mean=MEAN, std=STD, **full)
    assert set(split) == {"l_encoder", "ab_encoder"}
    for name, c in (("l_encoder", 1), ("ab_encoder", 2)):
        assert (jax.tree.map(jnp.shape, split[name])
                == jax.tree.map(jnp.shape, _params(encoder, c, **half))), name
    # Two halves of width w/2: about half the parameters of one encoder of width w.
    ratio = _count(split) / _count(_params(encoder, 3, **full))
    assert 0.4 < ratio < 0.6, ratio


def test_stages_are_the_concatenation_and_each_half():
    m = _split()
    assert models.stages("cmc_lab", encoder="convnet", widths=(8, 16)) == [
        "l_block1", "l_block2", "ab_block1", "ab_block2", "block1", "block2"]
    assert models.final_stage("cmc_lab", encoder="convnet", widths=(8, 16)) == "block2"
    variables = m.init(jax.random.key(0), _rgb(), train=False)
    apply = jax.jit(lambda v, x: m.apply(v, x, train=False))
    out = apply(variables, _rgb(seed=1))
    for s in ("block1", "block2"):
        np.testing.assert_array_equal(out[s], jnp.concatenate([out[f"l_{s}"], out[f"ab_{s}"]], -1))
        assert out[f"l_{s}"].shape == out[f"ab_{s}"].shape
    # Separate parameters: changing the ab encoder's changes the ab half only.
    v2 = jax.tree.map(lambda x: x, variables)
    v2["params"]["ab_encoder"] = jax.tree.map(lambda p: p * 1.5 + 0.1, v2["params"]["ab_encoder"])
    out2 = apply(v2, _rgb(seed=1))
    np.testing.assert_array_equal(out2["l_block2"], out["l_block2"])
    assert not np.allclose(out2["ab_block2"], out["ab_block2"])


def test_split_refuses_what_it_cannot_halve():
    with pytest.raises(UserError, match="built for the ConvNet, ResNets and NIN"):
        _split("vit_tiny")
    with pytest.raises(UserError, match="needs the 3-channel RGB mean and std"):
        models.make_encoder("cmc_lab", encoder="convnet")


# ------------------------------------------------------------- the method

def tiny_config(arg="dataset=cifar10"):
    c = load_file(f"configs/cmc.py:{arg},views=channels,model=convnet,runlocal")
    c.batch_size = B
    c.model.update(widths=(4, 8), conv="xla", dtype="float32")
    c.aug.crop_size = (SIDE, SIDE)
    c.head.update(layers=2, hidden=16, dim=8, hidden_bn=True)  # BN: the batch's statistics
    return c


def test_channels_config():
    c = load_file("configs/cmc.py:dataset=imagenet2012,views=channels")
    assert c.model.to_dict() == dict(name="cmc_lab", encoder="resnet50", stem="imagenet",
                                     width=1.0, dtype="bfloat16", mean=MEAN, std=STD)
    assert (c.views.kind, c.views.count, c.multiview.loss, c.cmc.graph) == (
        "channels", 2, "cmc", "core")
    view = polyview.augment_config(c)  # crop and flip only (train_CMC.py)
    assert (view.jitter_p, view.grayscale_p, view.blur_p, view.flip_p) == (0.0, 0.0, 0.0, 0.5)
    # The crops preset is unchanged.
    assert load_file("configs/cmc.py:dataset=imagenet2012").model.name == "resnet50"


def test_loss_is_cmc_of_the_two_heads_outputs():
    """One crop of each image; z[:, 0] = the L head on the L half's pooled final stage,
    z[:, 1] = the ab head (its own parameters) on the ab half's, recomputed here from the
    encoder's features; the loss is multiview.cmc's L(L, ab) + L(ab, L) of them (NumPy)."""
    c = tiny_config()
    c.multiview.temperature = 0.3
    images = jax.random.randint(jax.random.key(3), (B, 16, 16, 3), 0, 256).astype(jnp.uint8)
    views = jax.jit(lambda r, x: polyview.views(r, x, c))(jax.random.key(0), images)
    assert set(views) == {"global"} and views["global"].shape == (B, 1, SIDE, SIDE, 3)
    params, state = polyview.init(jax.random.key(1), views, c, RGB)
    assert set(params) == {"encoder", "l_head", "ab_head"}

    @jax.jit
    def run(params, state, views):
        x = views["global"][:, 0]
        feats, _ = network.make_encoder(c.model).apply(
            {"params": params["encoder"], "batch_stats": state["batch_stats"]["encoder"]},
            x, train=True, mutable=["batch_stats"])
        head = projection_head(c.head)
        z = [head.apply({"params": params[f"{h}_head"],
                         "batch_stats": state["batch_stats"][f"{h}_head"]},
                        models.summary(feats[f"{h}_block2"]), train=True,
                        mutable=["batch_stats"])[0] for h in ("l", "ab")]
        loss, (metrics, _) = polyview.loss(params, state, views, {}, None, c, RGB)
        return jnp.stack(z, 1), loss, metrics

    z, loss, metrics = run(params, state, views)
    np.testing.assert_allclose(float(loss), ref.cmc_reference(np.asarray(z), 0.3, [(0, 1)]),
                               rtol=2e-5)
    assert float(metrics["pairs"]) == 1.0
    # The two heads differ (separate parameters), so z's views are not one head's twice.
    assert not np.allclose(z[:, 0], z[:, 1])


@pytest.mark.parametrize("spec,says", [
    ("configs/cmc.py:dataset=fashion_mnist,views=channels", "fashion_mnist has one channel "
     "(grey): there is no ab to split off"),
    ("configs/cmc.py:dataset=cifar10,views=channels,model=vit_tiny", "built for the ConvNet"),
    ("configs/cmc.py:dataset=cifar10,views=channels,local_crops=2", "drop local_crops"),
])
def test_config_refusals_in_one_line(spec, says):
    with pytest.raises(UserError) as e:
        load_file(spec)
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("field,value,says", [
    ("model.mean", (0.5, 0.5, 0.5), "config.model.mean=(0.5, 0.5, 0.5) differs from config.aug"),
    ("views.count", 3, "the views are the two channel groups"),
])
def test_check_refuses_a_split_model_out_of_step(field, value, says):
    c = tiny_config()
    node, key = field.split(".")
    c[node][key] = value
    with pytest.raises(UserError, match=re.escape(says)):
        polyview.check(c, RGB, None)
    c = tiny_config()
    c.model = dict(name="convnet", widths=(4, 8))
    with pytest.raises(UserError, match="needs model cmc_lab"):
        polyview.check(c, RGB, None)


def test_train_refuses_a_grey_dataset_before_writing(tiny_data, tmp_path):
    """The channels config moved onto grey data (its normalisation made 1-channel, so that
    the generic check of config.aug against the data passes): the method says why."""
    c = tiny_config()
    c.dataset, c.data_dir = "tiny_squares", tiny_data
    c.aug.update(mean=(0.5,), std=(0.25,))
    with pytest.raises(UserError) as e:
        train.train(c, str(tmp_path / "w"))
    assert "tiny_squares has one channel (grey): there is no ab to split off" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "w").exists()


# ------------------------------------------------------------- RECIPES.md

def channel_rows(spec="configs/cmc.py:dataset=imagenet2012,views=channels"):
    rows, on = [], False
    for line in open(f"{test_recipes.ROOT}/RECIPES.md"):
        if line.startswith("#"):
            on = line.startswith("### ") and f"`{spec}`" in line
        elif on and line.startswith("|") and not re.match(r"\|\s*-", line):
            cells = test_recipes._cells(line)
            if cells[0] != "setting":
                rows.append(cells)
    return rows


def test_recipes_channel_rows_are_the_preset():
    c = load_file("configs/cmc.py:dataset=imagenet2012,views=channels")
    view = dict(polyview.augment_config(c).to_dict())
    checked = 0
    for setting, field, reference, ours, status in channel_rows():
        key, value = re.fullmatch(r"`([\w.]+)`", field), test_recipes._literal(ours)
        if not key or value is None:
            continue
        got = view[key[1][5:]] if key[1].startswith("view.") else test_recipes.resolve(c, key[1])
        assert test_recipes._equal(got, value), (setting, got, value)
        if status == "same":
            assert test_recipes._equal(test_recipes._literal(reference), value), setting
        checked += 1
    assert checked >= 10, checked


# ------------------------------------------------------------- a real run

def test_trains_and_probes_each_half_on_the_imagenet_layout(tmp_path):
    """The ImageNet-layout fixture (coloured striped classes, JPEGs of varying size, some
    grey or CMYK) prepared as imagenet2012: a few steps, then a linear probe of the
    concatenation and of each half at every stage."""
    fx.make_ilsvrc(tmp_path / "manual", synsets=3, train_per_class=16, val=24)
    data_dir = str(tmp_path / "tfds")
    prepare.prepare("imagenet2012", data_dir, manual_dir=str(tmp_path / "manual"))
    c = tiny_config("dataset=imagenet2012")
    c.data_dir, c.data.canvas = data_dir, 64
    c.batch_size, c.total_steps, c.log_every_steps, c.ckpt_every_steps = 16, 4, 2, 4
    c.eval.batch_size, c.eval.linear.epochs = 24, 3
    workdir = str(tmp_path / "w")
    state = jax.device_get(train.train(c, workdir))
    assert int(state["step"]) == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    r = evaluation.evaluate(workdir, ("linear",), stages=["all"])["linear"]
    assert sorted(r["stages"]) == sorted(models.stages("cmc_lab", encoder="convnet",
                                                       widths=(4, 8)))
    assert r["stage"] == "block2" and r["step"] == 4
    for s in r["stages"].values():
        assert 0.0 <= s["top1"] <= s["top5"] <= 100.0
