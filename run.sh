#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh demo   set up, prepare Fashion-MNIST, pretrain SimCLR, linear-eval, print accuracy
#   ./run.sh test   set up and run the test suite (what CI runs)
# Set-up is idempotent: the Debian packages (the dataset, tcmalloc), a .venv with the
# pinned requirements.
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
DATA_DIR=${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}
WORKDIR=${WORKDIR:-runs/demo_simclr}

setup() {
  # The data, and tcmalloc (launch/malloc.sh: ~24% less CPU time per train step).
  local missing=()
  [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] ||
    missing+=(dataset-fashion-mnist)
  ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || missing+=(libtcmalloc-minimal4)
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    echo "== Installing Debian packages ${missing[*]}"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}"
  fi
  [ -x "$PY" ] || python3 -m venv .venv
  if ! cmp -s requirements.txt .venv/.installed-requirements; then
    echo "== Installing pinned requirements into .venv"
    $PY -m pip install -q --upgrade pip
    $PY -m pip install -q -r requirements.txt
    $PY -m pip install -q --no-deps -e .
    cp requirements.txt .venv/.installed-requirements
  fi
}

case "${1:-}" in
  demo)
    setup
    $PY -m ssl_jax.prepare --dataset fashion_mnist --data_dir "$DATA_DIR"
    # launch/local.sh: one process on all local devices (the multi-host launchers: launch/)
    launch/local.sh train -- --config "configs/simclr.py:dataset=fashion_mnist" \
        --workdir "$WORKDIR" --config.data_dir="$DATA_DIR" "${@:2}"
    launch/local.sh evaluate -- --workdir "$WORKDIR" --eval linear,knn
    ;;
  test)
    setup
    source launch/malloc.sh  # the tests' trainers and subprocesses too
    # Two workers, a test module each (module fixtures compile once): the suite is
    # compile-bound and XLA compiles on one thread. SSL_JAX_TEST_WORKERS=0: in-process.
    $PY -m pytest -q -n "${SSL_JAX_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder tests "${@:2}"
    ;;
  *)
    echo "usage: ./run.sh demo [--config.field=value ...] | ./run.sh test [pytest args]" >&2
    exit 2
    ;;
esac
