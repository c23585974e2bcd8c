"""recalibrate: BatchNormalization statistics re-estimated from data."""

import keras
import numpy as np
import pytest

from helpers import small_cnn, to_numpy
from keras_psp import recalibrate, slim, wrap
from keras_psp.recalibration import batchnorm_layers


def _first_bn_inputs(model, x):
    return to_numpy(keras.Model(model.input, model.get_layer("conv0").output)(x))


@pytest.mark.parametrize("batch_size", [64, 7], ids=["one_batch", "many_batches"])
def test_moving_statistics_equal_the_statistics_of_the_data(batch_size, rng):
    model = small_cnn()
    x = rng.normal(2.0, 3.0, size=(64, 8, 8, 1)).astype("float32")
    bn = model.get_layer("bn0")
    assert np.all(to_numpy(bn.moving_mean) == 0)  # fresh: nothing estimated yet
    count = recalibrate(model, x, batch_size=batch_size)
    assert count == 64 and bn.momentum == 0.99  # the momentum is back
    inputs = _first_bn_inputs(model, x).reshape(-1, 8)
    np.testing.assert_allclose(to_numpy(bn.moving_mean), inputs.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_numpy(bn.moving_variance), inputs.var(0), rtol=1e-4)
    if batch_size == 64:  # one batch: the second BN's too (its input is that batch's)
        y = to_numpy(keras.Model(model.input, model.get_layer("conv1").output)(x, training=True))
        np.testing.assert_allclose(to_numpy(model.get_layer("bn1").moving_variance),
                                   y.reshape(-1, 16).var(0), rtol=1e-3)


def test_inputs_in_every_form(rng):
    x = rng.random((40, 8, 8, 1)).astype("float32")
    model = small_cnn()
    assert recalibrate(model, (x, np.zeros(40)), steps=2, batch_size=16) == 32  # (x, y), 2 steps
    assert recalibrate(model, [x[i : i + 10] for i in range(0, 40, 10)]) == 40  # batches
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        data = tf.data.Dataset.from_tensor_slices((x, np.zeros(40))).batch(8)
        assert recalibrate(model, data, steps=3) == 24
    with pytest.raises(ValueError, match="no examples"):
        recalibrate(model, x[:0])
    with pytest.raises(ValueError, match="`steps`"):
        recalibrate(model, x, steps=0)
    assert recalibrate(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), x) == 0


def test_recalibration_restores_a_pruned_models_accuracy(digits):
    """Cutting a third of the channels at random leaves the moving statistics of a
    trained network stale; re-estimating them on training data (no gradient) brings
    the slim model's accuracy back close to what it is in training mode."""
    (x, y), (x_test, y_test) = digits
    keras.utils.set_random_seed(0)
    base = small_cnn()
    base.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy",
                 metrics=["accuracy"])
    base.fit(x, y, batch_size=32, epochs=4, verbose=0)
    wrapped = wrap(base, layers=["conv1"])
    alpha = np.ones(8, "float32")
    alpha[[1, 4, 6]] = 0.0
    wrapped.get_layer("conv1").alpha.assign(alpha)
    small = slim(wrapped)
    small.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    stale = small.evaluate(x_test, y_test, verbose=0)[1]
    weights = [to_numpy(w) for w in small.trainable_weights]
    recalibrate(small, x)
    fresh = small.evaluate(x_test, y_test, verbose=0)[1]
    assert fresh > stale + 0.05, (stale, fresh)
    assert all(np.array_equal(a, to_numpy(b)) for a, b in zip(weights, small.trainable_weights,
                                                              strict=True))  # no weight moved
    assert len(batchnorm_layers(small)) == 2


def test_slim_offers_recalibration(rng):
    """`slim(recalibrate=x)`: checked against the pruned model first (exact), then the
    slim model's BN statistics are those of `x`; without it they are the model's own."""
    x = rng.normal(1.0, 2.0, size=(32, 8, 8, 1)).astype("float32")
    wrapped = wrap(small_cnn(), layers=["conv1"])
    alpha = np.ones(8, "float32")
    alpha[[0, 3]] = 0.0
    wrapped.get_layer("conv1").alpha.assign(alpha)
    plain = slim(wrapped)
    fresh = slim(wrapped, check_inputs=x[:8], recalibrate=x)
    bn, stale = fresh.get_layer("bn0"), plain.get_layer("bn0")
    assert np.all(to_numpy(stale.moving_mean) == 0)  # untouched: the wrapped model's own
    assert bn.moving_mean.shape == (6,)  # two channels of conv0 went with conv1's inputs
    np.testing.assert_allclose(to_numpy(bn.moving_mean), _first_bn_inputs(fresh, x)
                               .reshape(-1, 6).mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="`steps`"):
        slim(wrapped, recalibrate=x, recalibration_steps=0)
