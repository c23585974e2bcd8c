"""Fashion-MNIST for the examples and benchmarks, offline where Debian ships it.

Debian's `dataset-fashion-mnist` package (`apt-get install
dataset-fashion-mnist`, which `scripts/setup.sh` runs) puts the four IDX
files in `/usr/share/datasets/fashion-mnist/`; they are read from there in
place. Elsewhere `keras.datasets.fashion_mnist` downloads them as usual.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip-compressed) of unsigned bytes as a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x0000 08 nn: unsigned bytes, nn dimensions
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x}).")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(source: str = DEBIAN_FASHION_MNIST):
    """Fashion-MNIST as `((x_train, y_train), (x_test, y_test))`.

    Images are float32 in [0, 1] with shape `(N, 28, 28, 1)`; labels int32.

    Args:
        source: A folder holding the four Fashion-MNIST `.gz` IDX files (read
            in place); when they are not all there, Keras downloads them.
    """
    paths = {key: os.path.join(source, name) for key, name in _FILES.items()}
    if all(os.path.exists(p) for p in paths.values()):
        arrays = {key: read_idx(p) for key, p in paths.items()}
        x_train, y_train = arrays["x_train"], arrays["y_train"]
        x_test, y_test = arrays["x_test"], arrays["y_test"]
    else:
        import keras

        try:
            (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
        except Exception as error:  # no network and no local copy
            raise RuntimeError(
                f"Fashion-MNIST is not available offline: {source} does not hold the four "
                "IDX .gz files, and the download failed. Install them with `apt-get install "
                "dataset-fashion-mnist` (Debian/Ubuntu), or pass the folder that holds them."
            ) from error

    def images(x):
        return (x.astype("float32") / 255.0)[..., None]

    return (images(x_train), y_train.astype("int32")), (images(x_test), y_test.astype("int32"))
