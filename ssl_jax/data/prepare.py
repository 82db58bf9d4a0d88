r"""Prepares a dataset on disk, offline, as TFDS array_record files.

    python -m ssl_jax.data.prepare --dataset fashion_mnist --data_dir ~/tensorflow_datasets

Running it again on a prepared dataset does nothing. Datasets that TFDS
itself downloads (cifar10, imagenet2012, ...) are prepared in the same format
by TFDS's own tool: `tfds build cifar10 --file_format=array_record`.
"""
from __future__ import annotations

import time

from absl import app, flags

from ssl_jax.data import fashion_mnist, sources
from ssl_jax.errors import UserError

# dataset name -> builder class taking data_dir= and source_dir= (None: its default).
BUILDERS = {
    "fashion_mnist": fashion_mnist.FashionMnist,
}


def prepare(dataset: str, data_dir: str | None = None,
            source_dir: str | None = None) -> tuple[str, bool]:
    """Builds `dataset` under data_dir unless it is there already.

    Returns (the dataset's directory, whether it was built now).
    """
    if dataset not in BUILDERS:
        raise UserError(f"no offline builder for {dataset!r}; known: {sorted(BUILDERS)}")
    builder = BUILDERS[dataset](data_dir=data_dir or sources.default_data_dir(),
                                source_dir=source_dir)
    if builder.is_prepared():
        return str(builder.data_path), False
    builder.download_and_prepare()
    return str(builder.data_path), True


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    name, t = flags.FLAGS.dataset, time.perf_counter()
    path, built = prepare(name, flags.FLAGS.data_dir, flags.FLAGS.source_dir)
    if built:
        print(f"Prepared {name} in {path} in {time.perf_counter() - t:.1f} s.")
    else:
        print(f"{name} is already prepared in {path}; nothing to do "
              f"({time.perf_counter() - t:.1f} s).")


if __name__ == "__main__":
    # Flags live here so that importing prepare() defines none.
    flags.DEFINE_enum("dataset", None, list(BUILDERS), "Dataset to prepare.")
    flags.DEFINE_string("data_dir", None,
                        "TFDS data directory; default $TFDS_DATA_DIR or ~/tensorflow_datasets.")
    flags.DEFINE_string("source_dir", None, "Directory of the raw files; default: the builder's.")
    flags.mark_flag_as_required("dataset")
    app.run(main)
