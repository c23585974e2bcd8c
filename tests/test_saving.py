"""A wrapped model saved mid-training loads back and training resumes."""

import keras
import numpy as np
import pytest

from helpers import small_cnn, to_numpy
from keras_psp import strip, wrap
from keras_psp.cloning import psp_layers


def _trained(digits, epochs=1):
    (x, y), _ = digits
    keras.utils.set_random_seed(1)
    model = wrap(small_cnn(), strength=0.05)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x[:256], y[:256], batch_size=64, epochs=epochs, verbose=0)
    return model


def test_save_mid_training_loads_back_and_resumes(digits, tmp_path):
    (x, y), _ = digits
    model = _trained(digits)
    layer = psp_layers(model)[0]
    alpha = to_numpy(layer.alpha).copy()
    alpha[:2] = 0.0  # make sure some structures are cut
    layer.alpha.assign(alpha)
    path = tmp_path / "wrapped.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)

    for a, b in zip(psp_layers(model), psp_layers(loaded), strict=True):
        assert type(b).__name__ == "PSP" and b.structure == a.structure
        np.testing.assert_array_equal(to_numpy(b.alpha), to_numpy(a.alpha))
        np.testing.assert_array_equal(b.mask(), a.mask())
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(to_numpy(b), to_numpy(a))
    np.testing.assert_allclose(
        loaded.predict(x[:32], verbose=0), model.predict(x[:32], verbose=0), atol=1e-6
    )

    batch = (x[256:320], y[256:320])
    model.train_on_batch(*batch)
    loaded.train_on_batch(*batch)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_allclose(to_numpy(b), to_numpy(a), rtol=1e-5, atol=1e-6)
    assert int(to_numpy(loaded.optimizer.iterations)) == int(to_numpy(model.optimizer.iterations))


def test_non_finite_alpha_refuses_to_save_and_strip(digits, tmp_path):
    model = _trained(digits)
    layer = model.get_layer("conv1")
    alpha = to_numpy(layer.alpha).copy()
    alpha[0] = np.nan
    layer.alpha.assign(alpha)
    with pytest.raises(ValueError, match="save the model: PSP layer 'conv1' has 1 non-finite"):
        model.save(tmp_path / "broken.keras")
    with pytest.raises(ValueError, match="strip the model: PSP layer 'conv1'"):
        strip(model)
