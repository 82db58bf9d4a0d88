"""RotNet: the four-rotation views, the NIN encoder, the step schedule, loss and
gradients on 1 vs 8 devices, and one tiny train -> resume -> evaluate run."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ssl_jax import evaluation, experiment, models, optim, parallel
from ssl_jax import config as cfg_lib
from ssl_jax.dataspec import DataSpec
from ssl_jax.methods import rotnet
from ssl_jax.models import nin
from ssl_jax.views import augment
from tests import multidevice
from tests.test_train import train_crash_resume

# A NIN small enough to compile in seconds: block widths 8/7/4, then 8.
TINY_NIN = dict(name="nin", num_blocks=3, width=1 / 24, dtype="float32")


def _config(**model):
    c = cfg_lib.load_file("configs/rotnet.py:dataset=fashion_mnist,runlocal")
    c.model = model or TINY_NIN
    return c


# ------------------------------------------------------------------ views

def test_views_hold_all_four_rotations_of_each_image_interleaved():
    c = _config()
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1)), jnp.uint8)
    # One jit for both: op-by-op dispatch of the crop would dominate the test's time.
    v, light = jax.jit(lambda r, x: (rotnet.views(r, x, c),
                                     augment.batch_views(r, x, rotnet.view_config(c))))(
        jax.random.key(3), images)
    assert v["image"].shape == (20, 28, 28, 1) and v["image"].dtype == jnp.float32
    np.testing.assert_array_equal(v["rotation"], np.tile(np.arange(4), 5))
    x = np.asarray(v["image"]).reshape(5, 4, 28, 28, 1)
    for k in range(4):  # row 4i + k is row 4i rotated by k * 90 degrees, exactly
        np.testing.assert_array_equal(x[:, k], np.rot90(x[:, 0], k, axes=(1, 2)))
    # Rotation 0 is the light view itself: padded crop + flip, no colour change.
    np.testing.assert_allclose(x[:, 0], light, atol=1e-6)
    assert not np.allclose(x[:, 1], x[:, 0])
    raw = (np.asarray(images, np.float32) / 255 - c.aug.mean[0]) / c.aug.std[0]
    assert np.isin(np.round(x[:, 0], 4), np.round(raw, 4)).mean() > 0.9  # pixel values kept


def test_views_refuse_non_square_crops():
    c = _config()
    c.aug.update(crop="resized", crop_size=(28, 24))
    with pytest.raises(ValueError, match="square"):
        jax.eval_shape(lambda: rotnet.views(jax.random.key(0), jnp.zeros((2, 28, 28, 1), jnp.uint8), c))


# ------------------------------------------------------------------ NIN

def _shapes(module, x):
    """Stage shapes through eval_shape: no compilation, so the test stays fast."""
    def f():
        variables = module.init(jax.random.key(0), x, train=True)
        return module.apply(variables, x, train=True, mutable=["batch_stats"])[0]
    return {k: v.shape for k, v in jax.eval_shape(f).items()}


@pytest.mark.parametrize("num_blocks", [3, 4, 5])
def test_nin_stage_shapes(num_blocks):
    net = models.make_encoder("nin", num_blocks=num_blocks)
    expect = {"block1": (2, 16, 16, 96), "block2": (2, 8, 8, 192)}
    expect.update({f"block{i}": (2, 8, 8, 192) for i in range(3, num_blocks + 1)})
    assert _shapes(net, jnp.zeros((2, 32, 32, 3))) == expect
    assert models.stages("nin", num_blocks=num_blocks) == list(expect)
    assert models.final_stage("nin", num_blocks=num_blocks) == f"block{num_blocks}"


def test_nin_width_and_odd_sizes():
    net = models.make_encoder("nin", num_blocks=3, width=0.25)
    assert _shapes(net, jnp.zeros((2, 28, 28, 1))) == {
        "block1": (2, 14, 14, 24), "block2": (2, 7, 7, 48), "block3": (2, 7, 7, 48)}
    variables = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=True))
    assert variables["params"]["block1_conv1"]["kernel"].shape == (5, 5, 1, 48)
    assert variables["params"]["block1_conv2"]["kernel"].shape == (48, 40)  # 1x1 conv as a matmul
    with pytest.raises(ValueError, match="conv="):
        _shapes(models.make_encoder("nin", conv="fft"), jnp.zeros((1, 8, 8, 1)))


@pytest.mark.parametrize("kind,ref", [
    ("max", lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))),
    ("avg", lambda x: nn.avg_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)),
])
def test_pool_matches_pytorch_style_reduce_window(kind, ref):
    for shape in ((2, 7, 9, 3), (1, 8, 8, 2)):
        x = jax.random.normal(jax.random.key(1), shape)
        np.testing.assert_allclose(nin.pool_3x3_s2(x, kind), ref(x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ step schedule

def _opt_cfg(**kw):
    base = dict(lr=0.1, lr_batch_scale=0, schedule="step", decay_factor=0.2)
    return ml_collections.ConfigDict(dict(base, **kw))


def test_step_schedule_values_at_boundaries():
    lr = optim.learning_rate(_opt_cfg(), 128, 100, 0, (30, 60, 80))
    got = [float(lr(s)) for s in (0, 29, 30, 59, 60, 79, 80, 99)]
    np.testing.assert_allclose(got, [0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008], rtol=1e-6)
    warm = optim.learning_rate(_opt_cfg(), 128, 100, 10, (30,))
    np.testing.assert_allclose([float(warm(s)) for s in (0, 5, 10, 29, 30)],
                               [0.0, 0.05, 0.1, 0.1, 0.02], rtol=1e-6)
    # Two boundaries rounding to one step decay twice there.
    np.testing.assert_allclose(float(optim.learning_rate(_opt_cfg(), 1, 9, 0, (3, 3))(3)), 0.004)


def test_step_schedule_from_epochs_and_errors():
    c = _config()
    c.total_steps, c.optimizer.decay_steps, c.batch_size = None, None, 100
    c.total_epochs, c.optimizer.decay_epochs, c.optimizer.lr_batch_scale = 4.0, (1.0, 2.5), 0
    exp = experiment.Experiment(c, DataSpec(1000, (28, 28, 1)), parallel.make_mesh())
    total, lr = exp.total_steps, exp.schedule     # 10 steps per epoch
    assert total == 40
    np.testing.assert_allclose([float(lr(s)) for s in (9, 10, 24, 25)],
                               [0.1, 0.02, 0.02, 0.004], rtol=1e-6)
    assert cfg_lib.steps(c.optimizer, "decay", steps_per_epoch=10, batch_size=100) == (10, 25)
    with pytest.raises(ValueError, match="needs config.optimizer.decay"):
        optim.learning_rate(_opt_cfg(), 1, 10, 0, ())
    with pytest.raises(ValueError, match="schedule='cosine'"):
        optim.learning_rate(_opt_cfg(schedule="cosine"), 1, 10, 0, (5,))
    # cosine is unchanged by the new argument
    cos = optim.learning_rate(_opt_cfg(schedule="cosine"), 1, 50, 5)
    ref = optax.warmup_cosine_decay_schedule(0.0, 0.1, 5, 50, 0.0)
    np.testing.assert_allclose([float(cos(s)) for s in range(50)], [float(ref(s)) for s in range(50)])


# ------------------------------------------------------------------ 1 vs 8 devices

SNIPPET = """
import jax, jax.numpy as jnp
jax.config.update("jax_threefry_partitionable", False)  # as fast_prng (conftest.py)
from ssl_jax import methods, parallel
from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec
spec = DataSpec(16, (28, 28, 1))
out["devices"] = len(jax.devices())
images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1)), jnp.uint8)
c = load_file("configs/rotnet.py:runlocal")
c.model = dict(name="nin", num_blocks=3, width=1 / 24, dtype="float32")
m = methods.get("rotnet")
params = state = None
# A one-device mesh and the eight-device mesh in one process: compiling the
# initialiser once (it dominates) instead of once per process.
for n in (1, 8):
    mesh = parallel.make_mesh(jax.devices()[:n])
    with jax.set_mesh(mesh):
        views = jax.jit(lambda r, x: m.views(r, x, c))(
            jax.random.key(1), jax.device_put(images, parallel.batch_sharding(mesh)))
        # Each device holds its own images' four rotations: 4 x 16 / n rows.
        out[f"{n}/rows_per_device"] = views["image"].addressable_shards[0].data.shape[0]
        if params is None:
            params, state = m.init(jax.random.key(2), views, c, spec)
        p, s = jax.device_put((params, state), parallel.replicated(mesh))
        f = jax.jit(jax.value_and_grad(
            lambda p, s, v: m.loss(p, s, v, {"index": jnp.arange(16)}, jax.random.key(3), c, spec),
            has_aux=True))
        (loss, (metrics, new_state)), grads = f(p, s, views)
    out[f"{n}/loss"], out[f"{n}/acc"], out[f"{n}/view"] = loss, metrics["rot_acc"], views["image"]
    for i, g in enumerate(jax.tree.leaves(grads)):
        out[f"{n}/grad{i}"] = g
    for i, v in enumerate(jax.tree.leaves(new_state)):
        out[f"{n}/state{i}"] = v
"""


def test_loss_gradients_and_bn_state_equal_on_one_and_eight_devices(tmp_path):
    out = multidevice.run(SNIPPET, tmp_path, devices=8)
    assert int(out["devices"]) == 8
    assert int(out["1/rows_per_device"]) == 64 and int(out["8/rows_per_device"]) == 8
    keys = [k[2:] for k in out if k.startswith("1/") and k != "1/rows_per_device"]
    assert len(keys) > 20
    for k in keys:
        np.testing.assert_allclose(out["8/" + k], out["1/" + k], rtol=2e-4, atol=2e-5, err_msg=k)
    assert 0.5 < float(out["1/loss"]) < 5.0  # about log 4 at init


# ------------------------------------------------------------------ end to end

def test_train_resume_evaluate(tiny_data, tmp_path, compilation_cache, fast_prng):
    # compilation_cache (conftest.py): the three runs load one another's compiled steps.
    # The Fashion-MNIST config's encoder, tiny (NIN's multi-device test covers NIN).
    c = _config(name="convnet", widths=(4, 8), dtype="float32", conv="xla")
    c.dataset, c.data_dir = "tiny_squares", tiny_data
    c.batch_size, c.total_steps, c.ckpt_every_steps, c.log_every_steps = 16, 6, 3, 3
    c.optimizer.decay_steps = (4,)  # the decay falls after the resume point
    c.eval.batch_size, c.eval.linear.epochs, c.eval.knn.k, c.eval.mlp.epochs = 64, 5, 20, 2
    _, resumed, workdir = train_crash_resume(c, tmp_path)
    assert sorted(resumed["params"]) == ["encoder", "head"]
    assert resumed["params"]["head"]["Dense_0"]["kernel"].shape == (8, 4)

    # RotNet's evaluation: linear and the paper's non-linear probe on every block.
    results = evaluation.evaluate(workdir, ("linear", "knn", "mlp"), stages="all")
    for name in ("linear", "knn", "mlp"):
        r = results[name]
        assert 0.0 <= r["top1"] <= r["top5"] <= 100.0 and r["step"] == 6
        assert r["top1"] > 25.0  # chance 10%: a swapped split or labels scores ~10%
        assert sorted(r["stages"]) == ["block1", "block2"]


def test_cosine_schedule_of_a_run_too_short_for_its_warm_up():
    """--config.total_steps=1 (or no warm-up) is a valid run: optax refuses decay_steps
    <= warmup_steps, so the schedule keeps one step of each instead of crashing."""
    for total, warmup in ((1, 0), (1, 1), (2, 0), (3, 5)):
        lr = optim.learning_rate(_opt_cfg(schedule="cosine"), 1, total, warmup)
        values = [float(lr(s)) for s in range(total + 1)]
        assert all(np.isfinite(values)) and max(values) <= 0.1 + 1e-7, (total, warmup, values)
