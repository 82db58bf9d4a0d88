#!/usr/bin/env bash
# Trains on every worker of a Cloud TPU VM slice (v4-32, v5p-64, ...):
#
#   launch/tpu_pod.sh NAME ZONE PROJECT [--dry_run] -- --config configs/moco.py:dataset=imagenet2012 --workdir gs://BUCKET/moco
#
# 1. copies the code (a `git archive` of HEAD: what is committed, nothing else)
#    to every worker,
# 2. installs the pinned requirements.txt there, plus jax[tpu] of the pinned jax
#    version, into ~/ssl_jax_venv (skipped when they are already installed),
# 3. runs `python -m ssl_jax.train ARGS` on all workers at once, with
#    SSL_JAX_DISTRIBUTED=auto: jax.distributed.initialize() then reads the
#    worker's index and the coordinator from the TPU VM's metadata.
#
# Every worker must write the same workdir and read the same data, so they
# belong on storage all workers share (gs://); a workdir elsewhere gets a warning.
# Re-running the same command after a preemption resumes from the workdir.
#
# Environment: SSL_JAX_REMOTE_PYTHON, the workers' Python to make the venv with
# (default python3; requirements.txt needs >= 3.11).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USAGE="usage: launch/tpu_pod.sh NAME ZONE PROJECT [--dry_run] -- TRAIN_ARGS..."
REMOTE_PYTHON=${SSL_JAX_REMOTE_PYTHON:-python3}

usage() {
  [ $# -eq 0 ] || echo "launch/tpu_pod.sh: $*" >&2
  echo "$USAGE" >&2
  exit 2
}

for arg in "$@"; do  # --help anywhere before train's arguments
  case $arg in
    --) break ;;
    -h | --help) echo "$USAGE"; exit 0 ;;
  esac
done
[ $# -ge 3 ] || usage "NAME, ZONE and PROJECT are required"
name=$1 zone=$2 project=$3
shift 3
for positional in "$name" "$zone" "$project"; do
  case $positional in -*) usage "NAME ZONE PROJECT come first, not '$positional'" ;; esac
done
dry_run=0
while [ $# -gt 0 ]; do
  case $1 in
    --dry_run) dry_run=1; shift ;;
    --) shift; break ;;
    *) usage "unknown argument '$1' (train's arguments go after --)" ;;
  esac
done
[ $# -gt 0 ] || usage "no train arguments after --"

workdir=""
previous=""
for arg in "$@"; do
  case $arg in --workdir=*) workdir=${arg#*=} ;; esac
  [ "$previous" != --workdir ] || workdir=$arg
  previous=$arg
done
case $workdir in
  gs://*) ;;
  "") echo "launch/tpu_pod.sh: warning: no --workdir given" >&2 ;;
  *) echo "launch/tpu_pod.sh: warning: --workdir $workdir is not on gs://: every worker must" \
          "see this same directory (a shared mount), or each keeps only its part of the" \
          "checkpoints on its own disk" >&2 ;;
esac

jax_version=$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$ROOT/requirements.txt")
[ -n "$jax_version" ] || { echo "launch/tpu_pod.sh: no jax==VERSION in requirements.txt" >&2; exit 1; }

quote() {  # the arguments as one shell-quoted line
  local line
  line=$(printf '%q ' "$@")
  echo "${line% }"
}

# readable ARGS...: the arguments as one line a shell reads back the same.
# shellcheck source=/dev/null
source "$ROOT/launch/quoting.sh"

run() {  # runs a command, or only prints it with --dry_run
  if [ "$dry_run" = 1 ]; then
    readable "$@"
  else
    "$@"
  fi
}

tarball=${TMPDIR:-/tmp}/ssl_jax-$name.tar.gz
target=(--zone "$zone" --project "$project" --worker=all)

# The three remote steps. Each runs on every worker; `set -e` so that a failed
# step stops there instead of training with half an installation.
unpack="set -euo pipefail; rm -rf ~/ssl_jax; mkdir -p ~/ssl_jax; tar -xzf ~/ssl_jax.tar.gz -C ~/ssl_jax"
# gcsfs: etils.epath's gs:// backend (workdir files); google-cloud-storage:
# tensorboardX's. The marker file makes a re-run (after a preemption) skip the installation.
install="set -euo pipefail; cd ~/ssl_jax; \
[ -x ~/ssl_jax_venv/bin/python ] || $(quote "$REMOTE_PYTHON") -m venv ~/ssl_jax_venv; \
if ! cmp -s requirements.txt ~/ssl_jax_venv/.installed-requirements; then \
~/ssl_jax_venv/bin/pip install -q --upgrade pip; \
~/ssl_jax_venv/bin/pip install -q -r requirements.txt $(quote "jax[tpu]==$jax_version") gcsfs google-cloud-storage; \
cp requirements.txt ~/ssl_jax_venv/.installed-requirements; fi; \
~/ssl_jax_venv/bin/pip install -q --no-deps -e ."
train="cd ~/ssl_jax && SSL_JAX_DISTRIBUTED=auto ~/ssl_jax_venv/bin/python -m ssl_jax.train $(quote "$@")"

if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]; then
  echo "launch/tpu_pod.sh: warning: uncommitted changes are not copied (git archive HEAD)" >&2
fi
run git -C "$ROOT" archive --format=tar.gz -o "$tarball" HEAD
run gcloud compute tpus tpu-vm scp "$tarball" "$name:ssl_jax.tar.gz" "${target[@]}"
run gcloud compute tpus tpu-vm ssh "$name" "${target[@]}" --command "$unpack"
run gcloud compute tpus tpu-vm ssh "$name" "${target[@]}" --command "$install"
# All workers at once: each one's process waits in jax.distributed.initialize
# for the others. The status is the workers' (75: preempted; re-run this).
run gcloud compute tpus tpu-vm ssh "$name" "${target[@]}" --command "$train"
