"""The supervised reference method: labels reach it (and only it), and it learns them."""
import jax
import numpy as np

from ssl_jax import evaluation, methods
from ssl_jax.config import load_file
from ssl_jax.data import sources
from ssl_jax.dataspec import DataSpec
from ssl_jax.eval import features
from ssl_jax.methods import network, supervised
from ssl_jax.views import augment
from tests.test_train import train_crash_resume


def test_labels_reach_only_methods_that_ask():
    asking = [n for n, m in methods.METHODS.items() if m.uses_labels]
    assert asking == ["supervised"]


def test_supervised_learns_the_labels_and_its_features_classify(tiny_data, tmp_path, fast_prng,
                                                                compilation_cache):
    c = load_file("configs/supervised.py:dataset=fashion_mnist,runlocal")
    c.dataset, c.data_dir = "tiny_squares", tiny_data
    c.batch_size, c.total_steps, c.ckpt_every_steps, c.log_every_steps = 32, 40, 10, 10
    c.aug.crop_scale = (0.9, 1.0)  # the label is where the square is: keep it in view
    c.eval.batch_size, c.eval.linear.epochs, c.eval.knn.k = 64, 10, 20
    # Interrupted after step 20 and resumed: the whole state ends bitwise equal (the
    # label-reading path resumes its data order too).
    _, state, _ = train_crash_resume(c, tmp_path, crash_after=20)
    assert state["params"]["head"]["Dense_0"]["kernel"].shape == (64, 10)
    # Its classifier predicts the held-out labels (chance: 10%).
    test = sources.read_batch(sources.open_source("tiny_squares", "test", tiny_data),
                               np.arange(128))
    view = features.eval_view_config(c)
    x = augment.batch_views(jax.random.key(0), test["image"], view)
    spec = DataSpec(256, (28, 28, 1), num_classes=10)  # tiny_squares: 10 classes, from its metadata
    _, logits, _ = network.apply(supervised._net(c, spec), state["params"],
                                 state["method_state"]["batch_stats"], x, train=False)
    accuracy = float(np.mean(np.argmax(logits, -1) == test["label"]))
    assert accuracy > 0.5, accuracy  # 40 steps: ~0.8 here
    r = evaluation.evaluate(str(tmp_path / "w"), ("knn",))["knn"]
    assert r["top1"] > 90.0 and r["step"] == 40
