"""Video positives as a run asks for them: config.video read and checked, and the train
split's PairSampler built from the prepared dataset's columns.

    kind = positives(config)                         # "frame" | "temporal" | "region"
    sampler = pair_sampler(config, spec.image_shape) # None for "frame"
    index = video_index(dataset, split, data_dir)    # VideoIndex of video_id, frame_index

The dataset is any prepared one with `video_id` and `frame_index` features (and
`box` for region positives): fashion_mnist_videos, got10k_videos or one's own
(ssl_jax/datasets/ makes them; this module only reads them).
"""
from __future__ import annotations

import numpy as np

from ssl_jax.data import sources, video_pairs
from ssl_jax.errors import UserError


def video_index(dataset: str, split: str, data_dir: str | None = None
                ) -> video_pairs.VideoIndex:
    """The VideoIndex of a prepared split, from its video_id and frame_index columns."""
    columns = {}
    for feature in ("video_id", "frame_index"):
        try:
            columns[feature] = sources.column(dataset, split, data_dir, feature)
        except sources.DatasetNotFoundError:
            raise
        except UserError as e:
            raise UserError(f"{e} Video pairs need `video_id` and `frame_index` per record: "
                            f"use a video dataset (e.g. `python -m ssl_jax.prepare "
                            f"--dataset fashion_mnist_videos`), or add those features to {dataset}."
                            ) from e
    return video_pairs.VideoIndex.from_columns(columns["video_id"], columns["frame_index"],
                                               name=f"{dataset} {split}")


def positives(config) -> str:
    """config.video.positives, checked: "frame" (two crops of one image: every dataset,
    and runs without a video block), "temporal" or "region" (video_pairs.py)."""
    video = config.get("video")
    value = "frame" if video is None else video.get("positives", "frame")
    if value not in video_pairs.POSITIVES:
        raise UserError(f"config.video.positives={value!r} unknown; valid: "
                        f"{', '.join(video_pairs.POSITIVES)} (frame: two crops of one frame; "
                        "temporal: two frames of one video; region: the object's box in both).")
    return value


def region_size(config, image_shape) -> int:
    """The side region crops are resized to: config.video.region_size, or the stored
    frames' side (for images of varying size, the canvas side)."""
    size = config.video.get("region_size") or image_shape[0]
    if isinstance(size, bool) or not isinstance(size, int) or size < max(config.aug.crop_size):
        raise UserError(f"config.video.region_size={size!r} must be an integer >= the crop "
                        f"{max(config.aug.crop_size)}: the views are cropped from the region.")
    return size


def pair_sampler(config, image_shape) -> video_pairs.PairSampler | None:
    """The train split's PairSampler for config.video (None for "frame" positives):
    its VideoIndex, and for "region" its per-record boxes. Raises UserError naming
    the missing feature (a dataset that is not a video dataset) or the bad value."""
    kind = positives(config)
    if kind == "frame":
        return None
    if config.data.get("skip_corrupt", False):
        raise UserError("config.data.skip_corrupt cannot be used with video positives: a "
                        "skipped frame would leave its video's keys pointing at nothing. "
                        "Re-prepare the dataset (or drop its bad frames) instead.")
    index = video_index(config.dataset, config.train_split, config.data_dir)
    boxes = None
    if kind == "region":
        try:
            boxes = np.stack(sources.column(config.dataset, config.train_split,
                                            config.data_dir, "box")).astype(np.float32)
        except UserError as e:
            raise UserError(f"{e} Region positives crop each frame's object box: use a "
                            "dataset with a `box` feature, or --config.video.positives="
                            "temporal.") from e
        if boxes.shape != (len(index.order), 4):
            raise UserError(f"{config.dataset} box feature has shape {boxes.shape[1:]} per "
                            "record; region positives need (top, left, bottom, right).")
    region = {} if boxes is None else dict(  # the crop settings only region reads
        boxes=boxes, context=config.video.get("context", 0.25),
        region_size=region_size(config, image_shape))
    return video_pairs.PairSampler(index, max_gap=config.video.max_gap, seed=config.seed,
                                   **region)
