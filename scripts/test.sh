#!/usr/bin/env bash
# The test suite: set up, then every test on TensorFlow and the
# backend-independent subset again on JAX.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
PYTHON="${PYTHON:-python3}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
echo "== tests, TensorFlow backend"
KERAS_BACKEND=tensorflow "$PYTHON" -m pytest -q --durations=25 "$@"
echo "== tests, JAX backend (backend-independent subset)"
# Wrapping whole keras.applications models is graph surgery, covered on TensorFlow; on
# JAX each new layer shape compiles its random initializer (3 minutes for these five).
KERAS_BACKEND=jax "$PYTHON" -m pytest -q --durations=10 -m "not tensorflow_only" \
  tests/test_structures.py tests/test_wrapper.py tests/test_saving.py tests/test_cloning.py \
  -k "not keras_applications and not nested_application and not convnext" "$@"
echo "== slim tests, JAX backend (a subset: surgery is backend-independent numpy)"
PSP_RANDOM_GRAPHS="${PSP_RANDOM_GRAPHS_JAX:-10}" KERAS_BACKEND=jax "$PYTHON" -m pytest -q \
  -m "not tensorflow_only" tests/test_slim_random.py tests/test_slim.py \
  -k "random_graphs or plain_chain or flatten or fold or zero_constant or residual_branch or zero_output or only_path" "$@"
echo "== callback tests, JAX backend (a subset: step checks sync JAX state)"
KERAS_BACKEND=jax "$PYTHON" -m pytest -q -m "not tensorflow_only" tests/test_callbacks.py \
  -k "logs_in_history or patience or non_finite or strength or reaches_the_target" "$@"
echo "== distributed tests, JAX backend (two processes with keras.distribution.DataParallel)"
KERAS_BACKEND=jax "$PYTHON" -m pytest -q -m "not tensorflow_only" tests/test_distributed.py \
  tests/test_distributed_jax.py "$@"
