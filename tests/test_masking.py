"""iBOT / DINOv2 block masks (ssl_jax/views/masking.py) against a NumPy transcription of
DINOv2's MaskingGenerator driven by the same random numbers, the batch's targets as
collate_data_and_cast draws them, and the ViT's mask token (ssl_jax/models/vit.py)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import models
from ssl_jax.errors import UserError
from ssl_jax.views import masking

pytestmark = pytest.mark.usefixtures("fast_prng")


def _np_block_mask(uniforms, target, grid, min_patches=4, max_patches=None,
                   aspect=(0.3, 1 / 0.3)):
    """dinov2/data/masking.py MaskingGenerator.__call__ and _mask, line by line, with
    attempt i's random numbers read from uniforms[i] (random.uniform(a, b) = a + (b - a) u,
    random.randint(a, b) = a + floor(u (b - a + 1))) and the same bound on attempts."""
    gh, gw = grid
    max_patches = 0.5 * gh * gw if max_patches is None else max_patches
    lo, hi = math.log(aspect[0]), math.log(aspect[1])
    mask = np.zeros(grid, bool)
    count, i = 0, 0
    while count < target:
        room = min(target - count, max_patches)
        delta = 0
        for _ in range(10):
            if i == len(uniforms):
                return mask
            u = uniforms[i].astype(np.float64)
            i += 1
            area = min_patches + (room - min_patches) * u[0]
            ratio = math.exp(lo + (hi - lo) * u[1])
            h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if w < gw and h < gh:
                top, left = int(u[2] * (gh - h + 1)), int(u[3] * (gw - w + 1))
                new = h * w - mask[top:top + h, left:left + w].sum()
                if 0 < new <= room:
                    mask[top:top + h, left:left + w] = True
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


@pytest.mark.parametrize("grid", [(8, 8), (6, 10)])
def test_block_mask_is_dinov2s_masking_generator(grid):
    """Same random numbers, same masks, for targets from 0 to 0.6 N (past max_patches)."""
    n, attempts = 48, 64
    r = np.random.default_rng(grid[1])
    uniforms = r.random((n, attempts, 4)).astype(np.float32)
    targets = r.integers(0, int(0.6 * grid[0] * grid[1]), n).astype(np.int32)
    got = np.asarray(jax.jit(jax.vmap(lambda u, t: masking.block_mask(u, t, grid)))(
        uniforms, targets))
    want = np.stack([_np_block_mask(u, t, grid) for u, t in zip(uniforms, targets)])
    np.testing.assert_array_equal(got, want)
    counts = got.sum((1, 2))  # max_patches bounds each rectangle, not the total
    assert np.all(counts <= targets) and counts.max() > 0.5 * grid[0] * grid[1]
    assert np.mean(counts >= targets - 3) > 0.8  # rarely short of the target by much


def test_mask_targets_one_per_bin_for_exactly_int_batch_times_prob_crops():
    """collate_data_and_cast: int(B p) crops, the i-th with int(N U(r_i, r_i+1)) patches,
    r = linspace(0.1, 0.5, n + 1); the others 0; shuffled."""
    batch, n_patches = 12, 64
    got = np.asarray(jax.jit(masking.mask_targets, static_argnums=(1, 2))(
        jax.random.key(0), batch, n_patches))
    n = int(batch * 0.5)
    assert np.sum(got > 0) == n
    edges = np.linspace(0.1, 0.5, n + 1)
    for t, lo, hi in zip(np.sort(got[got > 0]), edges[:-1], edges[1:]):
        assert int(n_patches * lo) <= t <= int(n_patches * hi)
    assert not np.all(got[:n] > 0)  # shuffled (at this key), not the first n


def test_block_masks_batch_counts_blocks_and_determinism():
    batch, grid = 16, (8, 8)
    fn = jax.jit(masking.block_masks, static_argnums=(1, 2))
    masks = np.asarray(fn(jax.random.key(3), batch, grid))
    assert masks.shape == (batch, 64) and masks.dtype == bool
    counts = masks.sum(1)
    assert np.sum(counts > 0) == 8  # exactly int(16 * 0.5) masked crops
    assert counts.max() <= int(64 * 0.5) and counts[counts > 0].min() >= 2
    # Blocks, not scattered patches: nearly every masked patch has a masked 4-neighbour
    # (i.i.d. patches at the same density: ~1 - 0.7^4 = 76%).
    m = masks.reshape(batch, *grid)
    pad = np.pad(m, ((0, 0), (1, 1), (1, 1)))
    neighbour = pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2] | pad[:, 1:-1, 2:]
    assert np.mean(neighbour[m]) > 0.9
    np.testing.assert_array_equal(np.asarray(fn(jax.random.key(3), batch, grid)), masks)
    assert not np.array_equal(np.asarray(fn(jax.random.key(4), batch, grid)), masks)


# ------------------------------------------------------------------ the ViT's mask token

def _vit(**kw):
    return models.make_encoder("vit", patch=4, width=16, depth=1, heads=2, img_size=16, **kw)


def test_vit_mask_token_replaces_masked_patches_before_the_position_embedding():
    on, off = _vit(mask_token=True), _vit()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    init = lambda model: jax.jit(model.init, static_argnames="train")(
        jax.random.key(0), x, train=False)["params"]
    p_on, p_off = init(on), init(off)
    # Off: the parameter tree is what it was; on: the same plus a zero (1, 1, D) token.
    assert "mask_token" not in p_off
    np.testing.assert_array_equal(p_on["mask_token"], np.zeros((1, 1, 16)))
    jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in p_on.items()
                                                 if k != "mask_token"}, p_off)
    params = dict(p_on, mask_token=jnp.full((1, 1, 16), 0.5))
    apply = jax.jit(lambda p, x, m: on.apply({"params": p}, x, train=False, masks=m))
    patches = lambda feats: np.asarray(feats["block1"].patches).reshape(2, 16, 16)
    plain = patches(jax.jit(lambda p, x: on.apply({"params": p}, x, train=False))(params, x))
    np.testing.assert_allclose(patches(apply(params, x, jnp.zeros((2, 16), bool))), plain,
                               rtol=1e-6, atol=1e-6)
    masks = np.zeros((2, 16), bool)
    masks[0, [0, 5, 10]] = True
    masked = patches(apply(params, x, jnp.asarray(masks)))
    assert np.abs(masked[0] - plain[0]).max() > 1e-3
    np.testing.assert_allclose(masked[1], plain[1], rtol=1e-6, atol=1e-6)  # nothing masked
    # The masked patches' pixels are not seen at all ...
    x2 = np.array(x)
    x2[0, 4:8, 4:8] += 3.0  # patch 5 (row 1, column 1)
    np.testing.assert_allclose(patches(apply(params, jnp.asarray(x2), jnp.asarray(masks))),
                               masked, rtol=1e-6, atol=1e-6)
    # ... and each masked token still carries its position (added after the token):
    # the same token at two places gives two outputs.
    assert np.abs(masked[0, 0] - masked[0, 5]).max() > 1e-3


def test_vit_masks_without_a_mask_token_name_the_config_field():
    model = _vit()
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    with pytest.raises(UserError, match="config.model.mask_token"):  # raised while tracing
        jax.eval_shape(lambda p, x: model.apply(p, x, train=False,
                                                masks=jnp.zeros((1, 16), bool)), params, x)
    assert models.stages("vit", depth=1, mask_token=True) == ["block1"]
