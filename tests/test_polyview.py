"""The M-view method (ssl_jax/methods/polyview.py: "polyview", "cmc") and its configs:
M views of each image made, one encoder call per resolution group, the loss the config
picks equal to the paper's loss (NumPy, tests/test_multiview.py) of head outputs
recomputed outside the method, M = 2 Poly-View == SimCLR's multi-crop step, CMC's NCE
with memory banks against the authors' code (NumPy), the configs' arguments and
refusals, one tiny train + evaluate (RECIPES.md's tables: tests/test_recipes.py)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import evaluation, methods, multiview, train
from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec
from ssl_jax.errors import UserError
from ssl_jax.methods import memory, network, polyview, simclr
from tests import test_multiview as ref
from tests import test_train
from tests.test_precision import equations

pytestmark = pytest.mark.usefixtures("fast_prng")
B = 8
GREY = DataSpec(num_examples=64, image_shape=(28, 28, 1))


def tiny_config(arg="", path="configs/polyview.py"):
    c = load_file(f"{path}:runlocal{',' + arg if arg else ''}")
    c.batch_size = B
    c.model.update(widths=(4, 8), conv="xla")  # compiles in half the time
    c.head.hidden, c.head.dim = 16, 8
    return c


def _images(n=B, side=28, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, side, side, 1), np.uint8))


# ------------------------------------------------------------- views and encoder calls

def test_views_are_m_crops_of_each_image_with_their_own_keys():
    c = tiny_config("views=3")
    v = jax.jit(lambda r, x: polyview.views(r, x, c))(jax.random.key(0), _images())
    assert set(v) == {"global"} and v["global"].shape == (B, 3, 28, 28, 1)
    g = np.asarray(v["global"])
    assert not np.allclose(g[:, 0], g[:, 1]) and not np.allclose(g[:, 1], g[:, 2])
    c.views.update(local_crops=2, local_size=12)
    v = jax.eval_shape(lambda r, x: polyview.views(r, x, c), jax.random.key(0), _images())
    assert v["global"].shape == (B, 3, 28, 28, 1) and v["local"].shape == (B, 2, 12, 12, 1)


def _first_layer_inputs(config):
    """The input shapes of the encoder's first convolution (the kernel fed by the image's
    one channel) in the method's loss: one per encoder call."""
    m = methods.get(config.method)  # traced only: shapes, nothing compiled
    views = jax.eval_shape(lambda x: m.views(jax.random.key(0), x, config), _images())
    params, state = jax.eval_shape(lambda v: m.init(jax.random.key(1), v, config, GREY), views)
    jaxpr = jax.make_jaxpr(lambda p, s, v: m.loss(p, s, v, {}, None, config, GREY)[0])(
        params, state, views)
    return sorted(tuple(e.invars[0].aval.shape) for e in equations(jaxpr.jaxpr)
                  if e.primitive.name == "conv_general_dilated" and e.invars[1].aval.shape[2] == 1)


@pytest.mark.parametrize("path,m,local", [("configs/polyview.py", 4, 0),
                                          ("configs/cmc.py", 3, 0),
                                          ("configs/polyview.py", 2, 3)])
def test_encoder_runs_once_per_resolution_group(path, m, local):
    c = tiny_config(f"views={m}", path)
    if local:
        c.views.update(local_crops=local, local_size=12)
    want = [(B * m, 28, 28, 1)] + ([(B * local, 12, 12, 1)] if local else [])
    assert _first_layer_inputs(c) == sorted(want)


# ------------------------------------------------------------- the loss the config picks

# (config path, argument, its fields, NumPy reference of z (K, M, D) at temperature t)
CASES = {
    "polyview geometric": ("configs/polyview.py", "", {},
                           lambda z, t: ref.polyview_reference(z, t, "geometric")),
    "polyview arithmetic": ("configs/polyview.py", "variant=arithmetic", {},
                            lambda z, t: ref.polyview_reference(z, t, "arithmetic")),
    "cmc core": ("configs/cmc.py", "", {}, lambda z, t: ref.cmc_reference(z, t, [(0, 1), (0, 2)])),
    "cmc full": ("configs/cmc.py", "graph=full", {},
                 lambda z, t: ref.cmc_reference(z, t, [(0, 1), (0, 2), (1, 2)])),
    "mv_infonce": ("configs/polyview.py", "", {"loss": "mv_infonce"}, ref.mv_infonce_reference),
    "mv_dhel": ("configs/cmc.py", "", {"loss": "mv_dhel"}, ref.mv_dhel_reference),
}


def test_the_loss_is_the_configs_loss_of_the_head_outputs():
    """Each config's loss through the method == the paper's loss (NumPy) of z computed
    outside the method: the network applied to the M views of each image as one batch
    (BN over all B x M crops), in view order. The six values differ, so a config that
    reached the wrong loss would fail."""
    configs = {}
    for name, (path, arg, fields, _) in CASES.items():
        c = tiny_config(",".join(filter(None, ("views=3", arg))), path)
        c.head.update(layers=2, hidden_bn=True, out_bn=True)  # one network for all six
        c.multiview.update(temperature=0.3, **fields)
        configs[name] = c
    c0 = configs["polyview geometric"]
    views = jax.jit(lambda r, x: polyview.views(r, x, c0))(jax.random.key(0), _images())
    params, state = polyview.init(jax.random.key(1), views, c0, GREY)

    @jax.jit
    def run(params, state, views):
        x = views["global"].reshape((B * 3, 28, 28, 1))
        _, z, _ = network.apply(network.make_network(c0), params, state["batch_stats"], x)
        got = {name: polyview.loss(params, state, views, {}, None, c, GREY)[0]
               for name, c in configs.items()}
        return z.reshape((B, 3, -1)), got

    z, got = run(params, state, views)
    want = {name: case[3](np.asarray(z), 0.3) for name, case in CASES.items()}
    for name in CASES:
        np.testing.assert_allclose(float(got[name]), want[name], rtol=2e-5, err_msg=name)
    values = sorted(want.values())
    assert min(np.diff(values)) > 1e-3, want


def test_two_view_polyview_step_is_simclrs_multicrop_step():
    """M = 2: the same views, parameters, loss and gradient as SimCLR with multi-crop (2
    global crops, no local ones). (The arithmetic variant at M = 2 is the same loss:
    tests/test_multiview.py, test_polyview_at_two_views_is_nt_xent.)"""
    s = load_file("configs/simclr.py:runlocal")
    s.batch_size = B
    s.model.update(widths=(4, 8), conv="xla")
    s.head.hidden, s.head.dim = 16, 8
    s.multicrop = dict(global_crops=2, local_crops=0, local_size=12, global_scale=None,
                       local_scale=(0.05, 0.14))
    s.simclr.temperature = 0.3
    rng, images = jax.random.key(2), _images()

    def step(method, config):
        views = jax.jit(lambda r, x: method.views(r, x, config))(rng, images)
        params, state = method.init(jax.random.key(1), views, config, GREY)
        f = jax.jit(jax.value_and_grad(
            lambda p: method.loss(p, state, views, {}, None, config, GREY)[0]))
        return views, params, f(params)

    sv, sp, (sl, sg) = step(simclr.METHOD, s)
    p = tiny_config("views=2")
    p.multiview.temperature = 0.3
    pv, pp, (pl, pg) = step(polyview.METHOD, p)
    np.testing.assert_array_equal(pv["global"], sv["global"])
    jax.tree.map(np.testing.assert_array_equal, pp, sp)
    np.testing.assert_allclose(pl, sl, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), pg, sg)


# ------------------------------------------------------------- CMC's NCE with memory banks

@pytest.mark.parametrize("m,graph,momentum", [(2, "core", 0.5), (3, "full", 0.3)])
def test_nce_two_steps_banks_z_and_loss_are_the_authors(m, graph, momentum):
    """The method's NCE step (polyview._nce_loss) twice on fixed embeddings == NCEAverage +
    NCECriterion (NumPy, tests/test_multiview.py): the loss, Z set on the first batch and
    kept on the second, and each view's bank rows of the batch moved with the momentum
    (CMC's 0.5; 0.3 tells m from 1 - m) and renormalised, the other rows untouched."""
    c = tiny_config(f"objective=nce,graph={graph},views={m}", "configs/cmc.py")
    c.cmc.nce_k, c.cmc.nce_momentum, c.multiview.temperature = 7, momentum, 0.2
    rng, n, b, d = np.random.default_rng(21), 40, 6, 5
    banks, z_consts = ref.authors_bank(rng, m, n, d), {}
    state = {"banks": {f"view{v}": jnp.asarray(banks[v], jnp.float32) for v in range(m)},
             "log_z": jnp.full((m, m), -jnp.inf)}
    step = jax.jit(lambda z, s, i, r: polyview._nce_loss(z, s, i, r, c, n))
    for t in range(2):
        y, key = rng.permutation(n)[:b], jax.random.key(t)
        z = rng.normal(size=(b, m, d))
        if t:  # near their own rows: the second batch would estimate another Z
            z = banks[:, y].transpose(1, 0, 2) + 0.1 * z
        negs = np.asarray(memory.sample_negatives(key, 7, n))
        idx = np.concatenate([y[:, None], np.broadcast_to(negs, (b, 7))], axis=1)
        want, new_banks, z_consts = ref.nce_average_reference(
            z, banks, y, idx, z_consts, 0.2, momentum, n, multiview.cmc_pairs(m, graph))
        got, metrics, state = step(jnp.asarray(z, jnp.float32), state, jnp.asarray(y), key)
        np.testing.assert_allclose(float(got), want, rtol=1e-5, err_msg=f"step {t}")
        for (a, q), value in z_consts.items():
            np.testing.assert_allclose(np.exp(float(state["log_z"][a, q])), value, rtol=1e-5)
        for v in range(m):
            np.testing.assert_allclose(state["banks"][f"view{v}"], new_banks[v], rtol=1e-5,
                                       atol=1e-6, err_msg=f"step {t} bank {v}")
        rest = np.setdiff1d(np.arange(n), y)
        np.testing.assert_array_equal(new_banks[:, rest], banks[:, rest])
        assert 0.0 <= float(metrics["contrast_acc"]) <= 1.0
        banks = new_banks


def test_nce_state_init_and_sharding():
    c = tiny_config("objective=nce,views=3", "configs/cmc.py")
    c.cmc.pad_to = 48
    views = jax.eval_shape(lambda x: polyview.views(jax.random.key(0), x, c), _images())
    _, state = jax.eval_shape(lambda v: polyview.init(jax.random.key(1), v, c, GREY), views)
    assert {k: v.shape for k, v in state["banks"].items()} == {
        f"view{v}": (96, 8) for v in range(3)}  # 64 rows padded to 48's multiple, head.dim
    assert state["log_z"].shape == (3, 3)
    _, state = polyview.init(jax.random.key(1), jax.tree.map(jnp.zeros_like, views), c, GREY)
    assert np.isneginf(state["log_z"]).all()
    assert not np.allclose(state["banks"]["view0"], state["banks"]["view1"])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    shardings = polyview.state_sharding(jax.tree.map(lambda x: x, state), mesh)
    assert shardings["banks"]["view2"].spec == jax.sharding.PartitionSpec("data")
    assert shardings["log_z"].spec == jax.sharding.PartitionSpec()


@pytest.mark.parametrize("fields,says", [
    ({"cmc.objective": "nce", "multiview.loss": "mv_dhel"}, "set it to 'cmc'"),
    ({"cmc.objective": "nce", "views.local_crops": 2}, "local crops have none"),
    ({"cmc.objective": "nce", "cmc.nce_k": 0}, "config.cmc.nce_k=0"),
    ({"cmc.objective": "nce", "cmc.nce_momentum": 1.0}, "config.cmc.nce_momentum=1.0"),
    ({"cmc.objective": "nce", "cmc.pad_to": 100}, "do not split over 8 devices"),
    ({"cmc.objective": "memory"}, "config.cmc.objective='memory'"),
])
def test_nce_settings_refused_in_one_line(fields, says):
    c = tiny_config("objective=nce", "configs/cmc.py")
    for field, value in fields.items():
        node, key = field.split(".")
        c[node][key] = value
    mesh = type("Mesh", (), {"devices": np.zeros(8)})  # check reads the device count only
    with pytest.raises(UserError) as e:
        polyview.check(c, DataSpec(num_examples=60, image_shape=(28, 28, 1)), mesh)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_nce_trains_on_fashion_mnist_and_resumes(fashion_mnist_dir, tmp_path):
    """A few runlocal-sized steps of CMC's NCE on the real Fashion-MNIST (60,000 bank rows
    per view): the loss finite, and a crash after the step-2 checkpoint resumes to the
    same state bit for bit, banks and Z included (test_train.train_crash_resume)."""
    c = tiny_config("objective=nce", "configs/cmc.py")
    c.dataset, c.data_dir = "fashion_mnist", fashion_mnist_dir
    c.batch_size, c.total_steps, c.log_every_steps, c.ckpt_every_steps = 16, 4, 1, 2
    full, _, workdir = test_train.train_crash_resume(c, tmp_path, crash_after=2)
    s = full["method_state"]
    assert sorted(s["banks"]) == [f"view{v}" for v in range(4)]
    assert s["banks"]["view0"].shape == (60416, 8)  # 60,000 rows padded to 1024's multiple
    off = ~np.eye(4, dtype=bool)
    core = np.zeros((4, 4), bool)
    core[0, 1:] = core[1:, 0] = True  # view 0 against each other view, both ways
    assert np.isfinite(s["log_z"][core]).all() and np.isneginf(s["log_z"][off & ~core]).all()
    with open(f"{workdir}/metrics.jsonl") as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    assert len(losses) >= 4 and np.isfinite(losses).all() and min(losses) > 0, losses


# ------------------------------------------------------------- the configs

def test_presets_and_arguments():
    fm = load_file("configs/polyview.py:dataset=fashion_mnist")
    assert (fm.method, fm.multiview.loss, fm.polyview.variant) == ("polyview", "polyview",
                                                                   "geometric")
    # Ours: K x M = SimCLR's 2 x 128 and its number of steps (2.5 epochs of 128).
    assert (fm.views.count, fm.batch_size, fm.total_epochs) == (4, 64, 1.25)
    for m in (2, 8):
        c = load_file(f"configs/polyview.py:views={m}")
        assert c.views.count == m and c.batch_size * m == 256
        assert c.total_epochs / c.batch_size == pytest.approx(2.5 / 128)
    assert load_file("configs/polyview.py:variant=arithmetic").polyview.variant == "arithmetic"
    cmc = load_file("configs/cmc.py:dataset=fashion_mnist,graph=full,views=3")
    assert (cmc.method, cmc.multiview.loss, cmc.cmc.graph, cmc.views.count) == (
        "cmc", "cmc", "full", 3)
    assert "polyview" not in cmc and "simclr" not in cmc and "simclr" not in fm
    local = load_file("configs/polyview.py:local_crops=2")
    assert (local.views.local_crops, local.views.local_size) == (2, 12)


@pytest.mark.parametrize("spec,says", [
    ("configs/polyview.py:variant=harmonic", "Poly-View's variants are geometric and arithmetic"),
    ("configs/cmc.py:graph=ring", "CMC's graphs are core"),
    ("configs/polyview.py:views=1", "give M >= 2 views"),
    ("configs/cmc.py:views=0", "give M >= 2 views"),
    ("configs/polyview.py:views=four", "give M >= 2 views"),
    ("configs/cmc.py:dataset=fashion_mnist,views=channels", "fashion_mnist has one channel"),
    ("configs/polyview.py:dataset=cifar10,views=channels", "configs/cmc.py:views=channels"),
])
def test_config_arguments_refused_in_one_line(spec, says):
    with pytest.raises(UserError) as e:
        load_file(spec)
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("field,value,says", [
    ("polyview.variant", "harmonic", "config.polyview.variant='harmonic'"),
    ("cmc.graph", "ring", "config.cmc.graph='ring'"),
    ("views.count", 1, "config.views.count=1: the M-view losses need M >= 2"),
    ("multiview.loss", "nt_xent", "config.multiview.loss='nt_xent'"),
    ("views.kind", "channels", "tiny_squares has one channel"),
    ("views.kind", "depth", "config.views.kind='depth'"),
])
def test_train_refuses_before_writing(field, value, says, tiny_data, tmp_path):
    """--config.<field>=<value> past the config's own argument checks: the method's check
    refuses it in one line before anything is written or compiled."""
    c = tiny_config("", "configs/cmc.py" if field == "cmc.graph" else "configs/polyview.py")
    c.dataset, c.data_dir = "tiny_squares", tiny_data
    node, key = field.split(".")
    c[node][key] = value
    workdir = tmp_path / "w"
    with pytest.raises(UserError) as e:
        train.train(c, str(workdir))
    assert says in str(e.value) and "\n" not in str(e.value)
    assert not workdir.exists()


# ------------------------------------------------------------- a real run

def test_polyview_trains_and_evaluates(tiny_data, tmp_path):
    c = tiny_config("views=3")
    c.dataset, c.data_dir = "tiny_squares", tiny_data
    c.batch_size, c.total_steps, c.log_every_steps, c.ckpt_every_steps = 32, 4, 2, 4
    c.eval.batch_size, c.eval.linear.epochs = 64, 3
    workdir = str(tmp_path / "w")
    state = jax.device_get(train.train(c, workdir))
    assert int(state["step"]) == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    with open(f"{workdir}/train.log") as f:
        log = f.read()
    assert "polyview" in log and "contrast_acc" in log
    r = evaluation.evaluate(workdir, ("linear",))["linear"]
    assert r["step"] == 4 and 0.0 <= r["top1"] <= r["top5"] <= 100.0
