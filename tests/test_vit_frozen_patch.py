"""MoCo v3's frozen random patch projection (Chen, Xie & He 2021, sec. 4.2; moco-v3
vits.py `--stop-grad-conv1`): config.optimizer.untrained_params keeps the arrays under a
path at their init for the whole run, without decay and without optimizer state; the
ViT's patch_init="xavier" is MoCo v3's init of that projection; the ImageNet ViT presets
of SimCLR and MoCo use both, and in a real train step the projection stays put while the
rest of the encoder moves."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ssl_jax import experiment, models, optim, parallel
from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec
from ssl_jax.errors import UserError

pytestmark = pytest.mark.usefixtures("fast_prng")

PATCH = "encoder/patch_embed"


def _opt_cfg(**fields):
    # AdamW decaying every parameter (MoCo v3's AdamW(model.parameters())): a decay that
    # reached the untrained arrays would move them even with a zero gradient.
    base = dict(name="adamw", lr=1e-2, lr_batch_scale=0, weight_decay=0.1, b1=0.9, b2=0.999,
                decay_bn=True, decay_bias=True, schedule="constant")
    return ml_collections.ConfigDict(dict(base, **fields))


def _params():
    """{"encoder": a 1-block ViT's parameters, "head": a Dense} on 28x28x1 images."""
    enc = models.make_encoder("vit", patch=7, width=16, depth=1, heads=2, img_size=28)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 28, 28, 1)), jnp.float32)
    params = {"encoder": enc.init(jax.random.key(0), x, train=True)["params"],
              "head": {"kernel": jnp.full((16, 3), 0.1), "bias": jnp.zeros((3,))}}

    def loss(p):
        cls = enc.apply({"params": p["encoder"]}, x, train=True)["block1"].cls
        logits = cls @ p["head"]["kernel"] + p["head"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.arange(8) % 3).mean()
    return params, loss


def _train(opt_cfg, steps=3):
    params, loss = _params()
    tx = optim.make_optimizer(opt_cfg, lambda s: opt_cfg.lr, total_steps=steps)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state
    start = params
    for _ in range(steps):
        params, state = step(params, state)
    return start, params, state


def _leaves(tree, under=None):
    """{path: array} of the tree's leaves, those under the path prefix `under` if given."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if under is None or name.startswith(under + "/"):
            out[name] = np.asarray(leaf)
    return out


def test_untrained_params_stay_at_their_init_bit_for_bit_while_the_rest_moves():
    start, end, _ = _train(_opt_cfg(untrained_params=PATCH))
    frozen = _leaves(start, PATCH)
    assert set(frozen) == {f"{PATCH}/kernel", f"{PATCH}/bias"}
    for name, before in frozen.items():
        np.testing.assert_array_equal(_leaves(end)[name], before, err_msg=name)
    moved = {k for k, v in _leaves(start).items() if not np.array_equal(_leaves(end)[k], v)}
    assert moved == set(_leaves(start)) - set(frozen)  # every other array trained


def test_untrained_params_have_no_optimizer_state():
    """AdamW's moments (mu, nu) exist for the trained arrays only: the state is 2 x the
    trained parameters' size (plus scalar counts), as a torch AdamW over the parameters
    that require a gradient."""
    start, _, state = _train(_opt_cfg(untrained_params=PATCH), steps=1)
    size = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))
    trained = size(start) - size(_leaves(start, PATCH))
    scalars = sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x) == 0)
    assert size(state) - scalars == 2 * trained
    _, _, plain = _train(_opt_cfg(), steps=1)  # without: the moments of every array
    assert size(plain) - scalars == 2 * size(start)


def test_untrained_params_that_name_nothing_are_refused():
    params, _ = _params()
    tx = optim.make_optimizer(_opt_cfg(untrained_params="encoder/conv1"), lambda s: 0.1)
    with pytest.raises(UserError, match="untrained_params='encoder/conv1' names no param"):
        tx.init(params)


# -------------------------------------------------------------- MoCo v3's init

def test_xavier_patch_init_is_moco_v3s_linear_xavier():
    """moco-v3 vits.py: U(+-sqrt(6 / (3 p p + D))) for the kernel, 0 for the bias. A conv's
    xavier (flax's default fans for a (p, p, C, D) kernel) would be sqrt(6 / (p p (C + D))),
    16x narrower here; DINO's conv default 1 / sqrt(p p C)."""
    p, c, d = 16, 3, 384
    enc = models.make_encoder("vit", patch=p, width=d, depth=1, heads=6, img_size=32,
                              patch_init="xavier")
    params = jax.jit(enc.init, static_argnames="train")(
        jax.random.key(0), jnp.zeros((1, 32, 32, c)), train=False)["params"]
    kernel = np.asarray(params["patch_embed"]["kernel"])
    bound = math.sqrt(6 / (p * p * c + d))
    assert kernel.shape == (p, p, c, d)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound
    assert abs(kernel.std() - bound / math.sqrt(3)) < 0.01 * bound  # uniform: bound / sqrt 3
    np.testing.assert_array_equal(params["patch_embed"]["bias"], 0.0)


def test_unknown_patch_init_is_refused():
    enc = models.make_encoder("vit", patch=7, width=16, depth=1, heads=2, img_size=28,
                              patch_init="lecun")
    with pytest.raises(UserError, match=r"patch_init='lecun': use one of \('conv', 'xavier'\)"):
        enc.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)


# -------------------------------------------------------------- the presets, trained

@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_imagenet_vit_presets_freeze_a_xavier_patch_projection(method):
    c = load_file(f"configs/{method}.py:dataset=imagenet2012,model=vit_small")
    assert c.optimizer.untrained_params == PATCH and c.model.patch_init == "xavier"
    other = load_file(f"configs/{method}.py:dataset=cifar10,model=vit_tiny")
    assert "untrained_params" not in other.optimizer  # MoCo v3's recipe only


def test_a_train_step_leaves_the_patch_projection_and_its_key_copy_at_init():
    """MoCo with the ImageNet preset's two fields on a tiny ViT: 2 real train steps. The
    query encoder's projection is its init bit for bit; the key encoder's (an EMA of an
    unmoving copy: m k + (1 - m) k) stays within float rounding of it; every other
    encoder array moved; the optimizer state holds no moment of the projection."""
    c = load_file("configs/moco.py:model=vit_tiny,runlocal")
    c.batch_size = 8
    c.model.update(width=32, heads=2, depth=1, patch_init="xavier")
    c.moco.update(queue_size=16, bn_groups=2)
    c.optimizer.untrained_params = PATCH
    spec = DataSpec(num_examples=64, image_shape=(28, 28, 1), num_classes=10)
    mesh = parallel.make_mesh()
    exp = experiment.Experiment(c, spec, mesh)
    state = exp.initial_state()
    start = jax.device_get(state["params"])
    rng = np.random.default_rng(0)
    step = exp.train_step()
    with jax.set_mesh(mesh):
        for _ in range(2):
            batch = dict(image=rng.integers(0, 256, (8, 28, 28, 1)).astype(np.uint8),
                         index=rng.permutation(64)[:8].astype(np.int32),
                         label=rng.integers(0, 10, 8).astype(np.int32))
            state, _ = step(state, jax.device_put(batch, exp.batch_sharding))
    state = jax.device_get(state)
    frozen = _leaves(start, PATCH)
    for name, before in frozen.items():
        np.testing.assert_array_equal(_leaves(state["params"])[name], before, err_msg=name)
        key = _leaves(state["method_state"]["key_params"])[name]
        np.testing.assert_allclose(key, before, rtol=1e-6, atol=1e-7, err_msg=name)
    encoder = set(_leaves(start, "encoder")) - set(frozen)
    assert all(not np.array_equal(_leaves(state["params"])[k], _leaves(start)[k])
               for k in encoder)
    shapes = {np.shape(x) for x in jax.tree.leaves(state["opt_state"])}
    assert np.shape(frozen[f"{PATCH}/kernel"]) not in shapes
