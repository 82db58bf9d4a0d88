"""The input pipeline: what every training and evaluation step reads through.

sources.py        open a prepared TFDS split (array_record) -> a random-access source;
                  dataset_info, columns, the not-prepared error naming the prepare command
decode.py         decode policies: fixed-size images, or varying-size ones onto a canvas
pipeline.py       train_iterator (grain, per-epoch permutation by step, workers,
                  checkpointable state = the next step), eval_batches
shm_slots.py      reused shared-memory slots that carry batches from grain workers
video_pairs.py    (query, key) frame pairs of one video; region boxes (pure NumPy)
video_sampler.py  config.video read and checked; the train split's PairSampler
prepare.py        alias: `python -m ssl_jax.data.prepare` runs `python -m ssl_jax.prepare`

Datasets are made once, offline, by the builders of ssl_jax/datasets/; nothing
here imports them (tests/test_layers.py).
"""
