"""The console entry point, the datasets and the plain-Keras output."""

import subprocess

import keras
import numpy as np
import pytest

import keras_psp
from keras_psp import datasets


def test_console_entry_point_help_and_version():
    version = subprocess.run(["keras-psp", "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0
    assert version.stdout.strip() == f"keras-psp {keras_psp.__version__}"
    helped = subprocess.run(["keras-psp", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "usage: keras-psp" in helped.stdout


def test_load_digits_is_real_and_split():
    (x, y), (xt, yt) = datasets.load_digits()
    assert x.shape[1:] == (8, 8, 1) and len(x) + len(xt) == 1797
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))


def test_fashion_mnist_missing_gives_an_instruction(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def offline():
        raise OSError("no network")

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist"):
        datasets.load_fashion_mnist(source=str(tmp_path / "absent"))


def test_stripped_model_loads_without_keras_psp(tmp_path):
    from helpers import assert_loads_without_keras_psp, small_cnn

    wrapped = keras_psp.wrap(small_cnn())
    wrapped.get_layer("conv1").alpha.assign(np.linspace(0, 1, 8).astype("float32"))
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
    expected = keras.ops.convert_to_numpy(wrapped(x))
    assert_loads_without_keras_psp(keras_psp.strip(wrapped), x, expected, tmp_path)


def test_verify_reports_the_largest_output_difference(rng):
    from helpers import small_cnn

    model = small_cnn()
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    x = rng.random((5, 8, 8, 1)).astype("float32")
    assert keras_psp.verify(model, twin, x) == 0.0
    head = twin.get_layer("head")
    kernel, bias = head.get_weights()
    head.set_weights([kernel, bias + np.arange(len(bias), dtype="float32")])  # moves the softmax
    expected = np.abs(model.predict(x, verbose=0) - twin.predict(x, verbose=0)).max()
    assert keras_psp.verify(model, twin, x) == pytest.approx(expected, rel=1e-6)
    assert expected > 1e-3

    other = small_cnn(num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        keras_psp.verify(model, other, x)
