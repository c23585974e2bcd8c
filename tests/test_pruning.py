"""prune: a trained model pruned to a FLOPs target in a few epochs, in one call."""

import keras
import numpy as np
import pytest

from helpers import small_cnn, to_numpy
from keras_psp import PSP, count_flops, prune, recalibrate


def _trained(digits, widths=(32, 64)):
    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    inputs = h = keras.Input((8, 8, 1))
    for i, width in enumerate(widths):
        h = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(h)
        h = keras.layers.ReLU()(keras.layers.BatchNormalization(name=f"bn{i}")(h))
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="head")(h))
    model.compile(keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.1, 6 * 43),
                                       momentum=0.9), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=6, verbose=0)
    recalibrate(model, x)  # 258 steps leave BN's moving averages (momentum 0.99) far off
    return model


def test_prune_a_trained_model(digits, capsys):
    (x, y), (x_test, y_test) = digits
    model = _trained(digits)
    _, reference = model.evaluate(x_test, y_test, verbose=0)
    weights = [to_numpy(w) for w in model.weights]
    small = prune(model, x, y, target=0.5, epochs=3, validation_data=(x_test, y_test))
    fraction = count_flops(small) / count_flops(model)
    assert 0.45 <= fraction <= 0.5
    _, accuracy = small.evaluate(x_test, y_test, verbose=0)
    assert accuracy >= reference - 0.03, (reference, accuracy)
    assert not any(isinstance(layer, PSP) for layer in small._flatten_layers())
    assert all(np.array_equal(a, to_numpy(b)) for a, b in zip(weights, model.weights,
                                                              strict=True))  # untouched
    out = capsys.readouterr().out
    epochs = [line for line in out.splitlines() if line.startswith("FlopsBudget epoch")]  # own lines
    assert len(epochs) == 3 and "val_accuracy" in epochs[-1]
    last = out.strip().splitlines()[-1]
    assert last.startswith("prune: FLOPs ") and "validation accuracy" in last


def test_prune_refuses_before_training(digits):
    (x, y), _ = digits
    with pytest.raises(ValueError, match="not compiled.*loss="):
        prune(small_cnn(), x, y)
    model = small_cnn()
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="`target` must be in"):
        prune(model, x, y, target=0.0)
    with pytest.raises(ValueError, match="cannot be reached"):
        prune(model, x, y, target=0.01, layers=["head"], verbose=0)
