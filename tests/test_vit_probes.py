"""Probes of a Vision Transformer: each pool of a block's tokens is the vector the papers
read (class token, mean patch token, a grid of patches, DINO's linear-eval feature), a
ViT's default is its class token while a ConvNet's stays the global average (and its
file names with it), bad pools and stages are refused before anything is written, and
--plot draws the last block's class-token attention (DINO's figure).

A small fake linen encoder stands in for models/vit.py: it returns models.Tokens per
block and sows a cls_attention, as the contract (models/tokens.py) says a ViT does.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ssl_jax import evaluation, export, models, parallel
from ssl_jax.data import sources
from ssl_jax.errors import UserError
from ssl_jax.eval import attention, features
from ssl_jax.models.tokens import Tokens
from ssl_jax.views import augment

VIEW = augment.eval_view_config(crop_size=(28, 28), mean=(0.5,), std=(0.25,))


class FakeViT(nn.Module):
    """images (B, 28, 28, C) -> {"block1".."block{depth}": Tokens} with a 4x4 patch grid;
    the last block sows cls_attention (B, heads, 4, 4), a softmax over the patches."""
    depth: int = 5
    width: int = 8
    heads: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, d = x.shape[0], self.width
        p = nn.Conv(d, (7, 7), strides=(7, 7), padding="VALID")(x)  # (B, 4, 4, D)
        cls = jnp.broadcast_to(self.param("cls", nn.initializers.normal(1.0), (d,)), (b, d))
        out = {}
        for i in range(self.depth):
            p = jnp.tanh(nn.Dense(d)(p))
            cls = jnp.tanh(nn.Dense(d)(cls) + p.mean((1, 2)))
            out[f"block{i + 1}"] = Tokens(cls=cls, patches=p, registers=jnp.zeros((b, 0, d)))
        q = self.param("query", nn.initializers.normal(1.0), (self.heads, d))
        logits = jnp.einsum("bhwd,nd->bnhw", p, q)
        a = jax.nn.softmax(logits.reshape(b, self.heads, -1), -1).reshape(logits.shape)
        self.sow("intermediates", "cls_attention", a)
        return out


@pytest.fixture
def fake_vit_registered(monkeypatch):
    """config.model.name "fake_vit" builds FakeViT, its stages block1..block{depth}."""
    monkeypatch.setitem(models.ENCODERS, "fake_vit", FakeViT)
    monkeypatch.setitem(models.STAGES, "fake_vit",
                        lambda depth=5, **_: [f"block{i + 1}" for i in range(depth)])


def tokens(rng, b=3, grid=4, width=8):
    return Tokens(cls=jnp.asarray(rng.normal(size=(b, width)), jnp.float32),
                  patches=jnp.asarray(rng.normal(size=(b, grid, grid, width)), jnp.float32),
                  registers=jnp.zeros((b, 1, width)))


# ------------------------------------------------------------------ the pools

def test_each_token_pool_is_the_vector_the_papers_read():
    rng = np.random.default_rng(0)
    blocks = [tokens(rng) for _ in range(5)]
    x = blocks[-1]
    np.testing.assert_array_equal(features.pool_stage(x, "cls"), x.cls)
    mean = np.asarray(x.patches).mean((1, 2))
    for pool in ("mean", "global"):  # one average over the patch tokens, the registers unread
        np.testing.assert_allclose(features.pool_stage(x, pool), mean, rtol=1e-5, atol=1e-6)
    # avg2x2 of the 4x4 patch grid: cells row-major, then the width.
    cells = np.asarray(x.patches).reshape(3, 2, 2, 2, 2, 8).mean((2, 4)).reshape(3, -1)
    np.testing.assert_allclose(features.pool_stage(x, "avg2x2"), cells, rtol=1e-5, atol=1e-6)
    # dino, width 8: the class tokens of blocks 2..5 concatenated, shallow to deep.
    want = np.concatenate([np.asarray(t.cls) for t in blocks[1:]], -1)
    assert features.dino_stages("block5", 8) == ["block2", "block3", "block4", "block5"]
    np.testing.assert_array_equal(features.pool_stage(x, "dino", blocks[1:4]), want)
    assert features.dino_stages("block2", 8) == ["block1", "block2"]  # fewer below block 4
    # dino of a ViT-Base (width 768): DINO's n_last_blocks=1 and avgpool_patchtokens: the
    # last class token, then the mean patch token.
    base = tokens(rng, width=768)
    assert features.dino_stages("block12", 768) == ["block12"]
    np.testing.assert_allclose(features.pool_stage(base, "dino"), np.concatenate(
        [np.asarray(base.cls), np.asarray(base.patches).mean((1, 2))], -1), rtol=1e-5, atol=1e-6)
    assert features.canonical_pool(None, x) == "cls"
    assert features.canonical_pool("global", x) == "mean"


def test_features_fn_reads_the_encoders_blocks_and_defaults_to_the_class_token():
    enc = FakeViT()
    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    variables = enc.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    out = enc.apply(variables, augment.batch_views(jax.random.key(0), images, VIEW))
    fns = [features.make_features_fn(enc, VIEW, pool, ["block3", "block5"])
           for pool in (None, "dino")]
    default, dino = jax.jit(lambda v, x: [f(v, x) for f in fns])(variables, images)
    np.testing.assert_allclose(default["block5"], out["block5"].cls, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dino["block5"], np.concatenate(
        [out[f"block{k}"].cls for k in (2, 3, 4, 5)], -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dino["block3"], np.concatenate(
        [out[f"block{k}"].cls for k in (1, 2, 3)], -1), rtol=1e-5, atol=1e-6)
    # A stage the encoder does not return: refused when traced, naming the ones it has.
    with pytest.raises(UserError, match="block9 is not a stage of this encoder; its stages "
                                        "are block1, block2, block3, block4, block5"):
        jax.eval_shape(features.make_features_fn(enc, VIEW, None, ["block9"]), variables,
                       images)


def test_a_map_keeps_the_global_average_and_refuses_class_token_pools():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, 3)), jnp.float32)
    np.testing.assert_allclose(features.pool_stage(x), np.asarray(x).mean((1, 2)), rtol=1e-5, atol=1e-6)
    assert features.canonical_pool(None, x) == features.canonical_pool("mean", x) == "global"
    for pool in ("cls", "dino"):
        with pytest.raises(UserError, match=f"pool='{pool}' reads a ViT's class tokens; .* "
                                            "use global or avg"):
            features.pool_stage(x, pool)


# ---------------------------------------------------------------- evaluate

def write_export(out, model: dict, variables, data_dir: str) -> str:
    """A hand-made export (encoders' format) of `variables`, on tiny_squares."""
    os.makedirs(out)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(out, "encoder"), variables)
    ckpt.wait_until_finished()
    meta = {"format_version": 1, "model": model,
            "preprocessing": {"input_shape": [28, 28, 1], "view": VIEW.to_dict(),
                              "dtype": "uint8"},
            "stages": models.stages(**model),
            "source": {"workdir": "-", "step": 0, "method": "fake", "dataset": "tiny_squares"},
            "data": {"dataset": "tiny_squares", "data_dir": data_dir, "train_split": "train",
                     "num_classes": 10},
            "eval": {"seed": 0}}
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(meta, f, default=list)
    return str(out)


@pytest.fixture
def vit_export(tiny_data, tmp_path, fake_vit_registered):
    variables = FakeViT().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    return write_export(tmp_path / "vit", {"name": "fake_vit", "depth": 5}, variables,
                        tiny_data)


@pytest.fixture
def convnet_export(tiny_data, tmp_path):
    enc = models.make_encoder("convnet", widths=(4, 8))
    variables = enc.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
    return write_export(tmp_path / "conv", {"name": "convnet", "widths": [4, 8]}, variables,
                        tiny_data)


def written(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f not in ("encoder", "export.json"))


def test_a_vits_default_is_its_class_token_a_convnets_stays_global(vit_export,
                                                                    convnet_export):
    vit = evaluation.evaluate(exported=vit_export, evals=("knn",))["knn"]
    assert vit["pool"] == "cls" and "eval_knn.json" in written(vit_export)
    with open(os.path.join(vit_export, "results.md")) as f:
        assert "| block5 (cls) |" in f.read()
    # Another pool: its own file and its own cached features; "global" reads as "mean".
    mean = evaluation.evaluate(exported=vit_export, evals=("knn",), pool="global")["knn"]
    assert mean["pool"] == "mean" and "eval_knn_mean.json" in written(vit_export)
    assert len(os.listdir(os.path.join(vit_export, "features"))) == 4  # 2 pools x 2 splits
    # An export's features_fn (export.load) defaults to the class token too.
    fn, variables = export.load(vit_export)
    images = np.random.default_rng(4).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    out = FakeViT().apply(variables, augment.batch_views(jax.random.key(0), images, VIEW))
    np.testing.assert_allclose(fn(variables, images)["block5"], out["block5"].cls,
                               rtol=1e-5, atol=1e-6)
    conv = evaluation.evaluate(exported=convnet_export, evals=("knn",))["knn"]
    assert conv["pool"] == "global" and written(convnet_export) == [
        "eval_knn.json", "features", "results.md"]


def test_bad_pools_and_stages_are_refused_before_anything_is_written(vit_export,
                                                                     convnet_export):
    with pytest.raises(UserError, match="pool='cls' reads a ViT's class tokens; this "
                                        "encoder's stages are maps"):
        evaluation.evaluate(exported=convnet_export, evals=("knn",), pool="cls")
    for stages in ("stage4", "block6"):
        with pytest.raises(UserError, match=f"--stages: {stages} is not a stage of this "
                                            "fake_vit; its stages are block1, block2"):
            evaluation.evaluate(exported=vit_export, evals=("knn",), stages=stages)
    assert written(vit_export) == written(convnet_export) == []


def test_a_random_init_vit_has_no_bn_statistics_to_calibrate(tiny_data):
    enc = FakeViT()
    variables = enc.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    source = sources.open_source("tiny_squares", "train", tiny_data)
    got = features.calibrate_bn(enc, VIEW, variables, source, batch_size=32,
                                mesh=parallel.make_mesh(), num_batches=1)
    assert got is variables


# --------------------------------------------------------------- attention

def test_mass_mask_keeps_the_patches_holding_sixty_percent():
    a = np.array([[[0.5, 0.3], [0.1, 0.1]], [[0.1, 0.1], [0.2, 0.6]]])
    np.testing.assert_array_equal(attention.mass_mask(a), [[[1, 1], [0, 0]], [[0, 0], [0, 1]]])
    np.testing.assert_array_equal(attention.mass_mask(a, 0.5)[0], [[1, 0], [0, 0]])
    np.testing.assert_array_equal(attention.upsample(np.arange(4.0).reshape(2, 2), (4, 4)),
                                  np.repeat(np.repeat([[0.0, 1.0], [2.0, 3.0]], 2, 0), 2, 1))


def test_plot_draws_the_vits_attention_maps_and_nothing_for_a_convnet(vit_export,
                                                                      convnet_export):
    from PIL import Image

    enc = FakeViT()
    variables = enc.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    images = np.random.default_rng(3).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    views, maps = attention.cls_attention(enc, variables, VIEW, images)
    _, state = enc.apply(variables, augment.batch_views(jax.random.key(0), images, VIEW),
                         mutable=["intermediates"])
    np.testing.assert_allclose(maps, state["intermediates"]["cls_attention"][0], rtol=1e-5, atol=1e-6)
    assert views.shape == (4, 28, 28, 1) and 0.0 <= views.min() and views.max() <= 1.0

    evaluation.evaluate(exported=vit_export, evals=("knn",), plot=True)
    with Image.open(os.path.join(vit_export, "figures", "attention.png")) as im:
        width, height = im.size
    assert (width, height) == (400, 500)  # 4 images x (image + 2 heads), 4 inches wide
    evaluation.evaluate(exported=convnet_export, evals=("knn",), plot=True)
    assert "attention.png" not in os.listdir(os.path.join(convnet_export, "figures"))
