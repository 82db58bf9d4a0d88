#!/usr/bin/env bash
# Runs ssl_jax.train or ssl_jax.evaluate on this host, as one process or as N.
#
#   launch/local.sh train -- --config configs/simclr.py:dataset=fashion_mnist --workdir runs/x
#   launch/local.sh --processes 2 --devices_per_process 4 train -- --config ... --workdir ...
#
# One process (the default) drives every local device: that is how to use one
# machine. N processes join one jax.distributed run through a coordinator on
# 127.0.0.1, as N hosts would: a way to exercise the multi-host path (data split
# by process, config agreement, checkpoints written by all) on one machine.
# --devices_per_process D runs them on the CPU with D simulated devices each;
# without it every process sees all of this host's devices.
#
# The exit status is the first non-zero one of the processes (75: preempted,
# re-run to resume; 2: a mistake on the command line), else 0. When one process
# fails the others cannot go on (their collectives would wait for it), so they
# are stopped: SIGTERM, then SIGKILL to their process groups after
# SSL_JAX_KILL_GRACE_S (10) seconds. A SIGTERM/SIGINT to this script is passed
# to every process, which checkpoints and exits 75.
#
# Environment: SSL_JAX_PYTHON (default: the repository's .venv/bin/python);
# SSL_JAX_MALLOC=system (default: tcmalloc when installed, launch/malloc.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${SSL_JAX_PYTHON:-$ROOT/.venv/bin/python}
GRACE_S=${SSL_JAX_KILL_GRACE_S:-10}
USAGE="usage: launch/local.sh [--processes N] [--devices_per_process D] [--dry_run] [train|evaluate] -- ARGS..."

usage() {
  [ $# -eq 0 ] || echo "launch/local.sh: $*" >&2
  echo "$USAGE" >&2
  exit 2
}

positive() {  # positive NAME VALUE: VALUE, or a usage error
  [[ $2 =~ ^[1-9][0-9]*$ ]] || usage "$1 needs a positive integer, not '$2'"
  echo "$2"
}

processes=1 devices="" dry_run=0 command=train
while [ $# -gt 0 ]; do
  case $1 in
    --processes) [ $# -ge 2 ] || usage "--processes needs a value"
      processes=$(positive "$1" "$2"); shift 2 ;;
    --processes=*) processes=$(positive --processes "${1#*=}"); shift ;;
    --devices_per_process) [ $# -ge 2 ] || usage "--devices_per_process needs a value"
      devices=$(positive "$1" "$2"); shift 2 ;;
    --devices_per_process=*) devices=$(positive --devices_per_process "${1#*=}"); shift ;;
    --dry_run) dry_run=1; shift ;;
    train | evaluate) command=$1; shift ;;
    --) shift; break ;;
    -h | --help) echo "$USAGE"; exit 0 ;;
    *) usage "unknown argument '$1' (the command's own arguments go after --)" ;;
  esac
done

if [ "$processes" -gt 1 ]; then
  for arg in "$@"; do
    case $arg in
      --coordinator* | --num_processes* | --process_id*)
        usage "$arg: with --processes N this script sets the process flags itself" ;;
    esac
  done
fi

environment=()
if [ -n "$devices" ]; then
  # Simulated CPU devices: XLA reads the flag once, when the backend starts.
  environment+=(JAX_PLATFORMS=cpu
                "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices")
fi

# readable ARGS...: the arguments as one line a shell reads back the same.
# shellcheck source=/dev/null
source "$ROOT/launch/quoting.sh"
# tcmalloc when installed (SSL_JAX_MALLOC=system: glibc's): launch/malloc.sh says why.
# shellcheck source=/dev/null
source "$ROOT/launch/malloc.sh"

if [ "$processes" -eq 1 ]; then
  cmd=(env "${environment[@]}" "$PYTHON" -m "ssl_jax.$command" "$@")
  if [ "$dry_run" = 1 ]; then
    readable "${cmd[@]:1}"
    exit 0
  fi
  exec "${cmd[@]}"  # exec: signals reach the trainer itself
fi

# A port free now; the coordinator (process 0) binds it a few seconds later.
finder=python3
[ ! -x "$ROOT/.venv/bin/python" ] || finder=$ROOT/.venv/bin/python
port=$("$finder" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

commands=()
for ((i = 0; i < processes; i++)); do
  commands+=("$(readable "${environment[@]}" "$PYTHON" -m "ssl_jax.$command" \
      --coordinator "127.0.0.1:$port" --num_processes "$processes" --process_id "$i" "$@")")
done
if [ "$dry_run" = 1 ]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

# Each process leads a process group of its own (setsid), so that a stop also
# reaches the helpers it started (data-loading workers). Not bash's job control
# (set -m): it reports a killed job and drops it before `wait` can return its status.
leader=()
if command -v setsid >/dev/null; then leader=(setsid); fi
declare -A running=()  # pid -> process index

terminate() {  # SIGTERM to the processes still running: they checkpoint and exit 75
  local pid
  for pid in "${!running[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap terminate TERM INT HUP

for ((i = 0; i < processes; i++)); do
  echo "launch/local.sh: process $i: ${commands[i]}" >&2
  "${leader[@]}" env "${environment[@]}" "$PYTHON" -m "ssl_jax.$command" \
      --coordinator "127.0.0.1:$port" --num_processes "$processes" --process_id "$i" "$@" &
  running[$!]=$i
done
pids=("${!running[@]}")

stop_all() {  # SIGKILL to every process and its helpers
  local pid
  for pid in "${pids[@]}"; do
    if [ ${#leader[@]} -gt 0 ]; then kill -KILL -- "-$pid" 2>/dev/null || true
    else kill -KILL "$pid" 2>/dev/null || true; fi
  done
}

watchdog=""
status=0
next_exit() {  # waits for a process to end: sets pid and rc, or pid="" (a signal came)
  local p
  pid=""
  wait -n -p pid "${!running[@]}" 2>/dev/null && rc=0 || rc=$?  # quiet: see below
  if [ -z "${pid:-}" ] && [ "$rc" -eq 127 ]; then
    # bash reports a process killed by a signal ("Killed") and forgets the job
    # before `wait -n` can return it; `wait PID` still knows its status.
    for p in "${!running[@]}"; do
      if ! kill -0 "$p" 2>/dev/null; then
        pid=$p
        wait "$p" && rc=0 || rc=$?
        return
      fi
    done
  fi
  pid=${pid:-}
}

while [ ${#running[@]} -gt 0 ]; do
  next_exit
  [ -n "$pid" ] || continue  # a trapped signal interrupted the wait
  index=${running[$pid]}
  unset "running[$pid]"
  [ "$rc" -eq 0 ] || [ "$status" -ne 0 ] || status=$rc
  if [ "$rc" -ne 0 ] && [ ${#running[@]} -gt 0 ] && [ -z "$watchdog" ]; then
    echo "launch/local.sh: process $index exited with status $rc; stopping the others" >&2
    terminate
    if [ "$rc" -ne 75 ]; then
      # A failure, not a preemption: the others may be stuck in a collective
      # waiting for the dead one, where SIGTERM's checkpoint cannot finish.
      (trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
       sleep "$GRACE_S" & sleeper=$!
       wait "$sleeper"
       stop_all) &
      watchdog=$!
    fi
  fi
done
[ -z "$watchdog" ] || kill "$watchdog" 2>/dev/null || true
# Helpers a process left behind are of no use without it.
stop_all
exit "$status"
