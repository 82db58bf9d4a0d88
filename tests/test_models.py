"""Encoders: stage shapes, ghost-BN semantics, dtype handling, registry errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import models


def _init_apply(module, x, train=True):
    """Shapes and dtypes only (eval_shape): no compilation, so the test stays fast."""
    def f():
        variables = module.init(jax.random.key(0), x, train=True)
        out, _ = module.apply(variables, x, train=train, mutable=["batch_stats"])
        return variables, out
    return jax.eval_shape(f)


def test_convnet_stages_shapes():
    net = models.make_encoder("convnet", widths=(8, 16, 32, 64))
    _, feats = _init_apply(net, jnp.zeros((2, 28, 28, 1)))
    assert {k: v.shape for k, v in feats.items()} == {
        "block1": (2, 14, 14, 8), "block2": (2, 7, 7, 16), "block3": (2, 3, 3, 32),
        "block4": (2, 3, 3, 64)}
    net = models.make_encoder("convnet", widths=(8, 16, 32, 64), last_pool=True)
    assert _init_apply(net, jnp.zeros((2, 28, 28, 1)))[1]["block4"].shape == (2, 1, 1, 64)
    assert models.stages("convnet", widths=(8, 16, 32)) == ["block1", "block2", "block3"]
    assert models.final_stage("convnet", widths=(8, 16, 32)) == "block3"


def test_max_pool_matches_flax():
    x = jax.random.normal(jax.random.key(1), (2, 7, 9, 3))
    ours = models.convnet.max_pool_2x2(x)
    ref = nn.max_pool(x, (2, 2), (2, 2), padding="VALID")
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("name,stem,size,expect", [
    ("resnet18", "small", 32, {"stem": (32, 16), "stage1": (32, 16), "stage2": (16, 32),
                               "stage3": (8, 64), "stage4": (4, 128)}),
    ("resnet50", "imagenet", 64, {"stem": (16, 16), "stage1": (16, 64), "stage2": (8, 128),
                                  "stage3": (4, 256), "stage4": (2, 512)}),
])
def test_resnet_stages(name, stem, size, expect):
    # width 0.25 keeps the test fast; channels scale with it.
    net = models.make_encoder(name, stem=stem, width=0.25)
    variables, feats = _init_apply(net, jnp.zeros((2, size, size, 3)))
    assert {k: (v.shape[1], v.shape[3]) for k, v in feats.items()} == expect
    # Parameters float32 even with bf16 compute.
    net16 = models.make_encoder(name, stem=stem, width=0.25, dtype=jnp.bfloat16)
    v16, f16 = _init_apply(net16, jnp.zeros((2, size, size, 3)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v16["params"]))
    assert f16["stage4"].dtype == jnp.bfloat16


def test_resnet_runs_and_learns_stats():
    net = models.make_encoder("resnet18", stem="small", width=0.125)
    x = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3))
    variables = jax.jit(lambda: net.init(jax.random.key(0), x, train=True))()
    feats, upd = jax.jit(lambda v: net.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
    assert np.isfinite(np.asarray(feats["stage4"])).all()
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), upd["batch_stats"],
                         variables["batch_stats"])
    assert all(jax.tree.leaves(moved))


def test_resnet18_parameter_count():
    # torchvision's resnet18 has 11,176,512 parameters without the fc layer
    # (11,689,512 - 513,000); ours must be the same architecture.
    net = models.make_encoder("resnet18", stem="imagenet")
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=True))
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))
    assert count == 11_176_512


def test_batchnorm_matches_flax_and_ghost_groups():
    x = jax.random.normal(jax.random.key(2), (8, 5, 5, 4)) * 3 + 1
    ours, theirs = models.BatchNorm(), nn.BatchNorm(momentum=0.9, epsilon=1e-5)
    vo = ours.init(jax.random.key(0), x, train=True)
    vt = theirs.init(jax.random.key(0), x, use_running_average=False)
    yo, so = ours.apply(vo, x, train=True, mutable=["batch_stats"])
    yt, st = theirs.apply(vt, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(yo, yt, atol=1e-5)
    np.testing.assert_allclose(so["batch_stats"]["mean"], st["batch_stats"]["mean"], atol=1e-6)
    np.testing.assert_allclose(so["batch_stats"]["var"], st["batch_stats"]["var"], atol=1e-5)
    # groups=2: each half is normalised on its own, as two separate BN calls would.
    g = models.BatchNorm(groups=2)
    yg, _ = g.apply(vo, x, train=True, mutable=["batch_stats"])
    ya, _ = ours.apply(vo, x[:4], train=True, mutable=["batch_stats"])
    yb, _ = ours.apply(vo, x[4:], train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(yg, jnp.concatenate([ya, yb]), atol=1e-5)
    # Eval mode uses the running statistics, not the batch's.
    ye = ours.apply({"params": vo["params"], **so}, x, train=False)
    assert not np.allclose(ye, yo, atol=1e-2)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        models.BatchNorm(groups=3).apply(vo, x, train=True, mutable=["batch_stats"])


def test_mlp_head():
    head = models.MLPHead(hidden=16, out=8, num_layers=3)
    v = head.init(jax.random.key(0), jnp.ones((4, 5)), train=True)
    assert len(v["params"]) == 5  # three Dense, two BN
    z, _ = head.apply(v, jnp.ones((4, 5)), train=True, mutable=["batch_stats"])
    assert z.shape == (4, 8) and z.dtype == jnp.float32


def test_registry_errors():
    with pytest.raises(ValueError, match=r"Unknown encoder 'resnet19'.*resnet18"):
        models.make_encoder("resnet19")
    with pytest.raises(ValueError, match="config.model for 'convnet'"):
        models.make_encoder("convnet", stem="small")


@pytest.mark.usefixtures("fast_prng")  # conftest.py: random draws compile ~10x faster
@pytest.mark.parametrize("kernel,strides,padding,shape", [
    ((3, 3), (1, 1), "SAME", (4, 14, 14, 5)),
    ((3, 3), (2, 2), "SAME", (3, 9, 8, 4)),        # odd sizes: asymmetric SAME padding
    ((7, 7), (2, 2), "SAME", (2, 16, 16, 3)),      # an ImageNet stem
    ((1, 1), (2, 2), "VALID", (2, 8, 8, 6)),       # a ResNet projection shortcut
    ((3, 3), (1, 1), ((2, 0), (1, 1)), (2, 6, 6, 2)),
])
def test_im2col_wgrad_conv_equals_lax_values_and_gradients(kernel, strides, padding, shape):
    from ssl_jax.models import conv
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, kernel + (shape[-1], 7))
    dn = ("NHWC", "HWIO", "NHWC")

    def run(fn):
        f = lambda x, w: fn(x, w, strides, padding, dimension_numbers=dn)
        y, vjp = jax.vjp(f, x, w)
        return (y,) + vjp(jax.random.normal(kd, y.shape))

    ours, ref = run(conv.conv_general_dilated), run(jax.lax.conv_general_dilated)
    for name, a, b in zip(("y", "dx", "dw"), ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()),
                                   err_msg=name)
    # The patches really are the im2col of the input: the forward through them is the conv.
    pads = jax.lax.padtype_to_pads(shape[1:3], kernel, strides, padding) \
        if isinstance(padding, str) else padding
    p = conv.patches(x, kernel, strides, pads)
    np.testing.assert_allclose(p @ w.reshape(-1, 7), ref[0], rtol=1e-4, atol=1e-3)


@pytest.mark.usefixtures("fast_prng")
def test_encoders_train_identically_with_either_conv():
    x = jax.random.normal(jax.random.key(3), (4, 28, 28, 1))
    grads = {}
    for impl in ("xla", "im2col_wgrad"):
        net = models.make_encoder("convnet", widths=(4, 8, 8, 16), conv=impl)
        v = net.init(jax.random.key(0), x, train=True)
        loss = lambda p: jnp.sum(net.apply({**v, "params": p}, x, train=True,
                                           mutable=["batch_stats"])[0]["block4"] ** 2)
        grads[impl] = jax.grad(loss)(v["params"])
    for a, b in zip(jax.tree.leaves(grads["xla"]), jax.tree.leaves(grads["im2col_wgrad"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="conv='cudnn'"):
        models.make_encoder("convnet", conv="cudnn").init(jax.random.key(0), x, train=True)
