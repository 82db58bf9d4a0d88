r"""Encoder-only export: what a user keeps after pretraining.

  python -m ssl_jax.export --workdir runs/simclr --out exported/simclr

writes into OUT the encoder (encoder/, an orbax checkpoint; params.npz, the same
arrays flat for other frameworks) and export.json (the model, the preprocessing
it expects, its stages, where it came from, the data and evaluation settings of
the run: `python -m ssl_jax.evaluate --exported OUT` reads these). The format is
defined in ssl_jax/encoders.py.

OUT must be new or empty; `--overwrite` replaces an earlier export (and the
results evaluated on it) whole.

`load(OUT)` gives back `(features_fn, variables)` with
`features_fn(variables, images) -> {stage: (B, C) float32}` for uint8 images
(B, H, W, C) of export.json's preprocessing "input_shape" (a single image needs
a batch axis; anything else is refused with what is expected): the eval view
(centre crop, normalisation) and pooling included, a ConvNet's global average or a
ViT's class token (`load(OUT, pool="avg2x2")`: VISSL's grid pooling, pool="dino"
DINO's ViT feature; see eval/features.py). Loading needs no method code, optimizer
state or training config.
"""
from __future__ import annotations

from absl import flags

from ssl_jax import cli, encoders

export = encoders.write_export  # (workdir, out) -> export.json's contents
load = encoders.load_export     # (out, pool=, stages=) -> (features_fn, variables)


def main(argv):
    del argv
    meta = export(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.overwrite)
    print(f"Exported the {meta['model']['name']} encoder of {meta['source']['method']} "
          f"(step {meta['source']['step']}) to {flags.FLAGS.out}: encoder/, params.npz, "
          "export.json. Load it with ssl_jax.export.load(OUT).", flush=True)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A training workdir.")
    flags.DEFINE_string("out", None, "Where to write the exported encoder.")
    flags.DEFINE_bool("overwrite", False, "Replace an earlier export in --out whole (with "
                      "the evaluation results written into it); without it, --out must be "
                      "new or empty.")
    flags.mark_flags_as_required(["workdir", "out"])
    cli.run(main)
