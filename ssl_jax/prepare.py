r"""Prepares a dataset on disk, offline, as TFDS array_record files.

    python -m ssl_jax.prepare --dataset fashion_mnist [--data_dir ~/tensorflow_datasets]
    python -m ssl_jax.prepare --dataset imagenet2012 --manual_dir DIR [--skip_bad_images]
    python -m ssl_jax.prepare --dataset cifar10 [--manual_dir DIR]      # cifar100 the same
    python -m ssl_jax.prepare --dataset image_folder --manual_dir DIR --name NAME
    python -m ssl_jax.prepare --dataset invariance_sets --source fashion_mnist
    python -m ssl_jax.prepare --dataset aloi_invariance --manual_dir DIR [--aloi_objects N]
    python -m ssl_jax.prepare --dataset fashion_mnist_videos [--videos_per_class 100]
    python -m ssl_jax.prepare --dataset got10k_videos --manual_dir DIR [--frame_size 256]

- fashion_mnist: from Debian's IDX files (`apt-get install dataset-fashion-mnist`),
  or --manual_dir (alias --source_dir) holding them (datasets/fashion_mnist.py).
- imagenet2012: TFDS's imagenet2012, from ILSVRC2012_img_train.tar and
  ILSVRC2012_img_val.tar downloaded from https://image-net.org/download-images
  into --manual_dir (default <data_dir>/downloads/manual, as TFDS) (datasets/imagenet.py).
- cifar10, cifar100: TFDS's, from cifar-10-python.tar.gz or cifar-10-binary.tar.gz
  (cifar-100-...) of https://www.cs.toronto.edu/~kriz/cifar.html in --manual_dir
  (default <data_dir>/downloads/manual), else downloaded (datasets/cifar.py).
- image_folder: a folder of one's own images, DIR/train/<class>/*.jpg (and
  val/, test/) or DIR/<class>/*.jpg, as the dataset NAME (datasets/image_folder.py).
- invariance_sets: the occlusion, viewpoint, illumination and instance sets of
  Purushwalkam & Gupta 2020, as the dataset <source>_invariance, made from the
  prepared dataset --source in the same data_dir (datasets/invariance_sets.py).
- aloi_invariance, got10k_occlusion, pascal3d_instance: the paper's real
  benchmarks (ALOI viewpoint and illumination, GOT-10k occlusion, PASCAL3D+
  instance) as transformation sets, from their downloads in --manual_dir
  (--frames_per_set, --aloi_objects, --max_tracks) (datasets/invariance_real.py).
- fashion_mnist_videos: short synthetic videos of the prepared fashion_mnist's
  garments (one record a frame, with video_id, frame_index and box), for
  positive pairs from video (--videos_per_class, --seed) (datasets/videos.py).
- got10k_videos: real videos of a tracking dataset downloaded in GOT-10k's
  layout into --manual_dir, stored as fashion_mnist_videos stores its own
  (--frame_size, --max_tracks) (datasets/video_folders.py).

`python -m ssl_jax.data.prepare`, the name of earlier versions, runs this command.
The builders are in ssl_jax/datasets/ (prepare.py: which module makes which
dataset). Every image is decoded once; a bad one stops preparation with its name, or is
left out with --skip_bad_images (counted at the end). A failed preparation
leaves nothing behind, not even an empty folder. Running it again on a prepared dataset
does nothing: delete its folder (printed) to prepare it anew. Other datasets
that TFDS itself defines (mnist, svhn_cropped, ...) are prepared in the same format
by TFDS's own tool: `tfds build NAME --file_format=array_record`.

A mistake (no or an unknown --dataset, a missing file) is one `error:` line, exit
status 2 (ssl_jax/cli.py). The console holds what was made: TFDS's INFO lines,
its "Downloading and preparing ..." line and, when stderr is not a terminal, its
progress bars are kept off.
"""
from __future__ import annotations

import sys
import time

import tensorflow_datasets as tfds
from absl import flags

from ssl_jax import cli
from ssl_jax.datasets import invariance_real, invariance_sets, video_folders, videos
from ssl_jax.datasets import prepare as datasets
from ssl_jax.errors import UserError


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument(s) {argv[1:]}: every option is a --flag "
                        "(see --help).")
    f, t = flags.FLAGS, time.perf_counter()
    if not f.dataset:
        raise UserError(f"--dataset is required: one of {', '.join(datasets.BUILDERS)}.")
    if not sys.stderr.isatty():  # progress bars redrawn in a log file are noise
        tfds.disable_progress_bar()
    builder = datasets.make_builder(f.dataset, f.data_dir, f.source_dir, manual_dir=f.manual_dir,
                                    **{o: f[o].value for o in datasets.ALL_OPTIONS})
    path, built = datasets.build(builder)
    name = builder.name
    if not built:
        print(f"{name} is already prepared in {path}; nothing to do "
              f"({time.perf_counter() - t:.1f} s). Delete that folder to prepare it anew.")
        return
    counts = ", ".join(f"{s}: {v.num_examples}" for s, v in builder.info.splits.items())
    print(f"Prepared {name} in {path} in {time.perf_counter() - t:.1f} s ({counts}).")
    bad = getattr(builder, "bad_images", [])
    if bad:
        print(f"Left out {len(bad)} bad image(s) (--skip_bad_images):\n  " + "\n  ".join(bad))
    for line in getattr(builder, "report", list)():  # invariance_real: notes, skipped sets
        print(line)


if __name__ == "__main__":
    # Flags live here so that importing prepare() defines none.
    flags.DEFINE_string("dataset", None, f"Dataset to prepare: {', '.join(datasets.BUILDERS)}.")
    flags.DEFINE_string("data_dir", None,
                        "TFDS data directory; default $TFDS_DATA_DIR or ~/tensorflow_datasets.")
    flags.DEFINE_string("manual_dir", None,
                        "Folder of the files downloaded by hand (imagenet2012: the ILSVRC2012 "
                        "tars; cifar10, cifar100: cifar-10-python.tar.gz or "
                        "cifar-10-binary.tar.gz, or cifar-100-...; image_folder: the images; "
                        "fashion_mnist: the IDX files; "
                        "aloi_invariance, got10k_occlusion, pascal3d_instance: the "
                        "benchmark's unpacked download; got10k_videos: the tracking "
                        "dataset, in GOT-10k's layout). "
                        "Default: the builder's.")
    flags.DEFINE_string("source_dir", None, "Alias of --manual_dir (fashion_mnist's name).")
    flags.DEFINE_string("name", None, "image_folder: the dataset's name (e.g. my_images).")
    flags.DEFINE_bool("skip_bad_images", False,
                      "Leave out images that are empty or do not decode (each is logged, the "
                      "count printed at the end) instead of stopping at the first.")
    flags.DEFINE_string("source", None, "invariance_sets: the prepared dataset (with labels) "
                        "to make the sets from, in the same --data_dir, e.g. fashion_mnist.")
    flags.DEFINE_string("source_split", None, "invariance_sets: the source's split to draw "
                        "images from. Default: validation if it has one, else test.")
    flags.DEFINE_integer("sets_per_class", None, "invariance_sets: sets per class and split "
                         f"(default {invariance_sets.DEFAULTS['sets_per_class']}).")
    flags.DEFINE_integer("set_size", None, "invariance_sets: images per set, at least "
                         f"{invariance_sets.MIN_SET_SIZE} "
                         f"(default {invariance_sets.DEFAULTS['set_size']}).")
    flags.DEFINE_integer("videos_per_class", None, "fashion_mnist_videos: train videos a "
                         f"class (test: a fifth) (default {videos.DEFAULTS['videos_per_class']}).")
    flags.DEFINE_integer("seed", None, "invariance_sets, fashion_mnist_videos: the seed of "
                         "the image choice and "
                         f"the transformations (default {invariance_sets.DEFAULTS['seed']}).")
    flags.DEFINE_integer("frames_per_set", None, "aloi_invariance, got10k_occlusion, "
                         "pascal3d_instance: the most images a set, evenly spaced, at least "
                         f"{invariance_sets.MIN_SET_SIZE} (default: all; got10k_occlusion "
                         f"{invariance_real.GOT_FRAMES}).")
    flags.DEFINE_integer("aloi_objects", None, "aloi_invariance: the first N objects "
                         "(default all 1000).")
    flags.DEFINE_integer("max_tracks", None, "got10k_occlusion: at most N tracks, evenly "
                         "spaced among the usable ones; got10k_videos: the first N tracks "
                         "of each split (default all).")
    flags.DEFINE_integer("frame_size", None, "got10k_videos: the frames' shorter side once "
                         "stored, never enlarged "
                         f"(default {video_folders.DEFAULTS['frame_size']}).")
    cli.run(main)
