"""Real datasets that load offline.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package when it is
installed (`apt-get install dataset-fashion-mnist` puts the four IDX files in
`/usr/share/datasets/fashion-mnist/`); elsewhere `keras.datasets` downloads
it as usual. scikit-learn's digits ship inside scikit-learn.
"""

from __future__ import annotations

import os
import shutil

import keras
import numpy as np

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_FILES = (
    "train-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
)


def _keras_cache_dir() -> str:
    home = os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~"), ".keras"
    )
    return os.path.join(home, "datasets", "fashion-mnist")


def load_fashion_mnist(source: str = DEBIAN_FASHION_MNIST):
    """Fashion-MNIST as `((x_train, y_train), (x_test, y_test))`.

    Images are float32 in [0, 1] with shape `(N, 28, 28, 1)`; labels int32.
    The IDX files found in `source` are copied into Keras's dataset cache, so
    `keras.datasets.fashion_mnist.load_data()` reads them without a download.

    Args:
        source: A folder holding the four Fashion-MNIST `.gz` IDX files.
    """
    cache = _keras_cache_dir()
    missing = [f for f in _FILES if not os.path.exists(os.path.join(cache, f))]
    if missing and all(os.path.exists(os.path.join(source, f)) for f in missing):
        os.makedirs(cache, exist_ok=True)
        for name in missing:
            shutil.copyfile(os.path.join(source, name), os.path.join(cache, name))
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception as error:  # no network and no local copy
        raise RuntimeError(
            "Fashion-MNIST is not available offline. Install it with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put "
            f"the four IDX .gz files into {cache}."
        ) from error

    def images(x):
        return (x.astype("float32") / 255.0)[..., None]

    return (images(x_train), y_train.astype("int32")), (
        images(x_test),
        y_test.astype("int32"),
    )


def load_digits(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's 8×8 digits as `((x_train, y_train), (x_test, y_test))`.

    Images are float32 in [0, 1] with shape `(N, 8, 8, 1)`.
    """
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = (data.images.astype("float32") / 16.0)[..., None]
    y = data.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    split = int(len(x) * (1 - test_fraction))
    train, test = order[:split], order[split:]
    return (x[train], y[train]), (x[test], y[test])
