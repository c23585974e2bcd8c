#!/usr/bin/env bash
# The test suite: set up, then every test on TensorFlow and a subset again on JAX
# (tests/conftest.py: JAX_SUBSET), each spread over the CPU cores (pytest-xdist).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
PYTHON="${PYTHON:-python3}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
WORKERS="${PSP_TEST_WORKERS:-2}"
echo "== tests, TensorFlow backend"
KERAS_BACKEND=tensorflow "$PYTHON" -m pytest -q -n "$WORKERS" --dist worksteal --durations=25 "$@"
echo "== tests, JAX backend (the subset in tests/conftest.py)"
PSP_JAX_SUBSET=1 PSP_RANDOM_GRAPHS="${PSP_RANDOM_GRAPHS_JAX:-4}" KERAS_BACKEND=jax \
  "$PYTHON" -m pytest -q -n "$WORKERS" --dist worksteal --durations=10 "$@"
