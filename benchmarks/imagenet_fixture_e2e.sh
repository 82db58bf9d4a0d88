#!/usr/bin/env bash
# End to end on an ILSVRC-layout fixture, one method per call (benchmarks/RESULTS.md):
#   benchmarks/imagenet_fixture_e2e.sh simclr|moco|rotnet|pirl [--config.x=y ...]
# Makes the fixture (tests/imagenet_fixture.py) and prepares it as imagenet2012 once,
# then: train 20 steps (checkpoints 10, 20) -> delete step 20 (a crash) -> the same
# command resumes -> evaluate linear,knn -> the random-init baseline. A ResNet-18 of
# width 0.25 on 64 px crops from 160 px canvases: minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/ssl_jax_imagenet_fixture}
M=${1:?usage: $0 METHOD [--config.x=y ...]}
DATA="$OUT/tfds" W="$OUT/run_$M"
if [ ! -d "$DATA/imagenet2012" ]; then
  PYTHONPATH=. $PY -c "from tests.imagenet_fixture import make_ilsvrc; make_ilsvrc('$OUT/manual')" >/dev/null
  $PY -m ssl_jax.prepare --dataset imagenet2012 --manual_dir "$OUT/manual" --data_dir "$DATA"
fi
ARGS=(--config "configs/$M.py:dataset=imagenet2012,runlocal" --workdir "$W" --config.data_dir="$DATA"
  --config.batch_size=32 --config.total_steps=20 --config.ckpt_every_steps=10 --config.log_every_steps=5
  --config.model.name=resnet18 --config.model.width=0.25 --config.model.dtype=float32
  "--config.aug.crop_size=(64,64)" --config.data.canvas=160 --config.eval.batch_size=50 "${@:2}")
start=$(date +%s)
$PY -m ssl_jax.train "${ARGS[@]}" > "$W.train.log" 2>&1
rm -rf "$W/checkpoints/20"  # a crash after the step-10 checkpoint
$PY -m ssl_jax.train "${ARGS[@]}" > "$W.resume.log" 2>&1
$PY -m ssl_jax.evaluate --workdir "$W" --eval linear,knn > "$W.eval.log" 2>&1
$PY -m ssl_jax.evaluate --workdir "$W" --eval linear --random_init > "$W.random.log" 2>&1
echo "$M: wall $(( $(date +%s) - start )) s"
grep -h "img/s" "$W.train.log" | tail -1
grep -h "Resumed\|Done:" "$W.resume.log"
grep -h "top-1" "$W.eval.log" "$W.random.log"
