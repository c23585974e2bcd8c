"""Composite layers opened by `wrap` (keras_psp.inlining): custom blocks built
from stock sublayers are pruned inside, exactly, and the user's model is not
touched; blocks that cannot open stay whole and `wrap` says why."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers as L
from keras import ops

import keras_psp
from helpers import to_numpy
from keras_psp import count_flops, slim, verify, wrap
from keras_psp.cloning import psp_layers
from keras_psp.inlining import inline_composites, is_inlinable


class ConvBlock(L.Layer):
    """A residual block of stock sublayers, combined with keras.ops."""

    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.conv1 = L.Conv2D(width, 3, padding="same", name="conv1")
        self.bn = L.BatchNormalization(name="bn")
        self.conv2 = L.Conv2D(width, 1, name="conv2")

    def call(self, x, training=None):
        h = ops.relu(self.bn(self.conv1(x), training=training))
        return x + self.conv2(h)

    def get_config(self):
        return {**super().get_config(), "width": self.width}


class Stage(L.Layer):
    """A composite of composites, one of which returns `None` beside its tensor."""

    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.first = ConvBlock(width, name="first")
        self.second = _WithScores(width, name="second")

    def call(self, x):
        x, scores = self.second(self.first(x))
        assert scores is None
        return x

    def get_config(self):
        return {**super().get_config(), "width": self.width}


class _WithScores(L.Layer):
    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.dense = L.Dense(width, activation="relu", name="dense")

    def call(self, x):
        return self.dense(x), None

    def get_config(self):
        return {**super().get_config(), "width": self.width}


class _ReadsAKernel(L.Layer):
    """Uses its sublayer's kernel outside the sublayer's call: cannot open."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(6, name="dense")

    def build(self, shape):
        self.dense.build(shape)

    def call(self, x):
        return ops.matmul(x, self.dense.kernel)


class _OwnWeight(L.Layer):
    """Holds a weight of its own: not a composite keras_psp opens."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(6, name="dense")

    def build(self, shape):
        self.dense.build(shape)
        self.offset = self.add_weight(shape=(6,), initializer="ones")

    def call(self, x):
        return self.dense(x) + self.offset


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 3, padding="same", name="stem")(inputs)
    x = ConvBlock(16, name="block_0")(x)
    x = Stage(16, name="stage")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(4, name="head")(x))


def _cut(model, fraction=0.4, seed=0):
    rng = np.random.default_rng(seed)
    for layer in psp_layers(model):
        alpha = np.ones(layer.alpha.shape, "float32")
        alpha[rng.random(alpha.shape) < fraction] = 0.0
        alpha.flat[0] = 1.0
        layer.alpha.assign(alpha)


def test_a_composite_of_your_own_is_opened_wrapped_and_slimmed_exactly(rng, tmp_path):
    model = _model()
    x = rng.normal(size=(4, 8, 8, 3)).astype("float32")
    reference = to_numpy(model(x))
    wrapped = wrap(model)
    names = {layer.name for layer in psp_layers(wrapped)}
    # every convolution inside the blocks is wrapped, under the name of its place
    assert {"block_0_conv1", "block_0_conv2", "stage_first_conv1", "stage_first_conv2",
            "stage_second_dense"} <= names
    assert verify(model, wrapped, x) < 1e-5
    _cut(wrapped)
    small = slim(wrapped, check_inputs=x)  # raises if it differs
    assert count_flops(small) < 0.8 * count_flops(model)
    assert all(type(layer).__module__.startswith("keras.") for layer in small.layers)
    # the user's model is untouched: no new calls of its sublayers, same outputs
    blocks = [model.get_layer("block_0"), model.get_layer("stage")]
    assert all(not sub._inbound_nodes for block in blocks
               for sub in block._flatten_layers(include_self=False, recursive=True))
    np.testing.assert_array_equal(to_numpy(model(x)), reference)
    small.save(tmp_path / "small.keras")
    loaded = keras.saving.load_model(tmp_path / "small.keras")
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(small(x)), rtol=1e-6, atol=1e-6)


def test_the_opened_model_counts_what_the_composites_counted(rng):
    model = _model()
    flat, kept = inline_composites(model)
    assert kept == []
    assert not any(is_inlinable(layer) for layer in flat.layers)
    assert count_flops(flat) == count_flops(model)
    x = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    assert verify(model, flat, x) < 1e-5


def test_a_composite_that_reads_a_kernel_directly_stays_whole_and_wrap_says_why(rng):
    inputs = keras.Input((5,))
    hidden = L.Dense(5, name="first")(inputs)
    model = keras.Model(inputs, L.Dense(3, name="last")(_ReadsAKernel(name="direct")(hidden)))
    x = rng.normal(size=(3, 5)).astype("float32")
    with pytest.warns(UserWarning, match=r"'direct': its call uses variable\(s\) .*kernel"):
        wrapped = wrap(model)
    assert {layer.name for layer in psp_layers(wrapped)} == {"first", "last"}
    assert verify(model, wrapped, x) < 1e-6


def test_a_layer_with_weights_of_its_own_is_not_opened(rng):
    inputs = keras.Input((5,))
    model = keras.Model(inputs, L.Dense(3, name="last")(_OwnWeight(name="own")(inputs)))
    assert not is_inlinable(model.get_layer("own"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = wrap(model)
    assert {layer.name for layer in psp_layers(wrapped)} == {"last"}
    x = rng.normal(size=(3, 5)).astype("float32")
    assert verify(model, wrapped, x) < 1e-6


def test_composites_keep_leaves_them_whole_and_bad_values_are_refused():
    model = _model()
    kept = wrap(model, composites="keep")
    assert {layer.name for layer in psp_layers(kept)} == {"stem", "head"}
    with pytest.raises(ValueError, match="composites"):
        wrap(model, composites="open")


def test_a_structure_per_layer_class(rng):
    inputs = keras.Input((6, 8))
    h = L.MultiHeadAttention(2, 4, name="attention")(inputs, inputs)
    h = L.Dense(16, activation="gelu", name="mlp_in")(h + inputs)
    model = keras.Model(inputs, L.Dense(8, name="mlp_out")(h))
    wrapped = wrap(model, structure={"MultiHeadAttention": "head", L.Dense: "channel"})
    assert {(layer.name, layer.structure) for layer in psp_layers(wrapped)} == {
        ("attention", "head"), ("mlp_in", "channel"), ("mlp_out", "channel")}
    only = wrap(model, structure={"MultiHeadAttention": "head"})
    assert [layer.name for layer in psp_layers(only)] == ["attention"]
    with pytest.raises(ValueError, match="Unknown structure 'neuron'"):
        wrap(model, structure={"Dense": "neuron"})
    with pytest.raises(TypeError, match="layer classes or class names"):
        wrap(model, structure={1: "channel"})
    x = rng.normal(size=(2, 6, 8)).astype("float32")
    assert verify(model, wrapped, x) < 1e-5


def test_elementwise_operations_carry_channels_and_constants_pin_them(rng):
    inputs = keras.Input((5, 6))
    h = ops.gelu(L.Dense(12, name="up")(inputs))  # a keras.ops operation between two Dense
    h = ops.mean(h, axis=1)  # a reduction over the tokens keeps the channels
    out = L.Dense(4, name="down")(h)
    scaled = L.Dense(5, name="side")(inputs) * np.arange(1, 6, dtype="float32")  # constant
    model = keras.Model(inputs, [out, L.Dense(3, name="side_out")(scaled)])
    wrapped = wrap(model)
    for layer in psp_layers(wrapped):
        alpha = np.ones(layer.alpha.shape, "float32")
        if layer.name in ("down", "side_out"):
            alpha[::2] = 0.0
        layer.alpha.assign(alpha)
    x = rng.normal(size=(3, 5, 6)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # operations are known: no warning
        small = slim(wrapped, check_inputs=x)
    assert small.get_layer("up").units == 6  # the cut neurons left through gelu and mean
    assert small.get_layer("side").units == 5  # the constant spans all 5 channels


def test_attention_matmuls_written_with_ops_are_counted():
    inputs = keras.Input((10, 8))
    q, k, v = (L.Dense(8, name=n)(inputs) for n in "qkv")
    scores = ops.softmax(ops.einsum("bqd,bkd->bqk", q, k))
    out = ops.matmul(scores, v)
    model = keras.Model(inputs, out)
    projections = 3 * 10 * 8 * 8
    assert count_flops(model) == projections + 10 * 10 * 8 + 10 * 10 * 8
    assert keras_psp.flops.layer_flops(model)[out._keras_history.operation.name] == 800


def test_a_composite_called_twice_stays_whole_so_its_weights_stay_shared(rng):
    inputs = keras.Input((4, 4, 16))
    block = ConvBlock(16, name="shared")
    model = keras.Model(inputs, block(block(inputs)))
    with pytest.warns(UserWarning, match=r"'shared': it is called more than once"):
        wrapped = wrap(model)
    assert psp_layers(wrapped) == []
    x = rng.normal(size=(2, 4, 4, 16)).astype("float32")
    assert verify(model, wrapped, x) < 1e-5
