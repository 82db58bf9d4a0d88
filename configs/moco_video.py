r"""MoCo v2 with positives from video (Purushwalkam & Gupta 2020, "Demystifying
Contrastive Self-Supervised Learning", section 5): the same loss, queue and
shuffle-BN as configs/moco.py -- only the positive pair changes.

  python -m ssl_jax.prepare --dataset fashion_mnist          # the garments the videos show
  python -m ssl_jax.prepare --dataset fashion_mnist_videos
  python -m ssl_jax.prepare --dataset invariance_sets --source fashion_mnist_videos \
      --source_split train --sets_per_class 12                # for --eval invariance
  python -m ssl_jax.train --config configs/moco_video.py:positives=temporal \
      --workdir runs/moco_temporal
  python -m ssl_jax.evaluate --workdir runs/moco_temporal --eval linear,knn,invariance

(The invariance sets take one frame, the first, of each video; the test split has 20
videos a class, fewer than the default 30 sets of 8, so they come from the 100 train
videos a class: 12 sets of 8 different garments a class.)

Arguments after the colon: positives=frame|temporal|region, dataset=NAME (a video
dataset: records with video_id and frame_index, and box for region; default
fashion_mnist_videos), runlocal. positives:
  frame     two crops of one frame (the baseline: MoCo v2 on single frames);
  temporal  the key is another frame of the query's video, 1..max_gap frames away;
  region    as temporal, both frames cropped to the object's box (the stored boxes
            stand in for the paper's tracker: data/video_pairs.py says what a tracker adds).
Both views still get MoCo v2's augmentation, on device. --config.video.max_gap=8 etc.
SimCLR takes the same option: configs/simclr.py:dataset=fashion_mnist_videos,positives=temporal.
"""
from ssl_jax.config import sibling

common = sibling(__file__, "common")
moco = sibling(__file__, "moco")


def get_config(arg=None):
    a = common.parse_arg(arg, positives="temporal", dataset="fashion_mnist_videos",
                         runlocal=False)
    c = moco.get_config(f"dataset={a.dataset}" + (",runlocal" if a.runlocal else ""))
    common.video_positives(c, a.positives)
    if a.dataset == "got10k_videos":  # region crops as ImageNet's views start: 256 px
        c.video.region_size = 256
    if a.dataset == "fashion_mnist_videos" and not a.runlocal:
        # 12,011 frames: 46 steps an epoch at B = 256. 400 steps (~8.5 epochs) fit the
        # comparison of benchmarks/RESULTS.md on a 2-core CPU; the queue holds 8 batches.
        c.total_epochs, c.total_steps = None, 400
        c.moco.queue_size = 2048
        c.ckpt_every_steps = 100
    return c
