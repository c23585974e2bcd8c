"""slim() on random graphs with random masks (hypothesis).

Each example builds a small functional network from the layer types surgery
knows (convolutions, depthwise, separable, BN, activations, pooling, padding,
merges, concatenation, squeeze-and-excitation gates, Flatten → Dense,
LayerNormalization), wraps every weighted layer in PSP with a random
structure, cuts random α, randomizes BatchNormalization statistics so cut
channels emit non-zero constants, and checks that the slim model is plain,
no larger, and equal to the pruned one.
"""

import os

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras import layers as L

from helpers import to_numpy
from keras_psp import PSP, count_flops, slim
from keras_psp.cloning import iter_layers, psp_layers
from keras_psp.surgery.cost import slim_flops

SIZE = 5
#: Random graphs per run; PSP_RANDOM_GRAPHS=20 for a quick local check.
EXAMPLES = int(os.environ.get("PSP_RANDOM_GRAPHS", "200"))
MERGES = (L.Add, L.Subtract, L.Average, L.Multiply, L.Maximum, L.Minimum)
CONV_STRUCTURES = ("channel", "filter", "column", "shape")


class _Builder:
    """Draws layers; records which PSP layers may be cut whole."""

    def __init__(self, data):
        self.data = data
        self.count = 0
        self.branch_layers = set()

    def draw(self, strategy):
        return self.data.draw(strategy)

    def name(self, kind):
        self.count += 1
        return f"{kind}{self.count}"

    def psp(self, layer, structures=CONV_STRUCTURES, branch=False):
        structure = self.draw(st.sampled_from(structures + (("layer",) if branch else ())))
        wrapped = PSP(layer, structure=structure)
        if branch:
            self.branch_layers.add(wrapped.name)
        return wrapped

    def conv(self, x, filters, kernel=3, padding="same", branch=False, **kwargs):
        layer = L.Conv2D(filters, kernel, padding=padding, name=self.name("conv"), **kwargs)
        return self.psp(layer, branch=branch)(x)

    def same_channels(self, x, channels):
        return x if x.shape[-1] == channels else self.conv(x, channels, kernel=1)

    def step(self, tensors):
        pick = self.draw(st.integers(0, len(tensors) - 1))
        x = tensors[pick]
        c = x.shape[-1]
        kind = self.draw(
            st.sampled_from(
                ["conv", "conv", "dw", "sep", "bn", "act", "drop", "pool", "pad_valid",
                 "pad_crop", "residual", "merge", "ops_add", "concat", "se", "se_dense", "ln",
                 "shared", "siamese"]
            )
        )
        if kind == "conv":
            use_bias = self.draw(st.booleans())
            return self.conv(x, self.draw(st.integers(2, 6)), use_bias=use_bias)
        if kind == "dw":
            m = self.draw(st.integers(1, 2))
            layer = L.DepthwiseConv2D(3, padding="same", depth_multiplier=m, name=self.name("dw"))
            return self.psp(layer, ("channel", "filter", "shape"))(x)
        if kind == "sep":
            layer = L.SeparableConv2D(
                self.draw(st.integers(2, 6)), 3, padding="same", name=self.name("sep")
            )
            return self.psp(layer, ("channel", "filter", "shape"))(x)
        if kind == "bn":
            return L.BatchNormalization(name=self.name("bn"))(x)
        if kind == "act":
            return L.Activation(self.draw(st.sampled_from(["relu", "tanh", "sigmoid", "swish"])))(x)
        if kind == "drop":
            return L.Dropout(0.5)(x)
        if kind == "pool":
            pool = self.draw(st.sampled_from([L.MaxPooling2D, L.AveragePooling2D]))
            return pool(3, strides=1, padding="same")(x)
        if kind == "pad_valid":  # a valid convolution folds constant inputs into its bias
            return self.conv(L.ZeroPadding2D(1)(x), self.draw(st.integers(2, 6)), padding="valid")
        if kind == "pad_crop":
            return L.Cropping2D(1)(L.ZeroPadding2D(1)(x))
        if kind == "residual":
            y = self.conv(x, c, branch=True)
            y = L.BatchNormalization(name=self.name("bn"))(y)
            return self.draw(st.sampled_from(MERGES))()([x, y])
        if kind in ("merge", "ops_add"):
            other = tensors[self.draw(st.integers(0, len(tensors) - 1))]
            other = self.same_channels(other, c)
            if kind == "ops_add":
                return x + other
            return self.draw(st.sampled_from(MERGES))()([x, other])
        if kind == "concat":
            other = tensors[self.draw(st.integers(0, len(tensors) - 1))]
            return L.Concatenate()([x, other])
        if kind == "se":
            gate = L.GlobalAveragePooling2D(keepdims=True)(x)
            gate = self.conv(gate, 2, kernel=1, activation="relu")
            gate = self.conv(gate, c, kernel=1, activation="sigmoid")
            return L.Multiply()([x, gate])
        if kind == "se_dense":
            gate = L.GlobalAveragePooling2D()(x)
            dense = L.Dense(c, activation="sigmoid", name=self.name("fc"))
            gate = self.psp(dense, ("channel", "filter"))(gate)
            return L.Multiply()([x, L.Reshape((1, 1, c))(gate)])
        if kind == "shared":  # one conv on two tensors: one set of channels for both calls
            other = self.same_channels(tensors[self.draw(st.integers(0, len(tensors) - 1))], c)
            layer = self.psp(L.Conv2D(self.draw(st.integers(2, 6)), 3, padding="same",
                                      name=self.name("tied")))
            return L.Add()([layer(x), layer(other)])
        if kind == "siamese":  # a nested model called twice: each call its own ops
            other = self.same_channels(tensors[self.draw(st.integers(0, len(tensors) - 1))], c)
            inner = keras.Input((SIZE, SIZE, c))
            y = L.BatchNormalization(name=self.name("bn"))(self.conv(inner, self.draw(
                st.integers(2, 6))))
            encoder = keras.Model(inner, L.ReLU()(y), name=self.name("encoder"))
            return L.Concatenate()([encoder(x), encoder(other)])
        return L.LayerNormalization()(x)

    def model(self):
        inputs = keras.Input((SIZE, SIZE, 3))
        x = inputs
        if self.draw(st.booleans()):  # as keras.io's examples start: adapted statistics
            norm = L.Normalization(name=self.name("norm"))
            norm.adapt(np.random.default_rng(self.count).normal(2.0, 3.0, (16, SIZE, SIZE, 3)))
            x = norm(x)
        tensors = [self.conv(x, self.draw(st.integers(2, 6)))]
        for _ in range(self.draw(st.integers(2, 9))):
            tensors.append(self.step(tensors))
        x = tensors[-1]
        head = self.draw(st.sampled_from(["gap", "flatten", "valid"]))
        if head == "gap":
            x = L.GlobalAveragePooling2D()(x)
        elif head == "flatten":
            x = L.Flatten()(L.MaxPooling2D(2)(x))
        else:
            x = L.Flatten()(self.conv(x, 3, kernel=SIZE, padding="valid"))
        logits = self.psp(L.Dense(4, name=self.name("fc")), ("channel", "filter"))(x)
        return keras.Model(inputs, logits)


def _randomize(model, data, rng, branch_layers):
    """Random α (layers on a residual branch may lose every structure)."""
    cut = data.draw(st.floats(0.0, 0.7))
    for layer in psp_layers(model):
        alpha = rng.uniform(0.2, 1.5, size=layer.alpha.shape).astype("float32")
        alpha[rng.random(alpha.shape) < cut] = 0.0
        if layer.name not in branch_layers:
            alpha.flat[rng.integers(alpha.size)] = 1.0
        layer.alpha.assign(alpha)
    for layer in iter_layers(model):
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [rng.uniform(0.5, 1.5, n), rng.normal(size=n), rng.normal(size=n) * 0.1,
                 rng.uniform(0.5, 1.5, n)]
            )


def _run(model, x):
    """Inference outputs; on JAX one compiled call (eager JAX compiles every op for
    every new shape: seconds per random graph)."""
    if keras.backend.backend() == "jax":
        return model.predict(x, verbose=0)
    return to_numpy(model(x, training=False))


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_random_graphs(data):
    builder = _Builder(data)
    model = builder.model()
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    _randomize(model, data, rng, builder.branch_layers)
    x = rng.normal(size=(3, SIZE, SIZE, 3)).astype("float32")
    reference = _run(model, x)
    small = slim(model)
    assert not psp_layers(small)
    assert small.count_params() <= model.count_params()
    out = _run(small, x)
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    assert slim_flops(model) == count_flops(small)  # the plan counts what slim builds


def test_generator_covers_every_kind():
    """The strategy reaches every step kind (so the property test can fail)."""
    seen = set()

    @settings(max_examples=100, deadline=None, database=None, derandomize=True)
    @given(st.data())
    def collect(data):
        model = _Builder(data).model()
        seen.update(type(layer).__name__ for layer in model.layers)  # nested models too
        for layer in iter_layers(model):
            seen.update({type(layer).__name__, type(getattr(layer, "layer", layer)).__name__})
            if len(layer._inbound_nodes) > 1 and layer.name.startswith("tied"):
                seen.add("shared")

    collect()
    expected = {"Conv2D", "DepthwiseConv2D", "SeparableConv2D", "BatchNormalization", "Add",
                "Concatenate", "Multiply", "Reshape", "Flatten", "ZeroPadding2D",
                "LayerNormalization", "PSP", "Normalization", "Functional", "shared"}
    assert expected <= seen, expected - seen


pytestmark = pytest.mark.filterwarnings("ignore:slim. surgery keeps every channel")
