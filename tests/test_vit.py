"""The ViT encoder (ssl_jax/models/vit.py): the learned position table resampled as DINO
does (against a per-point NumPy resample, and the identity at the stored grid), drop
path on in training only, registers without a position, the attention map the figures
read, bad input refused in one line, and a SimCLR run that trains and evaluates."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import encoders, evaluation, experiment, models, parallel, storage
from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec
from ssl_jax.errors import UserError
from ssl_jax.models import vit
from tests.test_precision import equations

pytestmark = pytest.mark.usefixtures("fast_prng")


def tiny(**kw):
    """A ViT small enough to compile in a second or two."""
    args = dict(patch=16, width=32, depth=2, heads=2, img_size=224)
    return models.make_encoder("vit", **{**args, **kw})


def _init(model, size, seed=0):
    return model.init(jax.random.key(seed), jnp.zeros((2, size, size, 3)), train=False)


def _images(size, n=2, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


# -------------------------------------------------------------- position embedding

def _torch_bicubic_reference(table: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """DINO's interpolate_pos_encoding, point by point as torch's upsample_bicubic2d
    computes it (align_corners=False, scale_factor = (out + 0.1) / in, a = -0.75):
    source x = (i + 0.5) / scale - 0.5, taps floor(x) - 1 .. + 2 clamped to the edge,
    coefficients [cc2(t + 1), cc1(t), cc1(1 - t), cc2(2 - t)], t = x - floor(x)."""
    a = -0.75
    cc1 = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
    cc2 = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    def taps(i, n_in, n_out):
        x = (i + 0.5) / ((n_out + 0.1) / n_in) - 0.5
        x0 = math.floor(x)
        t = x - x0
        return ([min(max(x0 + k, 0), n_in - 1) for k in (-1, 0, 1, 2)],
                [cc2(t + 1), cc1(t), cc1(1 - t), cc2(2 - t)])

    h, w, d = table.shape
    res = np.zeros(out + (d,))
    for i in range(out[0]):
        rows, wy = taps(i, h, out[0])
        for j in range(out[1]):
            cols, wx = taps(j, w, out[1])
            for r, a_ in zip(rows, wy):
                for c, b_ in zip(cols, wx):
                    res[i, j] += a_ * b_ * table[r, c]
    return res


def test_a_224_model_at_96_px_equals_the_explicitly_resampled_table():
    """14x14 table -> 6x6 grid, inside the jitted forward pass: the model at 96 px equals
    a 96 px model whose table IS the NumPy resample (same other parameters)."""
    big, small = tiny(img_size=224), tiny(img_size=96)
    params = _init(big, 224)["params"]
    table = np.asarray(params["pos_embedding"][0], np.float64)
    want = _torch_bicubic_reference(table, (6, 6))
    np.testing.assert_allclose(vit.resample_pos_embed(jnp.asarray(table, jnp.float32), (6, 6)),
                               want, rtol=1e-5, atol=1e-6)
    explicit = dict(params, pos_embedding=jnp.asarray(want[None], jnp.float32))
    x = _images(96)
    got = jax.jit(lambda p, x: big.apply({"params": p}, x, train=False))(params, x)
    ref = small.apply({"params": explicit}, x, train=False)
    for k in ("block1", "block2"):
        np.testing.assert_allclose(got[k].patches, ref[k].patches, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[k].cls, ref[k].cls, rtol=1e-4, atol=1e-5)
    # Non-square grids and upsampling take the same path (a 2-D separable resample).
    np.testing.assert_allclose(vit.resample_pos_embed(jnp.asarray(table[:5, :7], jnp.float32),
                                                      (9, 3)),
                               _torch_bicubic_reference(table[:5, :7], (9, 3)),
                               rtol=1e-5, atol=1e-6)


def test_the_table_is_used_as_stored_at_the_training_grid():
    """DINO returns pos_embed itself when the grid is the stored one; its resample with
    the +0.1 offset would move it (so this fails if the identity case is dropped)."""
    table = jnp.asarray(np.random.default_rng(0).normal(size=(14, 14, 8)), jnp.float32)
    np.testing.assert_array_equal(vit.resample_pos_embed(table, (14, 14)), table)
    assert not np.allclose(vit.resample_matrix(14, 14), np.eye(14), atol=1e-3)


# -------------------------------------------------------------- drop path, registers

@pytest.mark.parametrize("patch,size,chans", [(4, (28, 28), 1), (16, (32, 48), 3)])
def test_the_patch_embedding_is_the_strided_convolution(patch, size, chans):
    """PatchEmbed (a reshape and a matmul, for speed) == nn.Conv(kernel = stride = patch)
    with the same parameters and initial values; a wrong pixel order inside the patch
    (e.g. the transpose left out) fails it."""
    import flax.linen as nn
    x = jax.random.normal(jax.random.key(0), (2, *size, chans))
    embed = vit.PatchEmbed(patch, 8, jnp.float32)
    variables = embed.init(jax.random.key(1), x)
    conv = nn.Conv(8, (patch, patch), strides=(patch, patch), padding="VALID",
                   kernel_init=vit._torch_conv)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, variables,
                                     conv.init(jax.random.key(1), x)))
    np.testing.assert_allclose(embed.apply(variables, x), conv.apply(variables, x),
                               atol=2e-5, rtol=1e-5)


def test_drop_path_is_random_in_training_and_off_at_evaluation():
    model = tiny(drop_path=0.5)
    variables, x = _init(model, 224), _images(224)
    run = lambda r: model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(r)})
    a, b, a2 = run(0), run(1), run(0)
    # Rate linear in depth from 0 (DINO): block1 never drops, block2 at 0.5 does.
    np.testing.assert_array_equal(a["block1"].cls, b["block1"].cls)
    assert not np.allclose(a["block2"].cls, b["block2"].cls)
    np.testing.assert_array_equal(a["block2"].cls, a2["block2"].cls)
    # Evaluation: deterministic without an rng, and equal to the same weights without drop path.
    ev = model.apply(variables, x, train=False)
    ref = tiny(drop_path=0.0).apply(variables, x, train=False)
    np.testing.assert_array_equal(ev["block2"].patches, ref["block2"].patches)
    with pytest.raises(ValueError, match="dropout"):
        model.apply(variables, x, train=True)  # no rng: refused, not silently deterministic


def test_registers_carry_no_position_embedding():
    """Changing the position table changes the patch tokens entering block 1, never the
    registers (nor the class token): DINOv2 adds the registers after the positions."""
    model = tiny(registers=3)
    variables, x = _init(model, 224), _images(224)
    assert variables["params"]["register_tokens"].shape == (1, 3, 32)

    def first_input(params):
        _, got = model.apply({"params": params}, x, train=False, capture_intermediates=True)
        return np.asarray(got["intermediates"]["block1"]["norm1"]["__call__"][0])
    p = variables["params"]
    before = first_input(p)
    after = first_input(dict(p, pos_embedding=p["pos_embedding"] + 1.0))
    np.testing.assert_array_equal(before[:, :4], after[:, :4])  # class token + 3 registers
    assert not np.allclose(before[:, 4:], after[:, 4:])
    out = model.apply(variables, x, train=False)["block2"]
    assert out.registers.shape == (2, 3, 32) and out.patches.shape == (2, 14, 14, 32)


def test_the_last_block_sows_the_class_attention_over_the_patch_grid():
    model = tiny(registers=2, depth=3)
    variables = _init(model, 224)
    feats, got = model.apply(variables, _images(96), train=False, mutable=["intermediates"])
    assert list(got["intermediates"]) == ["block3"]
    (a,) = got["intermediates"]["block3"]["cls_attention"]
    assert a.shape == (2, 2, 6, 6) and a.dtype == jnp.float32
    # A softmax row over 1 + 2 + 36 keys, less the class and register keys.
    assert np.all(np.asarray(a.sum(axis=(2, 3))) < 1.0) and np.all(np.asarray(a) > 0)
    assert models.stages("vit", depth=3) == ["block1", "block2", "block3"] == list(feats)


def test_sincos_is_computed_at_the_input_grid_and_has_no_parameter():
    model = tiny(pos_embed="sincos")
    variables = _init(model, 224)
    assert "pos_embedding" not in variables["params"]
    out = model.apply(variables, _images(96), train=False)
    assert out["block2"].patches.shape == (2, 6, 6, 32)
    # big_vision's layout at (y, x) = (1, 2): sin/cos of x * omega, then of y * omega,
    # omega = 10000^(-k / (width/4 - 1)) = (1, 1e-4) for width 8.
    np.testing.assert_allclose(vit.sincos_2d((2, 3), 8)[1, 2],
                               [np.sin(2), np.sin(2e-4), np.cos(2), np.cos(2e-4),
                                np.sin(1), np.sin(1e-4), np.cos(1), np.cos(1e-4)], rtol=1e-6)


# -------------------------------------------------------------- precision

def test_bf16_vit_keeps_float32_parameters_logits_and_softmax():
    model = tiny(dtype=jnp.bfloat16, registers=1)
    x = _images(64)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x).jaxpr
    dots = [e for e in equations(jaxpr) if e.primitive.name == "dot_general"]
    dtype = lambda v: str(v.aval.dtype)
    # The model runs in bf16: the Dense layers' dots are bf16 ...
    assert any(dtype(e.outvars[0]) == "bfloat16" for e in dots)
    # ... but the q.k logits (bf16 q and k, 4-d output) accumulate into float32,
    logits = [e for e in dots if len(e.outvars[0].aval.shape) == 4
              and all(dtype(v) == "bfloat16" for v in e.invars)
              and dtype(e.outvars[0]) == "float32"]
    assert len(logits) == 2, [(dtype(e.outvars[0]), e.outvars[0].aval.shape) for e in dots]
    # and every exp (the softmax), erfc (exact GELU) and rsqrt (LayerNorm) is float32.
    low = {(e.primitive.name, dtype(e.outvars[0])) for e in equations(jaxpr)
           if e.primitive.name in ("exp", "erfc", "rsqrt")}
    assert low == {("exp", "float32"), ("erfc", "float32"), ("rsqrt", "float32")}, low


# -------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, size, match", [
    (dict(patch=16), 28, "patch=16 does not divide the 28x28 input"),
    (dict(width=30, heads=4), 224, "heads=4 does not divide width=30"),
    (dict(pos_embed="rope"), 224, "pos_embed='rope'"),
])
def test_bad_configurations_are_one_line_errors(kw, size, match):
    with pytest.raises(UserError, match=match) as e:
        _init(tiny(**kw), size)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field, value, match", [
    ("heads", 5, "heads=5 does not divide width=192: set config.model.heads"),
    ("patch", 8, "patch=8 does not divide the 28x28 input"),
])
def test_the_train_command_refuses_a_bad_vit_before_writing_anything(field, value, match,
                                                                      tmp_path):
    from ssl_jax import train
    c = load_file("configs/simclr.py:model=vit_tiny,runlocal")
    c.model[field] = value
    with pytest.raises(UserError, match=match):
        train.train(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_a_stage_the_vit_does_not_have_is_refused():
    c = load_file("configs/simclr.py:model=vit_tiny,runlocal")
    assert models.stages(c.model.name, depth=c.model.depth) == ["block1", "block2"]
    with pytest.raises(UserError, match="block5 is not a stage of this vit_tiny"):
        evaluation._stages(c, "block5")


# -------------------------------------------------------------- every method traces

@pytest.mark.parametrize("method", ["simclr", "moco", "npid", "supervised", "rotnet"])
def test_each_method_builds_a_train_step_with_a_vit(method):
    """model=vit_tiny with drop path: the step traces (the rng reaches the encoder)."""
    c = load_file(f"configs/{method}.py:model=vit_tiny,runlocal")
    c.batch_size = 8
    c.model.update(width=32, heads=2, drop_path=0.1)
    if method == "moco":
        c.moco.update(queue_size=16, bn_groups=2)
    if method == "npid":
        c.memory.negatives = 16
    spec = DataSpec(num_examples=64, image_shape=(28, 28, 1), num_classes=10)
    exp = experiment.Experiment(c, spec, parallel.make_mesh())
    batch = {"image": exp.sample, "index": jax.ShapeDtypeStruct((8,), jnp.int32),
             "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
    _, (state, _) = jax.make_jaxpr(exp.train_step(), return_shape=True)(exp.abstract_state(),
                                                                        batch)
    assert state["params"]["encoder"]["pos_embedding"].shape == (1, 7, 7, 32)


@pytest.mark.parametrize("method", ["jigsaw", "pirl"])
def test_methods_whose_tiles_a_vit_cannot_read_refuse_it(method):
    c = load_file(f"configs/{method}.py:model=vit_tiny,runlocal")
    spec = DataSpec(num_examples=64, image_shape=(28, 28, 1), num_classes=10)
    with pytest.raises(UserError, match="use a ConvNet"):
        experiment.Experiment(c, spec, parallel.make_mesh())


# -------------------------------------------------------------- end to end

def test_simclr_vit_trains_evaluates_and_refuses_another_stored_grid(tiny_data, tmp_path,
                                                                     compilation_cache):
    from ssl_jax import train
    c = load_file("configs/simclr.py:model=vit_tiny,runlocal")
    c.dataset, c.data_dir = "tiny_squares", tiny_data
    c.batch_size, c.total_steps, c.ckpt_every_steps, c.log_every_steps = 16, 4, 2, 2
    c.model.update(width=32, heads=2, depth=1, drop_path=0.1)
    c.head.hidden, c.head.dim = 16, 8
    c.eval.batch_size, c.eval.knn.k = 64, 20
    workdir = str(tmp_path / "w")
    train.train(c, workdir)
    r = evaluation.evaluate(workdir, ("knn",))["knn"]
    assert r["step"] == 4 and r["stage"] == "block1" and 0.0 <= r["top1"] <= 100.0

    # config.json edited to another grid: one line naming the fix, not orbax's traceback.
    path = storage.path(workdir) / "config.json"
    stored = json.loads(path.read_text())
    stored["model"]["img_size"] = [32, 32]
    path.write_text(json.dumps(stored))
    with pytest.raises(UserError, match=r"img_size") as e:
        encoders.load_run(workdir, parallel.make_mesh())
    assert "\n" not in str(e.value)


def test_a_run_without_any_batchnorm_loads_for_evaluation(tiny_data, tmp_path,
                                                          compilation_cache):
    """Supervised + ViT: no BN anywhere, so the checkpoint's batch_stats is empty; the
    encoder still loads (load_run asks for no BN statistics) and evaluates, trained and
    as initialised (nothing to calibrate)."""
    from ssl_jax import train
    c = load_file("configs/supervised.py:model=vit_tiny,runlocal")
    c.dataset, c.data_dir = "tiny_squares", tiny_data
    c.batch_size, c.total_steps, c.ckpt_every_steps, c.log_every_steps = 16, 2, 2, 2
    c.model.update(width=16, heads=2, depth=1)
    c.eval.batch_size, c.eval.knn.k = 64, 20
    workdir = str(tmp_path / "w")
    train.train(c, workdir)
    _, _, variables, step = encoders.load_run(workdir, parallel.make_mesh())
    assert step == 2 and variables["batch_stats"] == {}
    assert evaluation.evaluate(workdir, ("knn",))["knn"]["step"] == 2
    # The random-init baseline: no BN statistics to calibrate, the variables as initialised.
    assert evaluation.evaluate(workdir, ("knn",), random_init=True)["knn"]["step"] == 0
