"""Gradient accumulation (config.accumulate_steps = A): what it equals, pinned.

(a) Supervised and RotNet. A step over A micro-batches equals the A = 1 step on
    the same global batch when BatchNorm normalises the same sets of images in
    both, i.e. when the A = 1 run's ghost-BN groups are exactly the accumulated
    run's (micro-batch, group) blocks. Micro-batch j holds the j-th of A slices of
    every device's rows (accumulate.grads_fn), so with the accumulated
    run's config.model.bn_groups = G a multiple of the device count n, each of its
    groups is B / (A G) contiguous rows of the global batch: the A = 1 run with
    bn_groups = A G. We use G = 8, which serves n = 1 and n = 8.
    Equal there: the loss, the parameters and the optimizer state, up to float32
    summation order (the gradient is a mean of A partial means instead of one mean).
    Not equal, by design: the BN running averages (state["method_state"]
    ["batch_stats"]) move A times per step (momentum m^A on the old value) against
    once, so they are not compared. With other groupings (plain BN, bn_groups = 1)
    each micro-batch is normalised with its own statistics: a different function,
    which on n > 1 devices also depends on n (a micro-batch gathers a slice of
    every device). The test shows one mismatched grouping differs by far more than
    the tolerance, so the equality is not vacuous.
(b) MoCo with A = 4: the key encoder moves once per step, key <- m key + (1 - m)
    query from the pre-step parameters (checked in NumPy), and the queue pointer
    advances by the global batch B per step, with exactly the B rows after it
    replaced by unit keys.
(c) An accumulate_steps that does not divide the per-device batch: a UserError
    from the Experiment's constructor, before anything is traced or compiled,
    naming the value to use.
(a) and (b) run on 1 and on 8 simulated devices (tests/multidevice.py).
"""
import numpy as np
import pytest

from ssl_jax import errors, experiment, parallel
from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec
from tests import multidevice

B, STEPS = 64, 3
# (accumulate_steps, model.bn_groups): A = 4 against its whole-batch twin (1, 32), and
# (1, 16) for the sensitivity check. Each pair is a compiled step on 1 and 8 devices,
# but (1, 16) on 1 only: that the tolerance tells groupings apart is shown once, and
# the 8-device runs are held to the same tolerance.
RUNS = ((1, 16), (1, 32), (4, 8))

SNIPPET = f"""
import jax, jax.numpy as jnp
jax.config.update("jax_threefry_partitionable", False)  # as fast_prng (conftest.py)
from ssl_jax import errors, experiment, parallel
from ssl_jax.config import load_file
from ssl_jax.dataspec import DataSpec
B, STEPS = {B}, {STEPS}
spec = DataSpec(num_examples=256, image_shape=(28, 28, 1), num_classes=10)
mesh = parallel.make_mesh()
out["devices"] = len(jax.devices())
rng = np.random.default_rng(0)
batches = [dict(image=rng.integers(0, 256, (B, 28, 28, 1)).astype(np.uint8),
                index=rng.permutation(256)[:B].astype(np.int32),
                label=rng.integers(0, 10, B).astype(np.int32)) for _ in range(STEPS)]

def config(method, a, groups=None):
    c = load_file(f"configs/{{method}}.py:runlocal")
    c.batch_size, c.accumulate_steps = B, a
    # Two small blocks and XLA's own conv: compiling dominates, and it scales with the graph.
    c.model.update(widths=(4, 8), conv="xla")
    if groups is not None:
        c.model.bn_groups = groups
    if method == "moco":
        c.head.hidden, c.head.dim = 16, 8
        c.moco.update(queue_size=2 * B, bn_groups=4, momentum=0.9)  # 0.9: m vs m^4 is visible
    # SGD: the update is linear in the gradient, so runs differ by the gradient's
    # rounding times lr. (Adam divides by sqrt(v): an element with gradient ~0 can
    # turn rounding noise into a +-lr step.) Constant, no warm-up: every step moves
    # (a cosine schedule starts at lr 0 even without warm-up).
    c.optimizer.update(name="sgd", lr=0.1, lr_batch_scale=0, momentum=0.9, schedule="constant",
                       warmup_steps=None, warmup_epochs=None, decay_steps=None)
    return c

def flat(prefix, tree):
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
        out[prefix + jax.tree_util.keystr(path)] = leaf

def train(c, start, record=None):
    exp = experiment.Experiment(c, spec, mesh)
    state, step, losses = jax.device_put(start, exp.state_sharding), exp.train_step(), []
    with jax.set_mesh(mesh):
        for s, b in enumerate(batches):
            if record:
                record(s, "before", state)
            state, metrics = step(state, jax.device_put(b, exp.batch_sharding))
            losses.append(metrics["loss"])
            if record:
                record(s, "after", state)
    return jax.device_get(state), np.array(losses)

for method in ("supervised", "rotnet"):
    # One initial state for every run: the parameters do not depend on the BN groups.
    start = jax.device_get(experiment.Experiment(config(method, 1), spec, mesh).initial_state())
    for a, g in {RUNS}:
        if (a, g) == (1, 16) and len(jax.devices()) > 1:
            continue  # the sensitivity check's run: one device shows it (see the test)
        state, losses = train(config(method, a, g), start)
        out[f"{{method}}_{{a}}_{{g}}/loss"] = losses
        flat(f"{{method}}_{{a}}_{{g}}/params", state["params"])
        flat(f"{{method}}_{{a}}_{{g}}/opt_state", state["opt_state"])
        out[f"{{method}}_{{a}}_{{g}}/step"] = state["step"]

c = config("moco", 4)
start = jax.device_get(experiment.Experiment(c, spec, mesh).initial_state())
def record(s, when, state):
    ms = state["method_state"]
    if when == "before":
        flat(f"moco{{s}}/params", state["params"])
    flat(f"moco{{s}}/{{when}}/key", ms["key_params"])
    out[f"moco{{s}}/{{when}}/queue"] = jax.device_get(ms["queue"])
    out[f"moco{{s}}/{{when}}/ptr"] = jax.device_get(ms["queue_ptr"])
train(c, start, record)

# The per-device batch decides: 64 / 16 fits one device, not 8 (8 images each).
try:
    experiment.Experiment(config("supervised", 16), spec, mesh)
    out["a16_error"] = ""
except errors.UserError as e:
    out["a16_error"] = str(e)
"""


@pytest.fixture(scope="module")
def one_and_eight(tmp_path_factory):
    return multidevice.run_one_and_eight(SNIPPET, tmp_path_factory)


def _tree(out, prefix):
    return {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}


def _close(a, b, rtol):
    """Leaf-wise |a - b| <= rtol * (|b| + max|b|): relative to each leaf's scale, so
    elements that pass near 0 (where a relative bound alone is meaningless) are
    held to the leaf's own magnitude."""
    assert a.keys() == b.keys() and a
    return all(np.all(np.abs(a[k] - b[k]) <= rtol * (np.abs(b[k]) + np.abs(b[k]).max()))
               for k in a)


@pytest.mark.parametrize("method", ["supervised", "rotnet"])
def test_accumulated_step_equals_the_whole_batch_step_with_matching_bn_groups(
        method, one_and_eight):
    # 1e-4 of each leaf's scale: float32 rounds at 6e-8, the gradient's sums are
    # reordered (a mean of A partial means), and 3 steps feed each step's error through
    # the net into the next gradient. Measured here: the loss agrees to 1e-7; the
    # state to <= 2e-5, in the first BN's bias (~1e-3 in size), whose gradient is a
    # sum over every pixel of nearly cancelling terms: its rounding is relative to the
    # terms, not to the small sum. A mismatched BN grouping (below) differs by > 0.1.
    rtol = 1e-4
    for out in one_and_eight:
        for a, g in ((4, 8),):
            acc, whole = f"{method}_{a}_{g}/", f"{method}_1_{g * a}/"
            np.testing.assert_allclose(out[acc + "loss"], out[whole + "loss"], rtol=rtol)
            assert int(out[acc + "step"]) == int(out[whole + "step"]) == STEPS
            for part in ("params", "opt_state"):
                assert _close(_tree(out, acc + part), _tree(out, whole + part), rtol), (
                    method, a, part, int(out["devices"]))
    one, eight = one_and_eight
    # Sensitivity: A = 4 with groups of 2 images against A = 1 with groups of 4.
    acc, other = _tree(one, f"{method}_4_8/params"), _tree(one, f"{method}_1_16/params")
    assert not _close(acc, other, 1e-2)  # measured: 0.17 (RotNet), 0.27 (supervised)
    assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
    # With these groups the run does not depend on the device count either (2e-4:
    # XLA partitions the 8-device program's reductions differently; measured 2e-5).
    assert _close(_tree(eight, f"{method}_4_8/"), _tree(one, f"{method}_4_8/"), 2e-4)


def test_moco_key_encoder_moves_once_and_queue_advances_by_the_batch(one_and_eight):
    m, k_size = 0.9, 2 * B
    for out in one_and_eight:
        for s in range(STEPS):
            params = _tree(out, f"moco{s}/params")
            key, new_key = _tree(out, f"moco{s}/before/key"), _tree(out, f"moco{s}/after/key")
            once = {k: m * key[k].astype(np.float64) + (1 - m) * params[k] for k in key}
            assert _close(new_key, once, 1e-6), (s, int(out["devices"]))
            if s > 0:  # at step 0 the key encoder is a copy of the query encoder: any m fits
                # The move itself, new - old: (1 - m)(query - key), not (1 - m^4)(...) as
                # a per-micro-batch update would give (3.4x larger). 1e-2: new - old
                # cancels ~all digits of a float32 key that moves by ~1e-4 of its size.
                moved = {k: new_key[k] - key[k].astype(np.float64) for k in key}
                move = {k: (1 - m) * (params[k] - key[k].astype(np.float64)) for k in key}
                assert _close(moved, move, 1e-2)
                assert not _close(moved, {k: v * (1 - m ** 4) / (1 - m) for k, v in move.items()},
                                  0.1)

            ptr, new_ptr = int(out[f"moco{s}/before/ptr"]), int(out[f"moco{s}/after/ptr"])
            assert ptr == s * B % k_size and new_ptr == (ptr + B) % k_size
            queue, new_queue = out[f"moco{s}/before/queue"], out[f"moco{s}/after/queue"]
            rows = np.arange(ptr, ptr + B)
            kept = np.setdiff1d(np.arange(k_size), rows)
            np.testing.assert_array_equal(new_queue[kept], queue[kept])
            assert not np.any(np.all(new_queue[rows] == queue[rows], axis=1))
            np.testing.assert_allclose(np.linalg.norm(new_queue[rows], axis=1), 1.0, rtol=1e-5)


def test_accumulate_steps_checked_against_the_per_device_batch(one_and_eight):
    one, eight = one_and_eight
    assert str(one["a16_error"]) == ""  # 64 images on one device split in 16 micro-batches
    msg = str(eight["a16_error"])
    assert "accumulate_steps=16 does not divide the per-device batch 8" in msg
    assert "--config.accumulate_steps=8" in msg and "multiple of 128" in msg


def _config(method, **fields):
    c = load_file(f"configs/{method}.py:runlocal")
    c.batch_size = B
    for k, v in fields.items():  # deleted first: a ConfigDict field keeps its type
        del c[k]
        c[k] = v
    return c


@pytest.mark.parametrize("value, fix", [
    (3, "--config.accumulate_steps=2"), (48, "--config.accumulate_steps=32"),
    (0, "integer >= 1"), (2.0, "integer >= 1"), (True, "integer >= 1")])
def test_bad_accumulate_steps_is_a_user_error_before_tracing(value, fix, monkeypatch):
    # The constructor traces the state's initialiser only after its checks: a call
    # here would mean the error came late (after work, or from inside a trace).
    monkeypatch.setattr(experiment.Experiment, "init_state",
                        lambda *a: pytest.fail("traced before the check"))
    spec = DataSpec(num_examples=256, image_shape=(28, 28, 1), num_classes=10)
    with pytest.raises(errors.UserError, match=f"accumulate_steps={value!r}") as e:
        experiment.Experiment(_config("supervised", accumulate_steps=value), spec,
                              parallel.make_mesh())
    assert fix in str(e.value)


def test_moco_micro_batch_must_split_into_its_bn_groups():
    c = _config("moco", accumulate_steps=4)
    c.moco.update(queue_size=2 * B, bn_groups=32)
    spec = DataSpec(num_examples=256, image_shape=(28, 28, 1))
    with pytest.raises(errors.UserError, match=r"micro-batch of 16 images .*moco.bn_groups=32"):
        experiment.Experiment(c, spec, parallel.make_mesh())
