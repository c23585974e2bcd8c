"""Small models and cases shared by the tests."""

import keras
import numpy as np
from keras import layers as L


def load_digits(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's 8×8 digits (they ship inside scikit-learn) as
    `((x_train, y_train), (x_test, y_test))`, images float32 in [0, 1], `(N, 8, 8, 1)`."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = (data.images.astype("float32") / 16.0)[..., None]
    y = data.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    split = int(len(x) * (1 - test_fraction))
    train, test = order[:split], order[split:]
    return (x[train], y[train]), (x[test], y[test])


# (factory, input shape without batch): one case per supported layer family.
LAYER_CASES = {
    "conv1d_causal": (lambda: L.Conv1D(6, 3, padding="causal", activation="relu"), (9, 4)),
    "conv2d": (lambda: L.Conv2D(6, 3, padding="same", activation="relu"), (7, 7, 4)),
    "conv2d_grouped": (lambda: L.Conv2D(6, 3, groups=2), (7, 7, 4)),
    "conv3d": (lambda: L.Conv3D(5, 2), (4, 4, 4, 3)),
    "conv2d_transpose": (lambda: L.Conv2DTranspose(6, 3, strides=2), (5, 5, 4)),
    "depthwise2d": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2), (7, 7, 4)),
    "depthwise1d": (lambda: L.DepthwiseConv1D(3), (9, 4)),
    "separable2d": (lambda: L.SeparableConv2D(6, 3, depth_multiplier=2), (7, 7, 4)),
    "separable1d": (lambda: L.SeparableConv1D(6, 3), (9, 4)),
    "dense_rank4": (lambda: L.Dense(6, activation="tanh"), (3, 5, 4)),
}


def built_pair(factory, shape, rng):
    """A plain layer and an identical copy, both built, with random bias."""
    plain = factory()
    plain.build((None,) + shape)
    weights = [rng.normal(size=w.shape).astype("float32") for w in plain.weights]
    plain.set_weights(weights)
    twin = plain.__class__.from_config(plain.get_config())
    twin.build((None,) + shape)
    twin.set_weights(weights)
    return plain, twin


def small_cnn(input_shape=(8, 8, 1), batchnorm=True, num_classes=10, name="cnn", bn_epsilon=1e-3):
    """conv → (BN) → relu → conv → (BN) → relu → GAP → dense."""
    inputs = keras.Input(input_shape)
    x = inputs
    for i, width in enumerate((8, 16)):
        x = L.Conv2D(width, 3, padding="same", use_bias=not batchnorm, name=f"conv{i}")(x)
        if batchnorm:
            x = L.BatchNormalization(epsilon=bn_epsilon, name=f"bn{i}")(x)
        x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(num_classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def assert_loads_without_keras_psp(model, x, expected, folder, rtol=1e-5):
    """Saves `model`, loads it in a fresh process that never imports
    keras_psp, and checks its predictions on `x` against `expected`."""
    import subprocess
    import sys
    import textwrap

    path, x_path, y_path = (str(folder / n) for n in ("model.keras", "x.npy", "y.npy"))
    model.save(path)
    np.save(x_path, x)
    np.save(y_path, expected)
    script = textwrap.dedent(
        f"""
        import sys, numpy as np, keras
        model = keras.saving.load_model({path!r})
        y = model.predict(np.load({x_path!r}), verbose=0)
        np.testing.assert_allclose(y, np.load({y_path!r}), rtol={rtol}, atol=1e-6)
        assert "keras_psp" not in sys.modules
        print("LOADED", model.count_params())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"LOADED {model.count_params()}" in result.stdout


def cut_exactly(model, fraction: float = 0.4, seed: int = 0) -> None:
    """Zeroes round(`fraction` × n) of every PSP layer's n α (at least one
    stays), chosen at random."""
    from keras_psp.cloning import psp_layers

    rng = np.random.default_rng(seed)
    for layer in psp_layers(model):
        alpha = np.ones(layer.alpha.shape, "float32")
        cut = min(int(round(fraction * alpha.size)), alpha.size - 1)
        alpha.flat[rng.choice(alpha.size, size=cut, replace=False)] = 0.0
        layer.alpha.assign(alpha)
