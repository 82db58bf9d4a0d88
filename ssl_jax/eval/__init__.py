"""Evaluation of encoders. Offline, on a frozen encoder after pretraining
(ssl_jax/evaluate.py runs them): features (extraction, pooling, cache); the
evaluators linear, knn, mlp, lowshot, invariance, in one registry with one interface
(evaluators), the probes trained by one core (probe); results (printed,
eval_<name>.json, results.md); report and figures (tables and figures from their
records). Online, during pretraining: online (online_linear / online_knn probes).
The evaluators' settings and their defaults: `defaults` below (config.eval)."""

import ml_collections
from ml_collections import config_dict


def defaults(test_split: str = "test") -> ml_collections.ConfigDict:
    """config.eval's fields and their defaults (configs/common.py uses these;
    evaluate fills in the ones a stored config lacks with `with_defaults`)."""
    return ml_collections.ConfigDict(dict(
        test_split=test_split, batch_size=512, train_examples=0,
        # The eval view's size; None = the training crop (aug.crop_size).
        crop_size=config_dict.placeholder(tuple),
        # Images of varying size: the centre crop keeps this fraction of the shorter
        # side (the papers' resize to 256, crop 224).
        crop_fraction=0.875,
        # batch 256 / lr 0.3: within 0.2% of the L-BFGS optimum of the probe's objective
        # on the demo's features (batch 1024 / lr 0.1 stopped 5% above it); the weight
        # decay is chosen per stage on a held-out 10% of train. augment.views > 0: fit
        # on that many light-augmented views of train (features.light_augment).
        linear=dict(epochs=30, lr=0.3, weight_decay=(1e-5, 1e-4, 1e-3, 1e-2), batch_size=256,
                    augment=dict(views=0, crop_scale=(0.35, 1.0), crop_ratio=(3 / 4, 4 / 3),
                                 flip_p=0.5)),
        # also_k: further k reported beside k (NPID: 200, and 20).
        knn=dict(k=200, temperature=0.07, also_k=(20,)),
        # RotNet's non-linear probe: 3 FC layers, BN + ReLU, 200 hidden units for 10
        # classes (min(20 x classes, 2048): configs/common.py sets ImageNet's 2048).
        mlp=dict(hidden=200, epochs=30, lr=0.1, weight_decay=5e-4, batch_size=256),
        # Goyal et al. 2019: k labelled images per class, mean +- std over seeds.
        lowshot=dict(shots=(1, 2, 4, 8, 16, 32, 64), seeds=(0, 1, 2, 3, 4), steps=300),
        # Purushwalkam & Gupta 2020's invariance of the top-K neurons, on the splits
        # (transformations) of a dataset of transformation sets: "" = the run's own,
        # <dataset>_invariance in its data_dir; splits () = all of them.
        invariance=dict(dataset="", data_dir="", splits=(), top_k=(10, 25))))


def with_defaults(stored) -> ml_collections.ConfigDict:
    """A stored config.eval with the fields it lacks (written by an older
    version) taken from `defaults`; every stored value wins."""
    def merge(base, over):
        return {k: merge(base[k] if isinstance(base.get(k), dict) else {}, v)
                if isinstance(v, dict) else v
                for k, v in dict(base, **over).items()}
    stored = stored.to_dict() if hasattr(stored, "to_dict") else dict(stored)
    base = defaults(stored.get("test_split", "test")).to_dict()
    return ml_collections.ConfigDict(merge(base, stored))
