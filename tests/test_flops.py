"""count_flops / count_params: hand-computed MACs, and TensorFlow's profiler."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_psp
from keras_psp import PSP, count_flops, count_params, slim, wrap
from keras_psp.cloning import psp_layers
from keras_psp.models import cifar_resnet

# (layer factory, input shape without batch, MACs per example worked out by hand)
CASES = {
    # out positions * kernel * C_in / groups * filters
    "conv2d_same": (lambda: L.Conv2D(4, 3, padding="same"), (8, 8, 3), 64 * 9 * 3 * 4),
    "conv2d_valid": (lambda: L.Conv2D(4, 3), (8, 8, 3), 36 * 9 * 3 * 4),
    "conv2d_strided": (
        lambda: L.Conv2D(4, 3, strides=2, padding="same"), (8, 8, 3), 16 * 9 * 3 * 4
    ),
    "conv2d_dilated": (lambda: L.Conv2D(2, 3, dilation_rate=2), (7, 7, 3), 9 * 9 * 3 * 2),
    "conv2d_grouped": (lambda: L.Conv2D(6, (3, 1), groups=2), (5, 5, 4), 15 * 3 * 2 * 6),
    "conv2d_channels_first": (
        lambda: L.Conv2D(4, 3, data_format="channels_first"), (3, 8, 8), 36 * 9 * 3 * 4
    ),
    "conv1d": (lambda: L.Conv1D(5, 3), (10, 2), 8 * 3 * 2 * 5),
    "conv1d_causal": (lambda: L.Conv1D(5, 3, padding="causal"), (10, 2), 10 * 3 * 2 * 5),
    "conv3d": (lambda: L.Conv3D(2, 2), (3, 3, 3, 1), 8 * 8 * 1 * 2),
    # in positions * kernel * C_in * filters
    "conv2d_transpose": (lambda: L.Conv2DTranspose(4, 3, strides=2), (3, 3, 2), 9 * 9 * 2 * 4),
    "conv1d_transpose": (lambda: L.Conv1DTranspose(3, 2), (5, 2), 5 * 2 * 2 * 3),
    # out positions * kernel * C_in * depth multiplier
    "depthwise2d": (
        lambda: L.DepthwiseConv2D(3, depth_multiplier=2, padding="same"), (4, 4, 3), 16 * 9 * 3 * 2
    ),
    "depthwise1d": (lambda: L.DepthwiseConv1D(3, depth_multiplier=2), (6, 3), 4 * 3 * 3 * 2),
    # depthwise + pointwise
    "separable2d": (
        lambda: L.SeparableConv2D(5, 3, depth_multiplier=2), (6, 6, 3), 16 * (9 * 6 + 6 * 5)
    ),
    "separable1d": (lambda: L.SeparableConv1D(4, 3), (7, 2), 5 * (3 * 2 + 2 * 4)),
    # positions * in * units
    "dense": (lambda: L.Dense(6), (4,), 4 * 6),
    "dense_rank3": (lambda: L.Dense(6), (5, 4), 5 * 4 * 6),
    # everything else counts zero
    "batchnorm": (lambda: L.BatchNormalization(), (4, 4, 3), 0),
    "relu": (lambda: L.ReLU(), (4, 4, 3), 0),
    "maxpool": (lambda: L.MaxPooling2D(), (4, 4, 3), 0),
    "global_pool": (lambda: L.GlobalAveragePooling2D(), (4, 4, 3), 0),
}


def _single(factory, shape):
    inputs = keras.Input(shape)
    return keras.Model(inputs, factory()(inputs))


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_macs(name):
    factory, shape, expected = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known layers never warn
        assert count_flops(_single(factory, shape)) == expected


def test_nested_model_and_reused_layers():
    inner = keras.Sequential(
        [keras.Input((6, 6, 2)), L.Conv2D(3, 3, padding="same"), L.ReLU()], name="inner"
    )
    shared = L.Dense(4, name="shared")
    a, b = keras.Input((6, 6, 2)), keras.Input((6, 6, 2))
    x = L.Add()([inner(a), inner(b)])  # nested model called twice
    x = L.Conv2D(2, 1)(x)
    v = L.GlobalAveragePooling2D()(x)  # (2,)
    w = L.Reshape((6, 12))(x)  # rank-3 Dense input
    y = L.Flatten()(L.Dense(2)(w))
    out = L.Concatenate()([shared(v), shared(L.Dense(2)(y))])  # shared called twice
    model = keras.Model([a, b], out)
    expected = (
        2 * 36 * 9 * 2 * 3  # inner conv, two calls
        + 36 * 3 * 2  # 1x1 conv
        + 6 * 12 * 2  # Dense(2) on (6, 12)
        + 12 * 2  # Dense(2) on the flattened (12,)
        + 2 * (2 * 4)  # shared Dense(4), two calls on (2,)
    )
    assert count_flops(model) == expected
    assert count_params(model) == model.count_params()


def test_resnet56_matches_the_literature():
    model = cifar_resnet(56)
    macs = count_flops(model)
    # 125.49 M of the paper's network + two 1x1 projection shortcuts (2 * 131 072).
    assert macs == 125_747_840
    assert abs(macs - 1.25e8) / 1.25e8 < 0.02
    assert count_params(model) == model.count_params() == 860_026


def test_wrapped_model_counts_like_the_plain_one():
    model = cifar_resnet(8, input_shape=(8, 8, 3))
    wrapped = wrap(model)
    assert psp_layers(wrapped)
    assert count_flops(wrapped) == count_flops(model) == count_flops(keras_psp.strip(wrapped))
    assert count_params(wrapped) == wrapped.count_params()

    inputs = keras.Input((5, 5, 2))
    single = keras.Model(inputs, PSP(L.Conv2D(3, 3), structure="filter")(inputs))
    assert count_flops(single) == 9 * 9 * 2 * 3


def test_pruned_counts_the_slim_model():
    wrapped = wrap(cifar_resnet(8, input_shape=(8, 8, 3)))
    rng = np.random.default_rng(0)
    for layer in psp_layers(wrapped)[1:-1]:
        alpha = np.ones(layer.alpha.shape, "float32")
        alpha[rng.random(alpha.shape) < 0.5] = 0.0
        alpha[0] = 1.0
        layer.alpha.assign(alpha)
    dense_macs, pruned_macs = count_flops(wrapped), count_flops(wrapped, pruned=True)
    assert pruned_macs < dense_macs
    assert pruned_macs == count_flops(slim(wrapped))
    assert count_params(wrapped, pruned=True) == slim(wrapped).count_params()
    assert count_params(wrapped, pruned=True) < count_params(wrapped)


class Scale(L.Layer):
    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


def test_unknown_layer_with_weights_warns_once():
    inputs = keras.Input((4,))
    scale = Scale(name="scale")
    x = scale(L.Dense(4)(scale(inputs)))
    model = keras.Model(inputs, L.Dense(2)(x))
    with pytest.warns(UserWarning, match="'scale' \\(Scale\\)") as record:
        assert count_flops(model) == 4 * 4 + 4 * 2
    assert len(record) == 1 and str(record[0].message).count("'scale'") == 1


def test_register_layer_macs(monkeypatch):
    from keras_psp.layers import registry

    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    keras_psp.register_layer(Scale, macs=lambda layer, shape_in, shape_out: shape_in[-1])
    inputs = keras.Input((3, 5))
    model = keras.Model(inputs, Scale()(inputs))
    assert count_flops(model) == 5


def test_errors():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Subclassed()
    model(np.ones((1, 3)))
    with pytest.raises(TypeError, match="subclassed model"):
        count_flops(model)
    with pytest.raises(TypeError, match="subclassed model"):
        count_params(model, pruned=True)
    with pytest.raises(TypeError, match="keras.Model"):
        count_flops(L.Dense(2))
    inputs = keras.Input((None, None, 3))
    with pytest.raises(ValueError, match="not fixed"):
        count_flops(keras.Model(inputs, L.Conv2D(2, 3)(inputs)))


# --- TensorFlow's profiler ---------------------------------------------------

# Ops whose profiler FLOPs are 2 * MACs of a conv/dense layer; the others
# (BiasAdd, Mul/AddV2 of batch norm, Mean, Softmax...) are not MACs.
MAC_OPS = {
    "Conv2D",
    "Conv3D",
    "DepthwiseConv2dNative",
    "Conv2DBackpropInput",
    "MatMul",
    "BatchMatMulV2",
    "BatchMatMulV3",
}


def _tf_flops_by_op_type(graph):
    """{op type: FLOPs} from the profiler's "op" view of `graph`.

    In the "op" view the result is a chain: each node is one op type, its
    `float_ops` that type's total, its `total_float_ops` the sum down the
    chain. Functions called from the graph (Keras runs grouped convolutions in
    a nested, XLA-compiled tf.function) are profiled at their call sites.
    """
    import tensorflow as tf

    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    node = tf.compat.v1.profiler.profile(graph, cmd="op", options=options)
    totals = {}
    while node.children:
        (node,) = node.children
        totals[node.name] = node.float_ops
    for op in graph.get_operations():
        if op.type in ("PartitionedCall", "StatefulPartitionedCall"):
            inner = graph._functions[op.get_attr("f").name].graph
            for name, value in _tf_flops_by_op_type(inner).items():
                totals[name] = totals.get(name, 0) + value
    return totals


def _tf_macs(model):
    import tensorflow as tf

    spec = tf.TensorSpec((1,) + tuple(model.input_shape[1:]), tf.float32)
    function = tf.function(model, autograph=False).get_concrete_function(spec)
    totals = _tf_flops_by_op_type(function.graph)
    assert sum(totals.values()) > 0
    return sum(value for name, value in totals.items() if name in MAC_OPS) / 2


def _mixed_cnn():
    x = inputs = keras.Input((16, 16, 8))
    x = L.Conv2D(12, 3, strides=2, padding="same", activation="relu")(x)
    x = L.Conv2D(12, 3, groups=3)(x)
    x = L.BatchNormalization()(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(x)
    x = L.SeparableConv2D(10, 3, depth_multiplier=2)(x)
    # TF approximates Conv2DBackpropInput as out_positions / stride**2, exact for "same".
    x = L.Conv2DTranspose(6, 3, strides=2, padding="same")(x)
    x = L.Reshape((-1, 6))(x)
    x = L.Conv1D(5, 3, strides=2)(x)
    x = L.SeparableConv1D(4, 3)(x)
    x = L.Dense(7)(x)
    x = L.Flatten()(x)
    return keras.Model(inputs, L.Dense(3)(x), name="mixed")


def _volumetric():
    x = inputs = keras.Input((6, 6, 6, 2))
    x = L.Conv3D(4, 3, padding="same")(x)
    x = L.Conv3D(3, 2, strides=2)(x)
    return keras.Model(inputs, L.Dense(2)(L.Flatten()(x)), name="volumetric")


ARCHITECTURES = {
    "mixed_cnn": _mixed_cnn,
    "volumetric": _volumetric,
    "resnet8": lambda: cifar_resnet(8),
    "resnet8_wrapped": lambda: wrap(cifar_resnet(8, input_shape=(8, 8, 3))),
    "mobilenet_v2": lambda: keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10
    ),
}


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_matches_tensorflow_profiler(name):
    model = ARCHITECTURES[name]()
    assert count_flops(model) == _tf_macs(model)


class _MLP(keras.layers.Layer):
    """A composite layer: two Dense sublayers, no MAC function of its own."""

    def __init__(self, hidden, out, **kwargs):
        super().__init__(**kwargs)
        self.up, self.down = L.Dense(hidden, activation="gelu"), L.Dense(out)

    def call(self, x):
        return self.down(self.up(x))

    def compute_output_shape(self, shape):
        return (*shape[:-1], self.down.units)


def test_attention_and_composite_layers_count_what_they_compute():
    """A transformer block of stock layers: MultiHeadAttention counts its four
    projections and both attention matmuls; a composite counts its sublayers."""
    T, D, H, K, F = 5, 8, 2, 4, 16
    inputs = keras.Input((T, D))
    mha = L.MultiHeadAttention(H, K, name="mha")
    x = L.LayerNormalization()(L.Add()([inputs, mha(inputs, inputs)]))
    mlp = _MLP(F, D, name="mlp")
    x = L.Add()([x, mlp(x)])
    model = keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x)))
    nodes = [len(layer._inbound_nodes) for layer in (mha._query_dense, mlp.up)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # everything is visible
        per_layer = keras_psp.flops.layer_flops(model)
    assert per_layer == {"mha": 3 * T * D * H * K + H * T * T * (K + K) + T * H * K * D,
                         "mlp": T * D * F + T * F * D, "head": D * 3}
    assert keras_psp.flops.invisible_share(model) == 0.0
    assert [len(layer._inbound_nodes) for layer in (mha._query_dense, mlp.up)] == nodes
    wrapped = wrap(model)
    assert count_flops(wrapped, pruned=True) == count_flops(slim(wrapped)) == count_flops(model)


def test_cross_attention_and_einsum_with_an_ellipsis():
    q, kv = keras.Input((3, 6)), keras.Input((7, 5))
    out = L.MultiHeadAttention(2, 4, value_dim=3, name="cross")(q, kv)
    x = L.EinsumDense("...b,bc->...c", output_shape=4, name="proj")(out)
    model = keras.Model([q, kv], x)
    per_layer = keras_psp.flops.layer_flops(model)
    query, key, value = 3 * 6 * 2 * 4, 7 * 5 * 2 * 4, 7 * 5 * 2 * 3
    attention = 2 * 3 * 7 * (4 + 3)
    assert per_layer["cross"] == query + key + value + attention + 3 * 2 * 3 * 6
    assert per_layer["proj"] == 3 * 6 * 4


def test_a_partly_invisible_model_says_which_share_everywhere(capsys):
    inputs = keras.Input((4,))
    x = Scale(name="scale")(L.Dense(4, name="d1")(inputs))
    model = keras.Model(inputs, L.Dense(2, name="d2")(x))
    share = 4 / model.count_params()
    assert keras_psp.flops.invisible_share(model) == pytest.approx(share)
    with pytest.warns(UserWarning, match=rf"'scale' \(Scale\), holding {share:.1%} of the "
                                         "model's weights"):
        count_flops(model)
    wrapped = wrap(model)
    with pytest.warns(UserWarning, match=r"psp_flops is a FLOPs ratio over the visible part"):
        keras_psp.summary(wrapped, print_fn=print)
        x_data = np.random.default_rng(0).random((16, 4)).astype("float32")
        wrapped.compile("sgd", "mse")
        wrapped.fit(x_data, np.zeros((16, 2), "float32"), epochs=1, verbose=0,
                    callbacks=[keras_psp.SeparationMonitor(verbose=0)])
    assert "FLOPs: the visible part only" in capsys.readouterr().out


def test_a_composite_is_traced_once_until_a_family_is_registered(monkeypatch):
    from keras_psp.layers import registry

    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))

    class Lin(keras.layers.Layer):  # no family: invisible until registered
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1], 3))

        def call(self, x):
            return x @ self.w

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense, self.lin = L.Dense(4), Lin()

        def call(self, x):
            return self.lin(self.dense(x))

        def compute_output_shape(self, shape):
            return (*shape[:-1], 3)

    inputs = keras.Input((5,))
    model = keras.Model(inputs, Block(name="block")(inputs))
    traces = []
    original = keras.src.backend.compute_output_spec
    monkeypatch.setattr(keras.src.backend, "compute_output_spec",
                        lambda *a, **k: traces.append(1) or original(*a, **k))
    with pytest.warns(UserWarning, match=r"'block' \(Block\)"):
        assert count_flops(model) == 5 * 4  # the Dense only
        assert count_flops(model) == 5 * 4
    assert len(traces) == 1 and keras_psp.flops.invisible_share(model) == pytest.approx(12 / 36)
    keras_psp.register_layer(Lin, macs=lambda layer, shape_in, shape_out: shape_in[-1] * 3)
    assert count_flops(model) == 5 * 4 + 4 * 3 and len(traces) == 2  # traced again
    assert keras_psp.flops.invisible_share(model) == 0.0
