#!/usr/bin/env bash
# The main job: set up, then a PSP run on Fashion-MNIST end to end.
# Extra arguments go to examples/fashion_mnist.py (e.g. --epochs 30).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "${PYTHON:-python3}" examples/fashion_mnist.py "$@"
