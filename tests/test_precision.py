"""Mixed precision, config.model.dtype = "bfloat16": what must stay float32.

The encoder's convolutions and activations run in bf16 (the point: half the
activation memory, the accelerators' fast path). Everything that accumulates
over steps or decides the loss's value stays float32:
  - the state after a step: parameters (param_dtype float32), optimizer state,
    BN statistics (computed in float32, models/norm.py), MoCo's queue and key
    encoder (an EMA of float32 parameters), the NPID/PIRL memory bank;
  - the loss: logits, the temperature division, softmax / log-softmax, NCE's
    exp/log (losses.py casts to float32 before any of them). bf16 keeps 8 bits of
    mantissa: logits / 0.1 of unit vectors span +-10 with a resolution of ~0.06,
    which would move the softmax by ~6% per logit.

Checked on the traced train step (make_jaxpr: types only, nothing compiled), on
the loss functions given bf16 inputs, and by running SimCLR for 10 steps in
both dtypes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core

from ssl_jax import experiment, losses, parallel
from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec

pytestmark = pytest.mark.usefixtures("fast_prng")

B = 32
SPEC = DataSpec(num_examples=256, image_shape=(28, 28, 1), num_classes=10)
# A temperature no other literal of the step has (augment's hue is 0.2, MoCo's default
# temperature too), so the divisions by it are the loss's.
TEMPERATURE = 0.137
METHODS = ("simclr", "moco", "npid", "supervised")
# Ops whose bf16 rounding would change the loss: softmax / log-softmax / NCE / L2 norms.
TRANSCENDENTAL = {"exp", "exp2", "log", "log1p", "logistic", "rsqrt", "sqrt", "pow", "tanh",
                  "erf", "erfc"}
# Ops that may see bf16 values in a loss: they do not round (the casts themselves,
# stop_gradient on a bf16 input before its cast).
EXACT = {"convert_element_type", "stop_gradient"}


def tiny_config(method: str, dtype: str = "bfloat16"):
    """method: a config name, or "name:model" for another encoder (a 1-block ViT)."""
    method, _, model = method.partition(":")
    c = load_file(f"configs/{method}.py:runlocal" + (f",model={model}" if model else ""))
    c.batch_size = B
    if model:
        c.model.update(width=16, heads=2, depth=1, dtype=dtype)
    else:
        c.model.update(widths=(4, 8), dtype=dtype, conv="xla")
    if "head" in c:
        c.head.hidden, c.head.dim = 16, 8
    if method == "simclr":
        c.simclr.temperature = TEMPERATURE
    if method == "moco":
        c.moco.update(queue_size=2 * B, bn_groups=4, temperature=TEMPERATURE)
    if method == "npid":
        c.memory.update(negatives=64, temperature=TEMPERATURE)
    if method == "dino":  # the student's temperature is the literal one; the teacher's a schedule
        c.dino.update(out_dim=32, hidden=16, bottleneck=8, local_crops=2,
                      student_temp=TEMPERATURE)
    return c


def equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (jit, shard_map,
    custom_jvp/vjp, scan, cond)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, core.ClosedJaxpr):
                    yield from equations(sub.jaxpr)
                elif isinstance(sub, core.Jaxpr):
                    yield from equations(sub)


def out_dtypes(eqn):
    return {str(v.aval.dtype) for v in eqn.outvars if hasattr(v.aval, "dtype")}


def named_leaves(tree):
    return [(jax.tree_util.keystr(p), leaf)
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


# A ViT in bf16 too: its attention logits, softmax and GELU must stay float32 as well.
# DINO on a ViT: the teacher, centre and head's weight norm stay float32 too.
@pytest.fixture(scope="module", params=METHODS + ("simclr:vit_tiny", "dino:vit_tiny"))
def traced(request):
    """-> (method, config, closed jaxpr of one train step, the new state's shapes):
    the bf16 step traced on abstract inputs."""
    c = tiny_config(request.param)
    exp = experiment.Experiment(c, SPEC, parallel.make_mesh())
    batch = {"image": exp.sample, "index": jax.ShapeDtypeStruct((B,), jnp.int32),
             "label": jax.ShapeDtypeStruct((B,), jnp.int32)}
    jaxpr, (state, _) = jax.make_jaxpr(exp.train_step(), return_shape=True)(
        exp.abstract_state(), batch)
    return request.param, c, jaxpr, state


def test_state_stays_float32_after_a_bf16_step(traced):
    method, _, jaxpr, state = traced
    # The model does run in bf16 (else this test would prove nothing): a ConvNet's convs,
    # a ViT's matmuls (its patch embedding is one too: models/vit.py PatchEmbed).
    ops = ("conv_general_dilated",) + (("dot_general",) if "vit" in method else ())
    assert any(e.primitive.name in ops and out_dtypes(e) == {"bfloat16"}
               for e in equations(jaxpr.jaxpr))
    leaves = named_leaves(state)
    floats = {name: leaf.dtype for name, leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.inexact)}
    assert all(d == jnp.float32 for d in floats.values()), {
        k: str(d) for k, d in floats.items() if d != jnp.float32}
    # The parts named in the module docstring are among them.
    must = ["['params']['encoder']", "['opt_state']"]
    if method != "dino:vit_tiny":  # a ViT under DINO's BN-free head has no BN statistics
        must.append("['method_state']['batch_stats']")
    must += {"moco": ["['method_state']['queue']", "['method_state']['key_params']",
                      "['method_state']['key_batch_stats']"],
             "npid": ["['method_state']['bank']"],
             "dino:vit_tiny": ["['method_state']['teacher']", "['method_state']['center']"],
             }.get(method, [])
    for prefix in must:
        assert any(k.startswith(prefix) for k in floats), prefix


def test_temperature_division_and_softmax_are_float32(traced):
    method, _, jaxpr, _ = traced
    eqns = list(equations(jaxpr.jaxpr))
    low = [(e.primitive.name, out_dtypes(e)) for e in eqns
           if e.primitive.name in TRANSCENDENTAL and out_dtypes(e) != {"float32"}]
    assert not low, low
    assert any(e.primitive.name == "exp" for e in eqns)  # the softmax / NCE is in there
    if method == "supervised":
        return  # no temperature: the cross-entropy's log-softmax is the exp/log above
    by_t = [e for e in eqns if e.primitive.name == "div" and isinstance(e.invars[1], core.Literal)
            and np.isclose(float(e.invars[1].val), TEMPERATURE)]
    assert by_t, "no division by the temperature found in the step"
    assert all(out_dtypes(e) == {"float32"} for e in by_t), [out_dtypes(e) for e in by_t]


def _bf16(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.bfloat16)


LOSSES = {  # name -> (loss on given inputs, its bf16 inputs)
    "nt_xent": (lambda a, b: losses.nt_xent(a, b, TEMPERATURE)[0], (_bf16(8, 16), _bf16(8, 16, seed=1))),
    "info_nce_queue": (lambda q, k, u: losses.info_nce_queue(q, k, u, TEMPERATURE)[0],
                       (_bf16(8, 16), _bf16(8, 16, seed=1), _bf16(32, 16, seed=2))),
    "nce": (lambda z, p, n: losses.nce(z, p, n, TEMPERATURE, 1000,
                                       jnp.full((), -jnp.inf, jnp.float32))[0],
            (_bf16(8, 16), _bf16(8, 16, seed=1), _bf16(32, 16, seed=2))),
    "classification": (lambda logits: losses.classification(logits, jnp.arange(8) % 4)[0],
                       (_bf16(8, 4) * 10,)),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_cast_bf16_inputs_to_float32_first(name):
    """Given bf16 embeddings / logits, every op of the loss but the casts themselves
    is float32: the casts come before normalising, the temperature and the softmax.
    Removing the cast in losses.l2_normalize (contrastive losses) or in
    losses.cross_entropy (classification) makes this fail."""
    fn, args = LOSSES[name]
    for g in (fn, jax.grad(fn)):  # the backward pass of the temperature division too
        eqns = list(equations(jax.make_jaxpr(g)(*args).jaxpr))
        low = sorted({e.primitive.name for e in eqns if e.primitive.name not in EXACT
                      and out_dtypes(e) & {"bfloat16", "float16"}})
        assert not low, low
    # And the value is the float32 loss of the same (bf16-representable) numbers.
    value = fn(*args)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, fn(*[a.astype(jnp.float32) for a in args]), rtol=1e-6)


def test_bf16_loss_tracks_float32_over_ten_steps():
    """SimCLR on the tiny ConvNet, same initial parameters, same batches: the bf16
    run's loss stays within 2% of the float32 run's over 10 steps.

    Why 2%: bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%) per
    activation; the pooled features average thousands of them, the loss itself is
    float32, and the optimizer (AdamW, lr 2e-3) moves the parameters by ~0.2% per
    step, so the two runs' parameters stay close. Measured here: 0.03% to 0.98%
    per step (losses ~8.7; 0.02% to 0.29% before SimCLR's head normalised its
    output, whose per-dimension batch statistics over 2B = 64 rows pass the
    encoder's rounding on); the bound still catches a run that drifts (or a bf16
    loss, whose temperature division alone rounds the logits by ~0.4%, then
    exponentiated).
    """
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (B, 28, 28, 1)).astype(np.uint8),
                "index": np.arange(B, dtype=np.int32), "label": np.zeros(B, np.int32)}
               for _ in range(10)]
    start, curves = None, {}
    for dtype in ("float32", "bfloat16"):
        c = tiny_config("simclr", dtype)
        c.optimizer.update(warmup_steps=None, warmup_epochs=None, schedule="constant")
        exp = experiment.Experiment(c, SPEC, mesh)
        if start is None:  # the same parameters: initialisation does not depend on dtype
            start = jax.device_get(exp.initial_state())
        state, step, curve = jax.device_put(start, exp.state_sharding), exp.train_step(), []
        with jax.set_mesh(mesh):
            for b in batches:
                state, metrics = step(state, jax.device_put(b, exp.batch_sharding))
                curve.append(float(metrics["loss"]))
        curves[dtype] = np.array(curve)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state)
                   if jnp.issubdtype(leaf.dtype, jnp.inexact))
    f32, bf16 = curves["float32"], curves["bfloat16"]
    rel = np.abs(bf16 - f32) / f32
    # The parameters move, so the comparison covers a training run. (Not "the loss
    # falls": ten steps on noise images with the normalised head do not trend.)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         jax.device_get(state["params"]["encoder"]), start["params"]["encoder"])
    assert min(jax.tree.leaves(moved)) > 1e-3, moved
    assert rel.max() < 2e-2, (rel, f32, bf16)
