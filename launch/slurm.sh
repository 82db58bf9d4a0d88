#!/usr/bin/env bash
# Submits ssl_jax.train as a SLURM job of N nodes (launch/slurm.sbatch: one task
# per node driving its G GPUs, SIGTERM before the time limit, requeued when
# preempted):
#
#   launch/slurm.sh --nodes 2 --gpus_per_node 8 --time 04:00:00 -- --config configs/simclr.py:dataset=imagenet2012 --workdir /shared/runs/simclr
#
# The repository (its .venv included), the workdir and the data must be on a
# filesystem every node sees. The job's log is slurm-ssl_jax-JOBID.out in the
# directory this is run from.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USAGE="usage: launch/slurm.sh --nodes N --gpus_per_node G --time HH:MM:SS [--partition P] [--account A] [--cpus_per_task C] [--dry_run] -- TRAIN_ARGS..."

usage() {
  [ $# -eq 0 ] || echo "launch/slurm.sh: $*" >&2
  echo "$USAGE" >&2
  exit 2
}

nodes="" gpus="" time_limit="" partition="" account="" cpus="" dry_run=0
value() {  # value FLAG ARGC VALUE: VALUE, or a usage error when it is missing
  if [ "$2" -lt 2 ] || [ -z "$3" ] || [[ $3 == -* ]]; then usage "$1 needs a value"; fi
  echo "$3"
}
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) nodes=$(value "$1" $# "${2:-}"); shift 2 ;;
    --gpus_per_node) gpus=$(value "$1" $# "${2:-}"); shift 2 ;;
    --time) time_limit=$(value "$1" $# "${2:-}"); shift 2 ;;
    --partition) partition=$(value "$1" $# "${2:-}"); shift 2 ;;
    --account) account=$(value "$1" $# "${2:-}"); shift 2 ;;
    --cpus_per_task) cpus=$(value "$1" $# "${2:-}"); shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; break ;;
    -h | --help) echo "$USAGE"; exit 0 ;;
    *) usage "unknown argument '$1' (train's arguments go after --)" ;;
  esac
done
[[ $nodes =~ ^[1-9][0-9]*$ ]] || usage "--nodes needs a positive integer"
[[ $gpus =~ ^[0-9]+$ ]] || usage "--gpus_per_node needs an integer"
# SLURM's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
[[ $time_limit =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$ ]] || usage "--time needs HH:MM:SS (or D-HH:MM:SS)"
[ -z "$cpus" ] || [[ $cpus =~ ^[1-9][0-9]*$ ]] || usage "--cpus_per_task needs a positive integer"
[ $# -gt 0 ] || usage "no train arguments after --"

sbatch=(sbatch --nodes="$nodes" --ntasks-per-node=1 --time="$time_limit")
[ "$gpus" -eq 0 ] || sbatch+=(--gpus-per-node="$gpus")
[ -z "$partition" ] || sbatch+=(--partition="$partition")
[ -z "$account" ] || sbatch+=(--account="$account")
[ -z "$cpus" ] || sbatch+=(--cpus-per-task="$cpus")
# SLURM runs a copy of the batch script: it finds the repository through
# SSL_JAX_ROOT. --export=ALL keeps the rest of this environment too.
sbatch+=(--export="ALL,SSL_JAX_ROOT=$ROOT,SSL_JAX_GPUS_PER_NODE=$gpus"
         "$ROOT/launch/slurm.sbatch" "$@")

# readable ARGS...: the arguments as one line a shell reads back the same.
# shellcheck source=/dev/null
source "$ROOT/launch/quoting.sh"

if [ "$dry_run" = 1 ]; then
  readable "${sbatch[@]}"
  echo "# launch/slurm.sbatch then runs (srun starts one task on every node):"
  SSL_JAX_DRY_RUN=1 SSL_JAX_ROOT=$ROOT SSL_JAX_GPUS_PER_NODE=$gpus bash "$ROOT/launch/slurm.sbatch" -- "$@"
  exit 0
fi
exec "${sbatch[@]}"
