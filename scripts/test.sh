#!/usr/bin/env bash
# The test suite: set up, then every test on TensorFlow and a subset again on JAX
# (tests/conftest.py: JAX_SUBSET), each spread over the CPU cores (pytest-xdist).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
PYTHON="${PYTHON:-python3}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
WORKERS="${PSP_TEST_WORKERS:-2}"
# The tests' programs are tiny and compiled once: XLA's backend optimizations
# cost more than they save (a JAX two-process worker: 50 s -> 27 s of CPU).
# The programs are the same; only their machine code is less optimized.
export XLA_FLAGS="${XLA_FLAGS:---xla_backend_optimization_level=0}"
echo "== tests, TensorFlow backend"
# One TensorFlow thread per op and per worker: the pytest workers (and the
# multi-process tests' subprocesses) already fill the cores, and TF's own
# pools on top of them oversubscribe (measured: 15 % slower).
TF_NUM_INTRAOP_THREADS="${TF_NUM_INTRAOP_THREADS:-1}" TF_NUM_INTEROP_THREADS="${TF_NUM_INTEROP_THREADS:-1}" \
KERAS_BACKEND=tensorflow "$PYTHON" -m pytest -q -n "$WORKERS" --dist worksteal --durations=25 "$@"
echo "== tests, JAX backend (the subset in tests/conftest.py)"
# One XLA compilation cache for this run: the pytest workers and the
# multi-process tests' subprocesses compile many identical programs (a fresh,
# empty folder each run, so nothing carries over between runs).
JAX_CACHE="$(mktemp -d)"
trap 'rm -rf "$JAX_CACHE"' EXIT
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$JAX_CACHE}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
PSP_JAX_SUBSET=1 PSP_RANDOM_GRAPHS="${PSP_RANDOM_GRAPHS_JAX:-4}" KERAS_BACKEND=jax \
  "$PYTHON" -m pytest -q -n "$WORKERS" --dist worksteal --durations=10 "$@"
