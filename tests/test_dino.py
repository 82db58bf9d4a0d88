"""DINO's method (methods/dino.py) and its optimiser options (optim.py): what each piece
means, recomputed in NumPy from DINO's code (facebookresearch/dino main_dino.py, utils.py),
and one tiny end-to-end run that trains, resumes bitwise and evaluates the teacher.
The losses themselves (distill.py) are pinned in tests/test_distill.py."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssl_jax import config as cfg_lib
from ssl_jax import evaluation, experiment, optim, parallel
from ssl_jax.dataspec import DataSpec
from ssl_jax.methods import dino
from tests.test_train import train_crash_resume

pytestmark = pytest.mark.usefixtures("fast_prng")

SPEC = DataSpec(num_examples=256, image_shape=(28, 28, 1), num_classes=10,
                class_names=tuple("0123456789"), varying_size=False)


def tiny_config(data_dir=None, model="vit_tiny", **dino_fields):
    """configs/dino.py's runlocal shrunk further: a 2-block ViT of width 16 (or the
    2-block ConvNet), K = 32 prototypes, 2 global crops of 28 px and 2 local of 12."""
    c = cfg_lib.load_file(f"configs/dino.py:dataset=fashion_mnist,runlocal,model={model}")
    if data_dir is not None:
        c.dataset, c.data_dir = "tiny_squares", data_dir
    c.batch_size, c.total_steps, c.ckpt_every_steps, c.log_every_steps = 32, 6, 3, 3
    if model == "convnet":
        c.model.widths, c.model.conv = (4, 8), "xla"
    else:
        c.model.update(width=16, heads=2, depth=2)
    c.dino.update(out_dim=32, hidden=16, bottleneck=8, local_crops=2, **dino_fields)
    c.eval.batch_size, c.eval.linear.epochs = 64, 5
    return c


# ------------------------------------------------------------------ schedules

def test_teacher_temperature_is_linspace_per_epoch_then_constant():
    c = tiny_config()
    c.dino.update(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    want = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(10, 0.07)])  # DINOLoss's
    got = [float(dino.teacher_temperature(c, jnp.int32(e))) for e in range(40)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    c.dino.warmup_teacher_temp_epochs = 0  # the code default: the final value from epoch 0
    assert float(dino.teacher_temperature(c, jnp.int32(0))) == pytest.approx(0.07)


def test_teacher_moves_by_the_cosine_momentum_after_the_update():
    c = tiny_config()
    c.total_steps, c.dino.momentum_teacher = 10, 0.996
    m = lambda it: 1 + 0.5 * (0.996 - 1) * (1 + np.cos(np.pi * it / 10))  # cosine_scheduler
    params = {"w": jnp.full((3,), 2.0)}
    state = {"teacher": {"w": jnp.zeros((3,))}, "step": jnp.int32(0)}
    for it in range(3):
        teacher = np.asarray(state["teacher"]["w"])
        state = dino.after_step(params, state, c, SPEC)
        np.testing.assert_allclose(state["teacher"]["w"], m(it) * teacher + (1 - m(it)) * 2.0,
                                   rtol=1e-5)
        assert int(state["step"]) == it + 1
    assert m(0) == pytest.approx(0.996) and m(10) == pytest.approx(1.0)


# ------------------------------------------------------------------ the optimiser

def test_gradients_are_clipped_per_tensor_not_globally():
    g = {"a": jnp.full((4,), 5.0), "b": jnp.full((4,), 0.25)}          # norms 10 and 0.5
    out, _ = optim.clip_per_tensor(3.0).update(g, optax.EmptyState())
    np.testing.assert_allclose(np.linalg.norm(out["a"]), 3.0 * 10 / (10 + 1e-6), rtol=1e-6)
    np.testing.assert_array_equal(out["b"], g["b"])  # under the limit: untouched
    # (global-norm clipping would have scaled "b" too)


def _opt_cfg(**kw):
    c = tiny_config().optimizer
    c.update(kw)
    return c


def test_weight_decay_follows_dinos_cosine_and_skips_biases_and_norms():
    sched = optim.weight_decay_schedule(_opt_cfg(weight_decay=0.04, weight_decay_end=0.4), 100)
    want = 0.4 + 0.5 * (0.04 - 0.4) * (1 + np.cos(np.pi * np.arange(100) / 100))
    np.testing.assert_allclose([float(sched(i)) for i in range(100)], want, rtol=1e-5)
    # Which arrays decay: the student's, as DINO's get_params_groups (biases and 1-d out).
    c = tiny_config()
    params, _ = dino.init(jax.random.key(0), {"global": jnp.zeros((2, 2, 28, 28, 1))}, c, SPEC)
    mask = optim.decay_mask(params, decay_bn=c.optimizer.decay_bn,
                            decay_bias=c.optimizer.decay_bias)
    flat = {jax.tree_util.keystr(p, simple=True, separator="/"): m
            for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["encoder/block1/fc1/kernel"] and flat["encoder/pos_embedding"]
    assert flat["encoder/cls_token"] and flat["head/last_layer/v"]
    assert not flat["encoder/block1/fc1/bias"] and not flat["encoder/norm/scale"]
    assert not flat["encoder/block1/norm1/bias"] and not flat["head/Dense_0/bias"]


def test_frozen_last_layer_gets_no_update_and_restarts_adam_when_it_thaws():
    cfg = _opt_cfg(name="adamw", weight_decay=0.1, weight_decay_end=None,
                   clip_per_tensor=0.0, frozen_params="head/last_layer")
    lr = lambda step: 0.1 * (step + 1)
    tx = optim.make_optimizer(cfg, lr, total_steps=10, freeze_steps=2)
    params = {"head": {"last_layer": {"v": jnp.ones((2, 2))}, "w": jnp.ones((2, 2))}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    state, p = tx.init(params), params
    for step in range(3):
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        if step < 2:  # frozen: no update at all (no weight decay either)
            np.testing.assert_array_equal(p["head"]["last_layer"]["v"], 1.0)
        else:
            # Its first Adam step (bias-corrected m/sqrt(v) = 1) at the run's step-2 rate,
            # as torch's AdamW on a parameter whose grad was None for two steps.
            want = 1.0 - lr(2) * (1.0 + 0.1 * 1.0)
            np.testing.assert_allclose(p["head"]["last_layer"]["v"], want, rtol=1e-5)
    assert not np.allclose(p["head"]["w"], 1.0)  # the rest trained all along


def test_frozen_params_that_name_nothing_are_refused():
    cfg = _opt_cfg(frozen_params="head/prototypes")
    tx = optim.make_optimizer(cfg, lambda s: 0.1, total_steps=4, freeze_steps=1)
    with pytest.raises(Exception, match="frozen_params='head/prototypes' names no parameters"):
        tx.init({"head": {"last_layer": {"v": jnp.ones(2)}}})


# ------------------------------------------------------------------ the loss's wiring

def _step_inputs(c, seed=0):
    images = jax.random.randint(jax.random.key(seed), (4, 28, 28, 1), 0, 255).astype(jnp.uint8)
    views = dino.views(jax.random.key(1), images, c)
    params, state = dino.init(jax.random.key(2), views, c, SPEC)
    return params, state, views


def test_the_teacher_gets_no_gradient_and_the_centre_moves_after_the_loss():
    c = tiny_config()
    params, state, views = _step_inputs(c)
    # Let the teacher differ from the student, and start from a non-zero centre.
    state = dict(state, teacher=jax.tree.map(lambda x: x * 1.1, state["teacher"]),
                 center=jnp.linspace(-1, 1, c.dino.out_dim))
    f = lambda teacher: dino.loss(params, dict(state, teacher=teacher), views, {},
                                  jax.random.key(3), c, SPEC)[0]
    g = jax.grad(f)(state["teacher"])
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))
    value, (metrics, new) = dino.loss(params, state, views, {}, jax.random.key(3), c, SPEC)
    # The centre: EMA (0.9) of the teacher's logits over the batch's global crops.
    net = dino._net(c, stochastic=False)
    out, _ = dino._apply(net, state["teacher"], state["teacher_batch_stats"],
                         dino._flat(views["global"]))
    want = 0.9 * np.asarray(state["center"]) + 0.1 * np.asarray(out["logits"]).mean(0)
    np.testing.assert_allclose(new["center"], want, rtol=1e-5, atol=1e-6)
    # ... and the loss used the centre it was given, not the updated one.
    again, _ = dino.loss(params, dict(state, center=new["center"]), views, {},
                         jax.random.key(3), c, SPEC)
    assert float(again) != pytest.approx(float(value), rel=1e-6)
    assert set(metrics) >= {"teacher_entropy", "teacher_batch_entropy", "kl", "teacher_temp"}


def test_dinov2_options_add_their_weighted_terms_and_train():
    """KoLeo, Sinkhorn-Knopp and iBOT on at once, with registers: the loss is DINO's term
    plus 0.1 x KoLeo plus 1.0 x iBOT, every gradient finite, the patch centre unused
    (Sinkhorn replaces centring) and only half the global crops masked."""
    c = cfg_lib.load_file("configs/dino.py:dataset=fashion_mnist,runlocal,koleo,sinkhorn,ibot,"
                          "registers=2")
    c.model.update(width=16, heads=2, depth=2)
    c.dino.update(out_dim=32, hidden=16, bottleneck=8, local_crops=2)
    assert c.model.mask_token and c.dino.centering == "sinkhorn_knopp"
    params, state, views = _step_inputs(c)
    m = views["masks"]
    assert m.shape == (4, 2, 49) and int(m.any(-1).sum()) == 4  # int(8 x 0.5) crops masked
    f = lambda p: dino.loss(p, state, views, {}, jax.random.key(3), c, SPEC)
    (value, (metrics, new)), grads = jax.value_and_grad(f, has_aux=True)(params)
    want = metrics["dino_loss"] + 0.1 * metrics["koleo"] + 1.0 * metrics["ibot"]
    np.testing.assert_allclose(value, want, rtol=1e-6)
    assert float(metrics["ibot"]) > 0 and np.isfinite(float(metrics["koleo"]))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["encoder"]["mask_token"]).sum()) > 0  # the student saw it
    np.testing.assert_array_equal(new["center"], state["center"])    # Sinkhorn: no centre


# ------------------------------------------------------------------ the collapse watch

def test_the_collapse_warning_fires_once_after_a_sustained_stretch():
    c = tiny_config()
    watch = dino.watch(c, SPEC)
    log_k = math.log(c.dino.out_dim)
    healthy = {"teacher_entropy": 0.5 * log_k, "teacher_batch_entropy": 0.8 * log_k, "kl": 0.3}
    uniform = dict(healthy, teacher_entropy=0.99 * log_k, kl=1e-4)
    assert watch(1, healthy) is None
    for step in range(2, 2 + c.dino.collapse.patience - 1):
        assert watch(step, uniform) is None  # not yet sustained
    assert watch(10, healthy) is None  # the stretch is broken: counting starts again
    said = [watch(20 + i, uniform) for i in range(c.dino.collapse.patience + 3)]
    assert [s is not None for s in said].count(True) == 1  # once
    line = next(s for s in said if s)
    assert line.startswith("warning: DINO looks collapsed (uniform) since step 20:")
    assert "config.dino.teacher_temp" in line and "center_momentum" in line
    assert "config.optimizer.lr" in line
    one = dino.watch(c, SPEC)
    said = [one(i, dict(healthy, teacher_batch_entropy=0.01)) for i in range(10)]
    assert any(s and "(one prototype)" in s for s in said)


# ------------------------------------------------------------------ end to end

def test_train_resume_warn_and_evaluate_the_teacher(tiny_data, tmp_path, capsys):
    """One tiny run (and its resume after a crash) that collapses on purpose: a teacher
    temperature of 5 makes its targets near uniform (logits are cosines in [-1, 1]), so
    the collapse warning must reach the console and train.log."""
    c = tiny_config(tiny_data)
    common = cfg_lib.sibling(os.path.abspath("configs/dino.py"), "common")
    common.set_steps(c.optimizer, "freeze", 4)
    c.log_every_steps, c.dino.collapse.patience = 1, 3
    c.dino.update(teacher_temp=5.0, warmup_teacher_temp=5.0)
    full, resumed, workdir = train_crash_resume(c, tmp_path)
    printed = capsys.readouterr().out
    assert "warning: DINO looks collapsed (uniform) since step 1:" in printed
    with open(os.path.join(workdir, "train.log")) as f:
        assert "warning: DINO looks collapsed" in f.read()
    state = resumed["method_state"]
    assert int(state["step"]) == 6 and np.abs(state["center"]).sum() > 0
    # The teacher moved, less than the student did, and is not the student.
    exp = experiment.Experiment(c, experiment.data_spec(c), parallel.make_mesh())
    init = jax.device_get(exp.initial_state())
    for name in ("encoder", "head"):
        t0 = jax.tree.leaves(init["method_state"]["teacher"][name])
        t, s = (jax.tree.leaves(x[name]) for x in (state["teacher"], resumed["params"]))
        assert any(not np.array_equal(a, b) for a, b in zip(t0, t))
        assert any(not np.array_equal(a, b) for a, b in zip(t, s))
    # The last layer, frozen for 4 steps, moved in steps 5 and 6 only.
    v0 = init["params"]["head"]["last_layer"]["v"]
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    at3 = manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    np.testing.assert_array_equal(at3["state"]["params"]["head"]["last_layer"]["v"], v0)
    assert not np.array_equal(resumed["params"]["head"]["last_layer"]["v"], v0)

    # Evaluation reads the teacher by default.
    from ssl_jax import encoders
    _, _, variables, step = encoders.load_run(workdir, parallel.make_mesh())
    assert step == 6
    for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(state["teacher"]["encoder"])):
        np.testing.assert_array_equal(a, b)
    results = evaluation.evaluate(workdir, ("knn",))
    assert results["knn"]["top1"] > 15.0  # 10 classes; 6 steps
    assert "Evaluating the encoder at method_state/teacher/encoder" in capsys.readouterr().out


def test_export_chooses_the_teacher_or_the_student():
    c = tiny_config()
    state = {"params": {"encoder": "student"},
             "method_state": {"teacher": {"encoder": "teacher"}, "batch_stats": {},
                              "teacher_batch_stats": {}}}
    assert experiment.encoder_variables(state, c)["params"] == "teacher"  # DINO's default
    c.dino.export = "student"
    assert experiment.encoder_variables(state, c)["params"] == "student"
    c.dino.export = "ema"
    with pytest.raises(Exception, match=r"config.dino.export='ema': use one of"):
        dino.check(c, SPEC, None)
