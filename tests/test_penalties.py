"""Penalties on α: the scale-invariant "relative_l1" (the default) against the paper's L2."""

import keras
import numpy as np
import pytest

from helpers import small_cnn, to_numpy
from keras_psp import PSP, wrap
from keras_psp.cloning import psp_layers
from keras_psp.penalties import DEFAULT_STRENGTH, RelativeL1


def _conv(regularizer, **kwargs):
    layer = PSP(keras.layers.Conv2D(6, 3, padding="same"), regularizer=regularizer, **kwargs)
    layer.build((None, 7, 7, 4))
    return layer


def test_relative_l1_is_the_default_and_saves(tmp_path):
    layer = PSP(keras.layers.Dense(3))
    assert isinstance(layer.alpha_regularizer, RelativeL1)
    assert layer.alpha_regularizer.strength == DEFAULT_STRENGTH["relative_l1"] == 5e-3
    model = wrap(small_cnn(), strength=1e-2)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    for layer in psp_layers(loaded):
        assert isinstance(layer.alpha_regularizer, RelativeL1) and layer.relative
        assert float(to_numpy(layer.alpha_strength)) == pytest.approx(1e-2)


@pytest.mark.parametrize("batchnorm", [True, False], ids=["with_bn", "without_bn"])
def test_a_uniform_scale_of_alpha_changes_nothing(batchnorm, rng):
    """The layer computes with α relative to its RMS: rescaling α (what weight decay
    does behind BN) leaves the function exactly as it was, with or without BN."""
    model = wrap(small_cnn(batchnorm=batchnorm))
    x = rng.random((4, 8, 8, 1)).astype("float32")
    alpha = rng.uniform(0.1, 2.0, 8).astype("float32")
    alpha[2] = 0.0  # a cut structure
    model.get_layer("conv1").alpha.assign(alpha)
    before = to_numpy(model(x))
    model.get_layer("conv1").alpha.assign(alpha * 37.0)
    np.testing.assert_allclose(to_numpy(model(x)), before, rtol=1e-5, atol=1e-6)
    paper = wrap(small_cnn(batchnorm=batchnorm), regularizer="l2")  # raw α: it does change
    paper.set_weights(model.get_weights())
    paper.get_layer("conv1").alpha.assign(alpha)
    y = to_numpy(paper(x))
    paper.get_layer("conv1").alpha.assign(alpha * 37.0)
    assert batchnorm or not np.allclose(to_numpy(paper(x)), y, atol=1e-3)


def test_wrapping_a_trained_model_is_exact(rng):
    base = small_cnn()
    x = rng.random((4, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(to_numpy(wrap(base)(x)), to_numpy(base(x)), atol=1e-6)


def test_relative_l1_value_and_its_gradient_are_scale_invariant():
    layer = _conv("relative_l1", strength=0.1)
    alpha = np.array([0.5, 1.0, 0.0, 2.0], "float32")
    layer.alpha.assign(alpha)
    kept = alpha[alpha > 0]
    expected = 0.1 * np.sum(kept / np.sqrt(np.mean(kept**2)))  # L1 of α over its kept RMS
    assert float(to_numpy(layer.alpha.regularizer(layer.alpha))) == pytest.approx(expected,
                                                                                rel=1e-5)
    layer.alpha.assign(alpha * 1e-3)
    assert float(to_numpy(layer.alpha.regularizer(layer.alpha))) == pytest.approx(expected,
                                                                                rel=1e-5)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        value = tf.Variable(alpha)
        with tf.GradientTape() as tape:
            penalty = layer.alpha.regularizer(value)
        gradient = tape.gradient(penalty, value).numpy()
        assert abs(float(np.dot(gradient, alpha))) < 1e-5  # no pull on the scale of α
        assert gradient[0] > 0 > gradient[3] and gradient[2] == 0  # small down, large up


def test_layer_wise_alpha_stays_raw_under_relative_l1():
    layer = _conv("relative_l1", structure="layer", strength=0.1)
    assert not layer.relative
    layer.alpha.assign(np.array([0.5], "float32"))
    assert float(to_numpy(layer.effective_alpha())[0]) == pytest.approx(0.5)
    assert float(to_numpy(layer.alpha.regularizer(layer.alpha))) == pytest.approx(0.05)


@pytest.mark.parametrize("regularizer", ["l2", "relative_l1"])
def test_behind_batchnorm_only_the_paper_penalty_shrinks_alpha_as_a_whole(regularizer, digits):
    """Fine-tuning a trained BN network: L2 on α shrinks each layer's α vector
    uniformly (BN cancels it, so nothing stops it), which leaves BN's moving
    statistics stale; relative α has no scale to shrink."""
    (x, y), (x_test, y_test) = digits
    keras.utils.set_random_seed(0)
    base = small_cnn()
    base.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy")
    base.fit(x, y, batch_size=32, epochs=3, verbose=0)
    model = wrap(base, regularizer=regularizer, strength=0.05)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    conv1 = to_numpy(model.get_layer("conv1").alpha)
    rms = float(np.sqrt(np.mean(conv1**2)))
    if regularizer == "l2":
        assert rms < 0.8  # the whole vector shrank
    else:
        assert rms > 0.9  # relative α: its RMS drifts only as SGD's second-order effect
