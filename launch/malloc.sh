# Sourced by run.sh and launch/local.sh: the allocator the trainer runs with.
# shellcheck shell=bash
#
# tcmalloc, when installed (Debian: libtcmalloc-minimal4; run.sh installs it). With
# glibc's malloc, XLA:CPU's per-step buffers (hundreds of MB) are returned to the OS
# after each step and page-faulted back in the next one: the demo's SimCLR step
# spent ~23% of its CPU time in the kernel zeroing pages (8.2M minor faults in 150
# steps). tcmalloc keeps them: 0.2M faults, the same losses bit for bit, ~24% less
# CPU time and ~20% less wall time per step (benchmarks/RESULTS.md, "The allocator").
# jemalloc's default decay returns memory as glibc does (no gain, measured).
# SSL_JAX_MALLOC=system keeps glibc's; an LD_PRELOAD already set is left alone.
ssl_jax_malloc() {
  local lib
  [ "${SSL_JAX_MALLOC:-tcmalloc}" != system ] || return 0
  [ -z "${LD_PRELOAD:-}" ] || return 0
  for lib in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
             /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4 \
             /usr/lib64/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4; do
    if [ -e "$lib" ]; then
      export LD_PRELOAD=$lib
      # tcmalloc reports every allocation over 1 GiB on stderr; XLA makes such on
      # purpose (an ImageNet batch), and the lines would read as errors.
      export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=${TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD:-1099511627776}
      return 0
    fi
  done
}
ssl_jax_malloc
