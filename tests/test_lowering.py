"""Every method's train step (and initialiser), and the evaluation's feature step,
lower for TPU and CUDA.

No accelerator is lent to this project, so this proves what can be proved without
one: the jitted step -- as the setup layer builds it, over an 8-device mesh with its
NamedShardings and donation -- goes through `jax.export.export(step,
platforms=("tpu", "cuda"))`. Lowering needs no device, and JAX lowers each
primitive with each platform's own rule, so this fails when the step holds:
  - a host callback (jax.debug.callback / print, pure_callback, io_callback): export
    fails on it (for debug.callback with a bare TypeError from inside JAX 0.10), and
    the test then names it from the traced jaxpr, with its source line;
  - a primitive that has a lowering for CPU only ("MLIR translation rule ... not
    found for platforms ['tpu', 'cuda']");
  - a custom call JAX does not guarantee on those platforms (export refuses it,
    unless disabled_checks waives the check: the test never does, and it also
    refuses any custom_call target in the module text outside PORTABLE_TARGETS).
What it cannot prove: that XLA:TPU / XLA:GPU compile the module (memory, an
unsupported layout) or that the numbers on an accelerator equal the CPU's. No
compilation, no training: abstract shapes only, a tiny config of each method.

One fresh process with 8 CPU devices lowers every case (tests/multidevice.py);
each case is its own test here. A case is (configs/ preset, encoder, options):
adding a ViT or multi-crop case is one line of CASES once ENCODERS / OPTIONS know
the name.
"""
from __future__ import annotations

import re

import pytest

from tests import multidevice

PLATFORMS = ("tpu", "cuda")

# config.model per encoder: tiny, and otherwise the preset's (the fashion_mnist
# presets' ConvNet keeps its conv="im2col_wgrad"). A dict naming another encoder
# replaces config.model; one without a name updates the preset's.
ENCODERS = {
    "convnet": dict(widths=(4, 8)),
    # The accelerator presets' encoder (cifar10 / imagenet2012), computing in bfloat16.
    "resnet18": dict(name="resnet18", stem="small", width=0.125, dtype="bfloat16"),
    # A ViT (models/vit.py) in bfloat16 with every option a step can trace: drop path
    # (the step's rng), registers, LayerScale, the learned table resampled for local crops.
    # CMC's channel views: the cmc_lab model over the cifar10 preset's ResNet-18 (each
    # half at half of this width), in bfloat16 with Lab in float32.
    "cmc_lab": dict(width=0.125, dtype="bfloat16"),
    "vit": dict(name="vit", patch=4, width=16, depth=2, heads=2, mlp_ratio=2, img_size=(28, 28),
                registers=1, layerscale=1e-5, drop_path=0.1, pos_embed="learned",
                dtype="bfloat16"),
}
# Per option: an argument of the preset (after the colon), or config overrides
# (dotted keys).
OPTIONS = {
    "temporal": "positives=temporal",  # video positives: two images per example (views.pair)
    "region": "positives=region",
    "accumulate": {"accumulate_steps": 2},  # the loss in a lax.scan over micro-batches
    "online": {"online.linear": True},  # the online probe's update inside the step
    "canvas": {"data.canvas": 40},  # images of varying size: canvases, crops on device
    "multicrop": "local_crops=2,local_size=12",  # 2 global + 2 local crops: a group each
    "dinov2": "koleo,sinkhorn,ibot",  # DINO's options: KoLeo, Sinkhorn-Knopp, iBOT's masks
    "mask_token": {"model.mask_token": True},  # the ViT's, which iBOT's masks need
    "model=convnet": "model=convnet",  # a preset whose default encoder is a ViT (DINO's)
    "channels": "dataset=cifar10,views=channels",  # CMC's L and ab: RGB data, cmc_lab
    "nce": "objective=nce",  # CMC's NCE: a sharded memory bank per view, Z in the state
}
SPECS = {"canvas": dict(image_shape=(40, 40, 1), varying_size=True),  # the data an option needs
         "channels": dict(image_shape=(32, 32, 3))}
CASES = [
    ("simclr", "convnet", ()),
    ("moco", "convnet", ()),
    ("npid", "convnet", ()),
    ("pirl", "convnet", ()),
    ("rotnet", "convnet", ()),
    ("jigsaw", "convnet", ()),
    ("supervised", "convnet", ()),
    ("simclr", "convnet", ("temporal",)),
    ("moco_video", "convnet", ("region",)),
    ("moco", "convnet", ("accumulate",)),
    ("simclr", "convnet", ("online", "canvas")),
    ("simclr", "resnet18", ()),
    ("simclr", "vit", ()),
    ("simclr", "vit", ("multicrop",)),
    ("simclr", "convnet", ("multicrop", "canvas")),
    ("simclr", "vit", ("multicrop", "accumulate")),  # crop groups sliced per micro-batch
    ("moco", "vit", ()),
    ("npid", "vit", ()),
    ("supervised", "vit", ()),
    ("polyview", "convnet", ()),  # M = 4 views, one encoder call, Poly-View's loss
    ("cmc", "vit", ()),
    ("cmc", "cmc_lab", ("channels",)),  # two half-width encoders on Lab computed on device
    ("cmc", "convnet", ("nce",)),
    ("dino", "convnet", ("model=convnet",)),  # teacher EMA, centring, multi-crop, BN in the teacher
    ("dino", "vit", ("dinov2", "mask_token", "accumulate")),
]
# The evaluation's feature extraction step (eval/features.py), per encoder and pool;
# "augment": with the linear probe's light_augment transform.
FEATURE_CASES = [("convnet", "avg2x2", False), ("convnet", "global", True),
                 ("resnet18", "global", False), ("vit", "dino", False)]

# Custom-call targets that every platform's XLA handles (sharding annotations of the
# SPMD partitioner). Anything else in a step is to be reviewed before it is added:
# e.g. jnp.linalg lowers per platform (lapack_* on CPU, cusolver_* / Eigh on GPU / TPU).
PORTABLE_TARGETS = ("Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape")


def case_id(case) -> str:
    preset, encoder, options = case
    return "-".join((preset, encoder) + tuple(options))


def feature_case_id(case) -> str:
    encoder, pool, augment = case
    return "-".join(("features", encoder, pool) + (("augment",) if augment else ()))


# ------------------------------------------------ run in the 8-device process


def tiny_config(preset: str, encoder: str, options=()):
    """configs/<preset>.py's fashion_mnist runlocal preset (with the preset arguments
    of `options`), shrunk (batch 16, small heads and queues), with config.model from
    ENCODERS[encoder] and the overrides of the other options."""
    from ssl_jax.config import load_file

    args = ["dataset=fashion_mnist", "runlocal"] + [
        OPTIONS[o] for o in options if isinstance(OPTIONS[o], str)]
    c = load_file(f"configs/{preset}.py:{','.join(args)}")
    c.batch_size = 16
    if "head" in c:
        c.head.hidden, c.head.dim = 16, 8
    if c.method == "moco":
        c.moco.queue_size, c.moco.bn_groups = 64, 4
    model = ENCODERS[encoder]
    if model.get("name", c.model.name) != c.model.name:
        c.model = model
    else:
        c.model.update(model)
    overrides = [OPTIONS[o] for o in options if not isinstance(OPTIONS[o], str)]
    for key, value in {k: v for o in overrides for k, v in o.items()}.items():
        *path, name = key.split(".")
        node = c
        for p in path:
            node = node[p]
        node[name] = value
    return c


def data_spec(options=()):
    """A tiny dataset's facts: Fashion-MNIST-like, or SPECS[o]'s for o in options."""
    from ssl_jax.dataspec import DataSpec

    facts = dict(num_examples=64, image_shape=(28, 28, 1), num_classes=10)
    for o in options:
        facts.update(SPECS.get(o, {}))
    return DataSpec(**facts)


def abstract_batch(exp) -> dict:
    """The step's batch as ShapeDtypeStructs sharded over the mesh (train_step's
    docstring), built from the experiment's own sample of what the views get."""
    import jax
    import jax.numpy as jnp

    from ssl_jax.views import canvas, pair

    def images(x, prefix: str) -> dict:
        if isinstance(x, canvas.Canvas):
            return {prefix + "image": x.pixels, prefix + "image_hw": x.hw}
        return {prefix + "image": x}
    s = exp.sample
    batch = (dict(images(s.query, ""), **images(s.key, "key_")) if isinstance(s, pair.Pair)
             else images(s, ""))
    b = exp.config.batch_size
    for name in ("index", "label"):
        batch[name] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=exp.batch_sharding)
    return batch


def callbacks(jaxpr) -> list[str]:
    """'primitive at file:line' of every host callback in jaxpr, sub-jaxprs included
    (the scan of accumulation, the cond of the non-finite guard): a primitive named
    for one (pure_callback, io_callback, debug_callback, debug_print), or any other
    with a side effect (a pure_callback has none; the others do)."""
    from jax._src import source_info_util
    from jax.extend import core

    found = []

    def walk(j):
        for eqn in j.eqns:
            subs = list(core.jaxprs_in_params(eqn.params))
            name = eqn.primitive.name
            if "callback" in name or "print" in name or (eqn.effects and not subs):
                found.append(f"{name} at {source_info_util.summarize(eqn.source_info)}")
            for sub in subs:
                walk(sub)
    walk(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr)
    return found


def portability_problems(jitted, *args) -> str:
    """'' when jitted(*args) exports for PLATFORMS, else what stops it (one line each)."""
    import jax

    try:
        exported = jax.export.export(jitted, platforms=PLATFORMS)(*args)
    except Exception as e:  # noqa: BLE001 -- reported as the case's failure
        try:  # a host callback: named with its source line (traced again only on failure)
            found = callbacks(jitted.trace(*args).jaxpr)
        except Exception:  # noqa: BLE001 -- tracing itself failed: export's error says why
            found = []
        if found:
            return "host callbacks in the step: " + "; ".join(found)
        return f"jax.export for {PLATFORMS} failed: {type(e).__name__}: {e}"
    problems = []
    text = exported.mlir_module()
    targets = sorted(set(re.findall(r"custom_call @([\w.$-]+)", text)) - set(PORTABLE_TARGETS))
    if targets:
        problems.append(f"custom calls not known to be portable: {targets}")
    if exported.platforms != PLATFORMS:
        problems.append(f"exported for {exported.platforms}")
    if exported.ordered_effects or exported.unordered_effects:
        problems.append(f"effects {exported.ordered_effects + exported.unordered_effects}")
    if exported.nr_devices != jax.device_count():
        problems.append(f"{exported.nr_devices} devices, not {jax.device_count()}")
    return "; ".join(problems)


def lower_all(out: dict, cases=None, feature_cases=None) -> None:
    """out[case id] = portability_problems of that case's train step (or feature
    step; id + "-init": its initialiser, for cases without options), '' when it
    exports for PLATFORMS; out['devices'] = the device count."""
    import jax

    from ssl_jax import experiment, parallel
    from ssl_jax.eval import features
    from ssl_jax.methods import network

    jax.config.update("jax_threefry_partitionable", False)  # as conftest's fast_prng
    mesh = parallel.make_mesh()
    out["devices"] = len(jax.devices())

    def train_step(case):
        config = tiny_config(*case)
        exp = experiment.Experiment(config, data_spec(case[2]), mesh)
        return exp.train_step(), exp.abstract_state(), abstract_batch(exp)

    def initialiser(case):  # the first program a run executes (Experiment.initial_state)
        config = tiny_config(*case)
        exp = experiment.Experiment(config, data_spec(case[2]), mesh)
        return jax.jit(exp.init_state, out_shardings=exp.state_sharding), exp.sample

    def feature_step(case):
        encoder, pool, augment = case
        config = tiny_config("simclr", encoder)
        exp = experiment.Experiment(config, data_spec(), mesh)
        fn = features.make_features_fn(network.make_encoder(config.model),
                                       features.eval_view_config(config), pool)
        state = exp.abstract_state()
        variables = network.encoder_variables(state["params"], state["method_state"])
        step = features._jitted_step(fn, mesh, features.light_augment if augment else None)
        b = abstract_batch(exp)  # what extract() feeds the step: + padding mask, seeds
        batch = dict(image=b["image"], label=b["label"], index=b["index"], seed=b["index"],
                     mask=jax.ShapeDtypeStruct(b["index"].shape, bool,
                                               sharding=b["index"].sharding))
        return step, variables, batch

    cases = CASES if cases is None else cases
    todo = [(case_id(c), train_step, c) for c in cases] + [
        (case_id(c) + "-init", initialiser, c) for c in cases if not c[2]] + [
        (feature_case_id(c), feature_step, c)
        for c in (FEATURE_CASES if feature_cases is None else feature_cases)]
    with jax.set_mesh(mesh):
        for name, build, case in todo:
            try:  # a case that cannot even be built fails as itself, not the whole module
                step, *args = build(case)
            except Exception as e:  # noqa: BLE001
                out[name] = f"building the step failed: {type(e).__name__}: {e}"
                continue
            out[name] = portability_problems(step, *args)


# ------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    out = multidevice.run("from tests.test_lowering import lower_all\nlower_all(out)\n",
                          tmp_path_factory.mktemp("lowering"))
    return {k: v.item() if v.shape == () else v for k, v in out.items()}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_train_step_lowers_for_tpu_and_cuda(case, lowered):
    assert lowered["devices"] == 8
    if lowered[case_id(case)]:
        pytest.fail(f"{case_id(case)}: {lowered[case_id(case)]}", pytrace=False)


@pytest.mark.parametrize("case", [c for c in CASES if not c[2]], ids=case_id)
def test_initialiser_lowers_for_tpu_and_cuda(case, lowered):
    """The jitted init of the train state (once per encoder and method: options
    change the step more than the initialiser)."""
    if lowered[case_id(case) + "-init"]:
        pytest.fail(f"{case_id(case)}-init: {lowered[case_id(case) + '-init']}", pytrace=False)


@pytest.mark.parametrize("case", FEATURE_CASES, ids=feature_case_id)
def test_feature_step_lowers_for_tpu_and_cuda(case, lowered):
    if lowered[feature_case_id(case)]:
        pytest.fail(f"{feature_case_id(case)}: {lowered[feature_case_id(case)]}", pytrace=False)


def test_every_method_has_a_case_and_the_convnet_cases_keep_the_presets_conv():
    """Every registered method is lowered; the ConvNet cases lower the fashion_mnist
    presets' own convolution (models/conv.py's matmul weight gradient, made for
    CPUs): it is plain pads, slices and dots, portable, so those presets need no
    CPU-only refusal."""
    from ssl_jax import methods

    configs = {case_id(case): tiny_config(*case) for case in CASES}
    assert {c.method for c in configs.values()} == set(methods.METHODS)
    for name, c in configs.items():
        if c.model.name == "convnet":
            assert c.model.conv == "im2col_wgrad", name
