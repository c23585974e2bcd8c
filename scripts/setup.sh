#!/usr/bin/env bash
# Installs what keras_psp's main job and tests need. Safe to run again.
#   bash scripts/setup.sh          # package + deployment and plotting extras
#   bash scripts/setup.sh test     # ... + test extras (pytest, JAX, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# Fashion-MNIST, offline, from Debian's package (elsewhere keras downloads it).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
   && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing Debian's dataset-fashion-mnist"
  apt-get update -qq >/dev/null && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "[setup] could not install dataset-fashion-mnist; keras will try to download it"
fi

extras="deploy,plot"
if [ "${1:-}" = "test" ]; then extras="deploy,plot,test"; fi
echo "[setup] pip install -e .[$extras]"
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[$extras]" 2>&1 \
  | grep -v "Running pip as the 'root' user" || true
# Installed and its requirements met (without importing TensorFlow, ~10 s here).
"$PYTHON" - <<'PY' || { echo "[setup] install failed"; exit 1; }
import importlib.metadata as md, importlib.util, re, sys
assert importlib.util.find_spec("keras_psp"), "keras_psp is not importable"
for req in md.requires("keras-psp") or []:
    if "extra ==" in req:
        continue
    name = re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0]
    md.version(name)  # raises PackageNotFoundError when missing
PY
