"""Datasets: offline TFDS builders and grain input pipelines.

fashion_mnist.py  Fashion-MNIST builder from Debian's IDX files
arrays.py         TFDS datasets from in-memory numpy arrays (tests, custom data)
prepare.py        `python -m ssl_jax.data.prepare --dataset NAME --data_dir DIR`
pipeline.py       open_source, train_iterator, eval_batches, dataset_info
"""
