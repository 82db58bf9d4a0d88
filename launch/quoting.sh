# Sourced by launch/local.sh, slurm.sh and tpu_pod.sh: how they print the
# commands they run (--dry_run, logs).
# shellcheck shell=bash

readable() {  # the arguments as one line a shell reads back the same; legible
  local word words=()
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      words+=("$word")
    else
      words+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}
