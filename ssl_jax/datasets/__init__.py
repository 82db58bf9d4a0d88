"""The offline dataset builders: each writes a TFDS dataset (array_record) once, to be
read by the input pipeline (ssl_jax/data/). `python -m ssl_jax.prepare` runs them.

base.py                     StreamingBuilder (the common base), image checks
prepare.py                  BUILDERS and OPTIONS by dataset name; make_builder, prepare
fashion_mnist.py            fashion_mnist, from Debian's IDX files
arrays.py                   any dataset from in-memory numpy arrays (tests, custom data)
imagenet.py                 imagenet2012, from the ILSVRC2012 tars, as TFDS's
cifar.py                    cifar10, cifar100, from either archive format, as TFDS's
image_folder.py             one's own images, DIR/<split>/<class>/*.jpg
invariance_sets.py          <source>_invariance: Purushwalkam & Gupta's sets, generated
transforms.py               the occlusion / viewpoint / illumination frames of one image
invariance_real.py          aloi_invariance, got10k_occlusion, pascal3d_instance
invariance_real_layouts.py  the real benchmarks' download layouts, read and checked
videos.py                   fashion_mnist_videos: synthetic videos of garments
video_folders.py            got10k_videos: a tracking dataset in GOT-10k's layout

Builders may read prepared datasets through ssl_jax.data.sources (the invariance
sets and videos are made from a prepared source); nothing outside this package
but the prepare command imports a builder.
"""
