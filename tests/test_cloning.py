"""wrap() and strip() on whole models."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

from helpers import small_cnn, to_numpy
from keras_psp import PSP, strip, wrap
from keras_psp.cloning import iter_layers, psp_layers


def _snapshot(model):
    return model.get_config(), [to_numpy(w).copy() for w in model.weights]


def _assert_unchanged(model, snapshot):
    config, weights = snapshot
    assert model.get_config() == config
    assert not psp_layers(model)
    for w, before in zip(model.weights, weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), before)


def _randomize_alphas(model, rng, cut_fraction=0.3):
    for layer in psp_layers(model):
        alpha = rng.uniform(0.2, 1.5, size=layer.alpha.shape).astype("float32")
        alpha[rng.random(alpha.shape) < cut_fraction] = 1e-4
        alpha.flat[0] = 1.0  # at least one structure kept
        layer.alpha.assign(alpha)


def _assert_strip_matches(wrapped, x):
    before = [to_numpy(w).copy() for w in wrapped.weights]
    plain = strip(wrapped)
    for w, value in zip(wrapped.weights, before, strict=True):  # input model untouched
        np.testing.assert_array_equal(to_numpy(w), value)
    assert not psp_layers(plain)
    expected = to_numpy(wrapped(x, training=False))
    actual = to_numpy(plain(x, training=False))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    return plain


def test_wrap_sequential(rng):
    model = keras.Sequential(
        [keras.Input((10, 3)), L.Conv1D(4, 3), L.Flatten(), L.Dense(5), L.Dense(2)]
    )
    snapshot = _snapshot(model)
    wrapped = wrap(model, structure="filter")
    _assert_unchanged(model, snapshot)
    assert isinstance(wrapped, keras.Sequential)
    assert [type(layer).__name__ for layer in wrapped.layers] == ["PSP", "Flatten", "PSP", "PSP"]
    x = rng.normal(size=(3, 10, 3)).astype("float32")
    np.testing.assert_array_equal(to_numpy(wrapped(x)), to_numpy(model(x)))
    _randomize_alphas(wrapped, rng)
    _assert_strip_matches(wrapped, x)


def test_wrap_nested_application_inside_functional_model(rng):
    backbone = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35
    )
    inputs = keras.Input((32, 32, 3))
    x = L.GlobalAveragePooling2D()(backbone(inputs))
    model = keras.Model(inputs, L.Dense(4, name="head")(x))
    snapshot = _snapshot(model)
    wrapped = wrap(model)
    _assert_unchanged(model, snapshot)
    assert isinstance(wrapped.layers[1], keras.Model)
    assert isinstance(wrapped.get_layer("head"), PSP)
    inner = psp_layers(wrapped.layers[1])
    assert {type(p.layer).__name__ for p in inner} == {"Conv2D", "DepthwiseConv2D"}
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(to_numpy(wrapped(x)), to_numpy(model(x)))
    _randomize_alphas(wrapped, rng)
    _assert_strip_matches(wrapped, x)


def test_wrap_convnext_nested_sequential_blocks(rng):
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3), classes=3)
    nested = [layer for layer in model.layers if isinstance(layer, keras.Sequential)]
    assert nested, "ConvNeXt should contain nested Sequential blocks"
    wrapped = wrap(model, structure="filter")
    assert all(psp_layers(w) for w in wrapped.layers if isinstance(w, keras.Sequential))
    x = rng.normal(size=(1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(to_numpy(wrapped(x)), to_numpy(model(x)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["ResNet50", "MobileNetV2", "DenseNet121", "VGG16"])
def test_wrap_and_strip_keras_applications(name, rng):
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=5)
    snapshot = _snapshot(model)
    wrapped = wrap(model)
    _assert_unchanged(model, snapshot)
    supported = [
        layer for layer in iter_layers(model)
        if type(layer) in (L.Conv2D, L.DepthwiseConv2D, L.Dense)
    ]
    assert len(psp_layers(wrapped)) == len(supported)
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(to_numpy(wrapped(x)), to_numpy(model(x)))
    _randomize_alphas(wrapped, rng)
    _assert_strip_matches(wrapped, x)


def test_layer_selection_by_name_type_and_predicate():
    model = small_cnn()
    assert [p.name for p in psp_layers(wrap(model, layers="conv1"))] == ["conv1"]
    assert [p.name for p in psp_layers(wrap(model, layers=[L.Dense]))] == ["head"]
    selected = wrap(model, layers=lambda layer: layer.name.startswith("conv"))
    assert [p.name for p in psp_layers(selected)] == ["conv0", "conv1"]
    with pytest.warns(UserWarning, match="BatchNormalization"):  # conv0 feeds bn0
        both = wrap(model, layers=["conv0", L.Dense], structure="filter")
    assert [(p.name, p.structure) for p in psp_layers(both)] == [("conv0", "filter"), ("head", "filter")]


def test_psp_kwargs_reach_every_wrapper():
    wrapped = wrap(small_cnn(), threshold=0.05, regularizer="l1", strength=0.2)
    for layer in psp_layers(wrapped):
        assert layer.threshold == 0.05
        assert isinstance(layer.alpha_regularizer, keras.regularizers.L1)


def test_wrap_skips_layers_the_structure_does_not_fit_with_a_warning():
    with pytest.warns(UserWarning, match="does not fit 1 layer.*head"):
        wrapped = wrap(small_cnn(), structure="shape")
    assert [p.name for p in psp_layers(wrapped)] == ["conv0", "conv1"]


def test_wrap_keeps_existing_wrappers_and_their_alpha(rng):
    once = wrap(small_cnn(), layers="conv1")
    once.get_layer("conv1").alpha.assign(np.linspace(0.1, 1, 8).astype("float32"))
    twice = wrap(once, layers="conv0")
    assert [p.name for p in psp_layers(twice)] == ["conv0", "conv1"]
    np.testing.assert_array_equal(
        to_numpy(twice.get_layer("conv1").alpha), np.linspace(0.1, 1, 8).astype("float32")
    )
    x = rng.normal(size=(2, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(to_numpy(twice(x)), to_numpy(once(x)), atol=1e-6)


# -- bad input -------------------------------------------------------------------


def test_explicitly_selecting_a_wrapped_layer_is_refused():
    once = wrap(small_cnn(), layers="conv1")
    with pytest.raises(ValueError, match="'conv1' is already wrapped"):
        wrap(once, layers="conv1")


def test_explicit_selection_the_structure_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="'shape' does not fit layer 'head'"):
        wrap(small_cnn(), structure="shape", layers=["head"])


def test_unknown_layer_names_and_unsupported_types_are_refused():
    with pytest.raises(ValueError, match=r"\['nope'\].*not in model 'cnn'"):
        wrap(small_cnn(), layers=["conv0", "nope"])
    with pytest.raises(TypeError, match="BatchNormalization, which PSP cannot wrap"):
        wrap(small_cnn(), layers=L.BatchNormalization)
    with pytest.raises(ValueError, match="Unknown structure 'rows'"):
        wrap(small_cnn(), structure="rows")


def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.conv = L.Conv2D(4, 3)

        def call(self, x):
            return self.conv(x)

    net = Net()
    net(np.zeros((1, 8, 8, 1), "float32"))
    with pytest.raises(ValueError, match="model 'net': it is a subclassed model"):
        wrap(net)
    with pytest.raises(ValueError, match="subclassed"):
        strip(net)


def test_model_without_inputs_is_refused():
    with pytest.raises(ValueError, match="no defined inputs"):
        wrap(keras.Sequential([L.Dense(3)], name="seq"))


def test_model_with_nothing_to_wrap_warns():
    model = keras.Sequential([keras.Input((4,)), L.BatchNormalization()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrap(model)
    assert any("no layer of model" in str(w.message) for w in caught)


def test_wrap_warns_when_batchnorm_cancels_output_side_alpha():
    with pytest.warns(UserWarning, match=r"2 layer\(s\) \(conv0, conv1\).*structure='channel'"):
        wrap(small_cnn(batchnorm=True), structure="filter")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrap(small_cnn(batchnorm=True), structure="channel")
        wrap(small_cnn(batchnorm=False), structure="filter")
    assert not [w for w in caught if "BatchNormalization normalizes" in str(w.message)]


def test_read_values_are_read_only_snapshots():
    """`read_values` gives each variable's value as numpy, equal to
    `get_weights`, read-only, and unchanged by later assignments."""
    from keras_psp.copying import read_values

    layer = L.Dense(3)
    layer.build((None, 4))
    scalar = keras.Variable(3.0, name="scale")
    values = read_values([*layer.weights, scalar])
    expected = [*layer.get_weights(), np.array(3.0, "float32")]
    for value, want in zip(values, expected, strict=True):
        np.testing.assert_array_equal(value, want)
        assert isinstance(value, np.ndarray) and not value.flags.writeable
        with pytest.raises(ValueError):
            value[...] = 1.0
    assert values[2].shape == ()
    layer.kernel.assign_add(np.ones((4, 3), "float32"))  # in place, as optimizers update
    np.testing.assert_array_equal(values[0], expected[0])
    layer.kernel.assign(np.ones((4, 3), "float32"))
    np.testing.assert_array_equal(values[0], expected[0])
    np.testing.assert_array_equal(to_numpy(layer.kernel), np.ones((4, 3)))
