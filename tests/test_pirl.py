"""NPID and PIRL through the network: the same loss, gradients and new state
(memory bank included) on 1 and on 8 devices for the same global batch and key;
the loss of two steps and the moved bank against NumPy (Z fixed after the first
step); one tiny train -> resume -> evaluate run."""
import functools
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import evaluation, experiment, parallel
from ssl_jax.config import load_file
from ssl_jax.data import sources
from ssl_jax.dataspec import DataSpec
from ssl_jax.methods import pirl
from ssl_jax.views import augment
from tests import multidevice, test_train
from tests.test_memory import _nce_reference, _normalize

B, N = 16, 100
A, LAM = 0.8, 0.25  # bank momentum, jigsaw weight: a != 1 - a, lam != 1 - lam (0.5 hides swaps)
SPEC = DataSpec(num_examples=N, image_shape=(28, 28, 1))  # the bank's rows come from here
# A global batch of dataset indices, with one duplicate (the bank's policy applies).
INDICES = np.array([3, 97, 50, 12, 64, 3, 28, 71, 5, 99, 40, 86, 17, 33, 58, 0], np.int32)


pytestmark = pytest.mark.usefixtures("fast_prng")  # conftest.py


def small_config(name):
    c = load_file(f"configs/{name}.py:runlocal")
    c.model.widths, c.model.conv = (4, 8), "xla"  # compiles in half the time
    c.head.dim = 8
    c.memory.update(pad_to=8, negatives=64, momentum=A)
    if "pirl" in c:
        c.pirl.jigsaw_weight = LAM
    return c


@functools.cache  # one compilation per method and process
def _loss_fn(name):
    c = small_config(name)
    return jax.jit(jax.value_and_grad(
        lambda p, s, v, i: pirl.loss(p, s, v, {"index": i}, jax.random.key(3), c, SPEC),
        has_aux=True))


def _flat(prefix, tree):
    return {f"{prefix}{jax.tree_util.keystr(k)}": np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _npid_inputs(params, state, views):
    """PIRL's params, state and views restricted to NPID's: no jigsaw branch."""
    return ({k: params[k] for k in ("encoder", "head")},
            dict(state, log_z={"image": state["log_z"]["image"]}), {"image": views["image"]})


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """Runs both methods here (one device); saves their inputs for the 8-device run."""
    c = small_config("pirl")
    # Stand-ins for the views (their shapes are pinned by test_views_shapes): the
    # augmentations are tested in their own modules and cost ~45 s to compile here.
    rng = np.random.default_rng(0)
    views = {k: jnp.asarray(rng.normal(size=(B,) + s.shape[1:]), jnp.float32)
             for k, s in _view_shapes("pirl").items()}
    params, state = pirl.init(jax.random.key(2), views, c, SPEC)
    inputs = {"pirl": (params, state, views), "npid": _npid_inputs(params, state, views)}
    out = {}
    for name, (p, s, v) in inputs.items():
        (loss, (metrics, new_state)), grads = _loss_fn(name)(p, s, v, INDICES)
        # A second step from the new state: Z must not be re-estimated.
        (loss2, (metrics2, _)), _ = _loss_fn(name)(p, new_state, v, INDICES[::-1].copy())
        # f and g of a plain forward pass (train-mode BN), for the NumPy references.
        (_, f, g), _ = jax.jit(lambda p, s, v: pirl._net(small_config(name)).apply(
            {"params": p, "batch_stats": s["batch_stats"]}, v["image"], v.get("tiles"),
            train=True, mutable=["batch_stats"]))(p, s, v)
        out[name] = dict(loss=loss, metrics=metrics, loss2=loss2, metrics2=metrics2, f=f, g=g,
                         **_flat("grad", grads), **_flat("state", new_state))
    path = str(tmp_path_factory.mktemp("inputs") / "inputs.pkl")
    with open(path, "wb") as f:
        pickle.dump(jax.device_get(inputs), f)
    return out, inputs, path


def _view_shapes(name):
    images = jax.ShapeDtypeStruct((B, 28, 28, 1), jnp.uint8)
    return jax.eval_shape(lambda x: pirl.views(jax.random.key(1), x, small_config(name)), images)


def test_views_shapes():
    assert {k: v.shape for k, v in _view_shapes("npid").items()} == {"image": (B, 28, 28, 1)}
    pirl_views = _view_shapes("pirl")
    assert {k: v.shape for k, v in pirl_views.items()} == {
        "image": (B, 28, 28, 1), "tiles": (B, 9, 16, 16, 1)}
    assert all(v.dtype == jnp.float32 for v in pirl_views.values())


SNIPPET = """
import pickle, jax, jax.numpy as jnp
jax.config.update("jax_threefry_partitionable", False)  # as fast_prng (conftest.py)
from ssl_jax import checkpoint, experiment, parallel
from ssl_jax.methods import pirl
from tests.test_pirl import INDICES, SPEC, _flat, _loss_fn, small_config
with open(INPUTS, "rb") as f:
    inputs = pickle.load(f)
mesh = parallel.make_mesh()
out["devices"] = len(jax.devices())
with jax.set_mesh(mesh):
    rows = parallel.batch_sharding(mesh)
    for name, (p, s, v) in inputs.items():
        s = jax.device_put(s, pirl.state_sharding(s, mesh))
        args = (p, s, jax.device_put(v, rows), jax.device_put(INDICES, rows))
        (loss, (metrics, new_state)), grads = _loss_fn(name)(*args)
        if name == "npid":  # no collective may move the whole (104, 8) bank
            hlo = _loss_fn(name).lower(*args).compile().as_text().splitlines()
            out["whole_bank_collectives"] = np.array(
                [l for l in hlo if "f32[104,8]" in l and ("all-" in l or "collective" in l)])
        out[name + "loss"] = loss
        out.update({name + k: x for k, x in _flat("grad", grads).items()})
        out.update({name + k: x for k, x in _flat("state", new_state).items()})
        out[name + "bank_spec"] = np.array(str(new_state["bank"].sharding.spec))
    # The train loop's shardings, and a checkpoint round trip of the sharded bank.
    sh = experiment.Experiment(small_config("pirl"), SPEC, mesh).state_sharding
    out["train_bank_spec"] = np.array(str(sh["method_state"]["bank"].spec))
    out["train_param_spec"] = np.array(str(jax.tree.leaves(sh["params"])[0].spec))
    ckpt = checkpoint.Checkpointer(CKPT_DIR, async_save=False)
    ckpt.save(1, new_state)
    ckpt.wait()
    restored, _ = ckpt.restore_state_only(checkpoint.abstract(new_state, pirl.state_sharding(new_state, mesh)))
    ckpt.close()
    out["restored_bank"] = restored["bank"]
    out["restored_bank_spec"] = np.array(str(restored["bank"].sharding.spec))
    out["restored_shard_rows"] = np.array([x.data.shape[0] for x in restored["bank"].addressable_shards])
"""


@pytest.fixture(scope="module")
def eight_devices(one_device, tmp_path_factory):
    _, _, path = one_device
    ckpt_dir = str(tmp_path_factory.mktemp("ckpt"))
    snippet = f"INPUTS, CKPT_DIR = {path!r}, {ckpt_dir!r}\n" + SNIPPET
    return multidevice.run(snippet, tmp_path_factory.mktemp("eight"), devices=8)


def test_npid_params_are_pirl_without_the_jigsaw_branch(one_device):
    _, inputs, _ = one_device
    c = small_config("npid")
    views = {"image": jax.ShapeDtypeStruct((B, 28, 28, 1), jnp.float32)}
    p_shapes, s_shapes = jax.eval_shape(lambda v: pirl.init(jax.random.key(2), v, c, SPEC),
                                        views)
    p, s, _ = inputs["npid"]
    assert jax.tree.structure(p_shapes) == jax.tree.structure(p)
    assert jax.tree.structure(s_shapes) == jax.tree.structure(s)
    assert pirl.jigsaw_weight(c) == 0.0 and "pirl" not in c and c.method == "npid"
    assert s["bank"].shape == (104, 8)  # N = 100 padded to a multiple of 8


@pytest.mark.parametrize("name", ["npid", "pirl"])
def test_loss_gradients_and_state_equal_on_one_and_eight_devices(name, one_device, eight_devices):
    one, eight = one_device[0][name], eight_devices
    assert int(eight["devices"]) == 8
    np.testing.assert_allclose(eight[name + "loss"], one["loss"], rtol=2e-5)
    keys = [k for k in one if k.startswith(("grad", "state"))]
    assert len(keys) > 10 and any("bank" in k for k in keys)
    for k in keys:
        np.testing.assert_allclose(eight[name + k], one[k], rtol=2e-4, atol=2e-5, err_msg=k)
    assert "data" in str(eight[name + "bank_spec"])  # the bank came back sharded
    assert eight["whole_bank_collectives"].size == 0, eight["whole_bank_collectives"]
    # The loss's value: test_two_steps_loss_and_bank_against_numpy.
    assert max(np.abs(v).max() for k, v in one.items() if k.startswith("grad")) > 0


@pytest.mark.parametrize("name", ["npid", "pirl"])
def test_bank_rows_of_the_batch_move_and_z_stays_fixed(name, one_device):
    out, inputs, _ = one_device
    one = out[name]
    old = np.asarray(inputs[name][1]["bank"])
    new = one["state['bank']"]
    moved = np.flatnonzero(np.any(old != new, axis=1))
    np.testing.assert_array_equal(moved, np.unique(INDICES))
    np.testing.assert_allclose(np.linalg.norm(new, axis=1), 1.0, rtol=1e-5)
    branches = ["image"] + (["jigsaw"] if name == "pirl" else [])
    assert sorted(k for k in one["metrics"] if k.startswith("log_z")) == [f"log_z_{b}" for b in branches]
    for b in branches:
        first = float(one["metrics"][f"log_z_{b}"])
        assert np.isfinite(first) and one[f"state['log_z']['{b}']"] == first
        assert float(one["metrics2"][f"log_z_{b}"]) == first  # estimated once, then fixed


@pytest.mark.parametrize("name", ["npid", "pirl"])
def test_two_steps_loss_and_bank_against_numpy(name, one_device):
    """loss = (1 - lam) NCE(f, bank) + lam NCE(g, bank) (NPID: lam = 0), NCE as
    NPID's (test_memory._nce_reference), the K negatives drawn uniformly from the
    N images by the step's key; step 1 estimates each branch's Z, step 2 (the
    batch's indices reversed) reads the bank step 1 moved and keeps those Z.
    test_meaning_memory.py pins the same with distinct indices and one step."""
    out, inputs, _ = one_device
    one, c = out[name], small_config(name)
    t, lam = c.memory.temperature, (LAM if name == "pirl" else 0.0)  # the config's, not the code's
    branches = {"image": (1.0 - lam, one["f"])}
    if name == "pirl":
        branches["jigsaw"] = (lam, one["g"])
    old = np.asarray(inputs[name][1]["bank"], np.float64)
    neg = np.asarray(jax.random.randint(jax.random.key(3), (c.memory.negatives,), 0, N))
    want, terms, log_z = 0.0, {}, {}
    for b, (w, z) in branches.items():
        terms[b], log_z[b] = _nce_reference(z, old[INDICES], old[neg], t, N)
        want += w * terms[b]
        np.testing.assert_allclose(float(one["metrics"][f"loss_{b}"]), terms[b], rtol=1e-4,
                                   err_msg=b)
        np.testing.assert_allclose(float(one["metrics"][f"log_z_{b}"]), log_z[b], rtol=1e-5)
    np.testing.assert_allclose(float(one["loss"]), want, rtol=1e-4)
    if name == "pirl":  # the terms differ enough that swapped weights show
        assert abs(terms["image"] - terms["jigsaw"]) * abs(1 - 2 * lam) > 1e-3 * want

    # The bank after step 1: each distinct row once, towards the mean of its duplicates' f.
    new, f = old.copy(), _normalize(np.asarray(one["f"], np.float64))
    for i in np.unique(INDICES):
        new[i] = _normalize(A * old[i] + (1 - A) * f[INDICES == i].mean(0))
    np.testing.assert_allclose(one["state['bank']"], new, atol=2e-6)

    idx = INDICES[::-1]
    want2 = sum(w * _nce_reference(z, new[idx], new[neg], t, N, log_z[b])[0]
                for b, (w, z) in branches.items())
    np.testing.assert_allclose(float(one["loss2"]), want2, rtol=1e-4)


def test_checkpointed_sharded_bank_restores_sharded(one_device, eight_devices):
    eight = eight_devices
    assert "data" in str(eight["train_bank_spec"]) and str(eight["train_param_spec"]) == "P()"
    np.testing.assert_array_equal(eight["restored_bank"], eight["pirlstate['bank']"])
    assert "data" in str(eight["restored_bank_spec"])
    assert list(eight["restored_shard_rows"]) == [13] * 8  # 104 rows over 8 devices


def test_infonce_form_is_softmax_cross_entropy_over_the_same_rows():
    from tests.test_memory import _data, _info_nce_reference
    z, pos, neg, _ = _data()
    c = small_config("npid")
    c.memory.loss = "infonce"
    value, metrics = pirl._contrast(z, pos, neg, None, c, N)
    np.testing.assert_allclose(float(value), _info_nce_reference(z, pos, neg, 0.07), rtol=1e-4)
    assert "log_z" not in metrics  # no Z in this form (and no -inf metric for the loop)
    views = {"image": jax.ShapeDtypeStruct((B, 28, 28, 1), jnp.float32)}
    assert jax.eval_shape(lambda v: pirl.init(jax.random.key(0), v, c, SPEC),
                          views)[1]["log_z"] == {}


def test_warm_start_sets_every_row_to_its_images_initial_embedding():
    c = small_config("npid")
    c.batch_size, c.memory.init = 32, "encoder"  # 100 images: 3 full batches + 4 rows
    images = np.random.default_rng(0).integers(0, 256, (N, 28, 28, 1), np.uint8)
    source = sources.ArraySource(images, np.zeros(N, np.int32))
    params, state = pirl.init(jax.random.key(2), {"image": jnp.zeros((B, 28, 28, 1))}, c, SPEC)
    paper = small_config("npid")
    paper.memory.init = "random"
    old = np.asarray(state["bank"])  # the warm start donates the method state
    variables = jax.device_get({"params": params, "batch_stats": state["batch_stats"]})
    mesh = parallel.make_mesh()
    train_state = {"params": params, "method_state": state}
    assert experiment.Experiment(paper, SPEC, mesh).warm_start(train_state, source) is train_state
    warm = experiment.Experiment(c, SPEC, mesh).warm_start(train_state, source)["method_state"]

    # The reference: f of the eval view, batch by batch (train-mode BN sees the
    # zero images that pad the last batch, as the real pass does), normalised.
    view = augment.eval_view_config(crop_size=(28, 28), mean=c.aug.mean, std=c.aug.std)
    padded = np.concatenate([images, np.zeros((28, 28, 28, 1), np.uint8)])
    f = np.concatenate([
        pirl._net(c).apply(variables, augment.batch_views(jax.random.key(0), x, view), None,
                           train=True, mutable=["batch_stats"])[0][1]
        for x in np.split(padded, 4)])[:N]
    expected = f / np.linalg.norm(f, axis=1, keepdims=True)
    bank = np.asarray(warm["bank"])
    np.testing.assert_allclose(bank[:N], expected, atol=1e-5)
    np.testing.assert_array_equal(bank[N:], old[N:])  # padding rows
    assert np.all(np.any(bank[:N] != old[:N], axis=1))  # every row moved


def test_unknown_bank_init_is_refused(tiny_data):
    c = tiny_npid_config(tiny_data)
    c.memory.init = "zeros"
    with pytest.raises(ValueError, match="memory.init='zeros': use one of"):
        pirl.check(c, SPEC, parallel.make_mesh())


def tiny_npid_config(data_dir):
    c = test_train.tiny_config("npid", data_dir)  # test_train's tiny run, made for NPID
    c.memory.update(pad_to=64, negatives=128)  # tiny_squares: 256 train images
    return c


def test_npid_train_resume_evaluate(tiny_data, tmp_path, compilation_cache):
    config = tiny_npid_config(tiny_data)
    full, resumed, workdir = test_train.train_crash_resume(config, tmp_path)
    bank_full, bank_resumed = full["method_state"]["bank"], resumed["method_state"]["bank"]
    np.testing.assert_array_equal(bank_full, bank_resumed)
    np.testing.assert_array_equal(full["method_state"]["log_z"]["image"],
                                  resumed["method_state"]["log_z"]["image"])
    assert bank_resumed.shape == (256, 8)  # one row per image of the prepared train split
    np.testing.assert_allclose(np.linalg.norm(bank_resumed, axis=1), 1.0, rtol=1e-5)

    results = evaluation.evaluate(workdir, ("knn",))
    assert results["knn"]["step"] == 6
    assert 25.0 < results["knn"]["top1"] <= 100.0  # chance 10%: a swapped split scores ~10%
