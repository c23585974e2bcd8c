"""slim(): physically smaller, numerically equal models."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

from helpers import assert_loads_without_keras_psp, to_numpy
from keras_psp import count_flops, models, slim, verify, wrap
from keras_psp.cloning import iter_layers, psp_layers
from keras_psp.models import cifar_resnet

pytestmark = pytest.mark.filterwarnings("ignore:wrap. the α of")

STOCK = tuple(
    getattr(L, name) for name in dir(L) if isinstance(getattr(L, name), type)
)


def _prune_randomly(model, rng, cut=0.4):
    for layer in psp_layers(model):
        alpha = rng.uniform(0.2, 1.5, size=layer.alpha.shape).astype("float32")
        alpha[rng.random(alpha.shape) < cut] = 0.0
        alpha.flat[0] = 1.0
        layer.alpha.assign(alpha)
    return model


def _check(model, x, rtol=1e-4):
    """slim(model) is smaller, plain, and equal to model to rtol (relative)."""
    before = [to_numpy(w).copy() for w in model.weights]
    small = slim(model)
    for w, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(to_numpy(w), value)  # input untouched
    assert not psp_layers(small)
    assert all(isinstance(layer, STOCK) for layer in iter_layers(small))
    reference = np.asarray(model.predict(x, verbose=0))
    assert verify(model, small, x) <= rtol * np.abs(reference).max()
    assert small.count_params() < model.count_params()
    return small


def _logits_model(body, input_shape, num_classes=7):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, L.Dense(num_classes, name="logits")(body(inputs)))


def test_resnet_residual_channels_are_coupled(rng):
    model = _prune_randomly(wrap(cifar_resnet(20, input_shape=(16, 16, 3))), rng)
    small = _check(model, rng.random((4, 16, 16, 3)).astype("float32"))
    # the residual stream of a stage has one channel count at every Add
    for stage in ("s1", "s2", "s3"):
        adds = [a for a in small.layers if a.name.startswith(stage) and a.name.endswith("_add")]
        widths = {a.output.shape[-1] for a in adds}
        assert len(widths) == 1, (stage, widths)


def test_consumer_drops_its_own_cut_inputs_from_a_shared_stream(rng):
    """A stream channel another consumer reads stays in the stream, but the
    consumer whose input α cut it no longer computes with it (a gather)."""
    model = wrap(cifar_resnet(8, input_shape=(8, 8, 3)), layers=["s2b1a_conv"])
    layer = model.get_layer("s2b1a_conv")
    alpha = np.ones(16, "float32")
    alpha[:5] = 0.0
    layer.alpha.assign(alpha)
    small = _check(model, rng.random((3, 8, 8, 3)).astype("float32"), rtol=1e-5)
    # s1 stream still feeds the projection shortcut, which reads all 16 channels
    assert small.get_layer("s1b1_add").output.shape[-1] == 16
    assert small.get_layer("s2b1p_conv").kernel.shape[-2] == 16
    assert small.get_layer("s2b1a_conv").kernel.shape[-2] == 11
    conv_input = small.get_layer("s2b1a_conv").input
    gather = conv_input._keras_history.operation
    assert type(gather).__name__ == "Take"
    assert conv_input.shape[-1] == 11


def test_plain_chain_drops_cut_channels_from_producer(rng):
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(12, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(10, 3, padding="same", name="c2")(x)
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(x))
    wrapped = wrap(model, layers=["c2"])
    alpha = np.ones(12, "float32")
    alpha[[1, 4, 7]] = 0.0
    wrapped.get_layer("c2").alpha.assign(alpha)
    small = _check(wrapped, rng.random((2, 8, 8, 3)).astype("float32"), rtol=1e-5)
    assert small.get_layer("c1").filters == 9
    assert small.get_layer("bn1").gamma.shape == (9,)
    assert small.get_layer("c2").kernel.shape == (3, 3, 9, 10)
    for name in ("c1", "bn1", "c2"):  # slim builds with zeros, then restores the initializers
        before, after = model.get_layer(name).get_config(), small.get_layer(name).get_config()
        for key in [k for k in before if k.endswith("_initializer")]:
            assert after[key] == before[key], (name, key)
        assert any(k.endswith("_initializer") for k in before)


def test_flatten_to_dense_uses_channels_last_index_map(rng):
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = L.MaxPooling2D()(x)
    x = L.Flatten()(x)
    model = keras.Model(inputs, L.Dense(5, name="fc")(x))
    wrapped = wrap(model, structure="filter", layers=["conv"])
    wrapped = wrap(wrapped, structure="channel", layers=["fc"])
    fc_alpha = np.ones(2 * 2 * 8, "float32")
    fc_alpha[np.arange(4) * 8 + 3] = 0.0  # channel 3 at every position
    fc_alpha[np.arange(4) * 8 + 6] = 0.0  # channel 6 at every position
    fc_alpha[5] = 0.0  # one position only: channel 5 must stay
    wrapped.get_layer("fc").alpha.assign(fc_alpha)
    small = _check(wrapped, rng.random((3, 6, 6, 2)).astype("float32"), rtol=1e-5)
    assert small.get_layer("conv").filters == 6
    assert small.get_layer("fc").kernel.shape == (23, 5)  # position 5 gathered away


def test_densenet_concatenation_offsets(rng):
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="stem")(inputs)
    for i in range(3):
        y = L.BatchNormalization(name=f"bn{i}")(x)
        y = L.ReLU()(y)
        y = L.Conv2D(4, 3, padding="same", name=f"grow{i}")(y)
        x = L.Concatenate(name=f"cat{i}")([x, y])
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, L.Dense(3, name="fc")(x))
    wrapped = _prune_randomly(wrap(model), rng, cut=0.35)
    _check(wrapped, rng.random((2, 8, 8, 3)).astype("float32"))


def test_squeeze_excitation_gate_is_coupled_to_the_trunk(rng):
    inputs = keras.Input((8, 8, 3))
    trunk = L.Conv2D(8, 3, padding="same", activation="relu", name="trunk")(inputs)
    gate = L.GlobalAveragePooling2D(keepdims=True)(trunk)
    gate = L.Conv2D(4, 1, activation="relu", name="squeeze")(gate)
    gate = L.Conv2D(8, 1, activation="sigmoid", name="excite")(gate)
    x = L.Multiply()([trunk, gate])
    pooled = L.GlobalAveragePooling2D()(x)
    gate2 = L.Reshape((1, 1, 8))(L.Dense(8, activation="sigmoid", name="fcgate")(pooled))
    x = L.Multiply()([x, gate2])
    x = L.Conv2D(6, 1, name="head")(x)
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(x))
    readers = ["head", "squeeze", "fcgate"]  # every reader of trunk channels 0 and 5
    wrapped = wrap(model, layers=readers)
    alpha = np.ones(8, "float32")
    alpha[[0, 5]] = 0.0
    for name in readers:
        wrapped.get_layer(name).alpha.assign(alpha)
    small = _check(wrapped, rng.random((2, 8, 8, 3)).astype("float32"), rtol=1e-5)
    assert small.get_layer("trunk").filters == 6
    assert small.get_layer("excite").filters == 6
    assert small.get_layer("fcgate").units == 6


def test_unknown_layer_is_a_channel_barrier_with_a_warning(rng):
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = L.Lambda(lambda t: t * 2.0, name="double")(x)
    x = L.Conv2D(5, 3, padding="same", name="c2")(x)
    x = L.Conv2D(4, 1, name="c3")(x)
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(x))
    wrapped = wrap(model, layers=["c2", "c3"])
    wrapped.get_layer("c2").alpha.assign(np.array([1, 0, 1, 1, 0, 1], "float32"))
    wrapped.get_layer("c3").alpha.assign(np.array([1, 0, 1, 1, 0], "float32"))
    with pytest.warns(UserWarning, match=r"keeps every channel through layer\(s\) .double. \(unknown type Lambda\).*Extending keras_psp"):
        small = slim(wrapped)
    x = rng.random((2, 8, 8, 3)).astype("float32")
    assert verify(wrapped, small, x) < 1e-5
    assert small.get_layer("c1").filters == 6  # kept: it flows through the Lambda
    assert small.get_layer("c2").kernel.shape[-2] == 4  # its own cut inputs gathered away
    assert small.get_layer("c2").filters == 3  # its cut outputs are unread by c3


@pytest.mark.parametrize(
    "build",
    [
        lambda: models.cifar_resnet(56, input_shape=(16, 16, 3)),
        lambda: models.densenet(40, growth_rate=12, input_shape=(16, 16, 3)),
        lambda: models.vgg(input_shape=(16, 16, 3)),
    ],
    ids=["resnet56", "densenet40", "vgg_flatten"],
)
@pytest.mark.parametrize("structure", ["channel", "column"])
def test_reference_architectures(build, structure, rng):
    model = _prune_randomly(wrap(build(), structure=structure), rng)
    _bn_with_offsets(model, rng)
    small = _check(model, rng.random((2, 16, 16, 3)).astype("float32"))
    assert count_flops(small) < count_flops(model)


@pytest.mark.parametrize("name", ["ResNet50", "MobileNetV2", "DenseNet121", "VGG16"])
def test_keras_applications(name, rng):
    base = getattr(keras.applications, name)(
        weights=None, input_shape=(32, 32, 3), classes=5, classifier_activation=None
    )
    model = _prune_randomly(wrap(base), rng)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check(model, rng.random((2, 32, 32, 3)).astype("float32"))
    assert not [w for w in caught if "slim" in str(w.message)]  # every layer is known


def test_slim_check_inputs_catches_a_wrong_rebuild(rng, monkeypatch):
    from keras_psp.layers.dense import DenseRule

    model = _prune_randomly(wrap(cifar_resnet(8, input_shape=(8, 8, 3))), rng)
    x = rng.random((2, 8, 8, 3)).astype("float32")
    assert slim(model, check_inputs=x) is not None
    original = DenseRule.rebuild

    def broken(self, op, present_in, present_out, bias=None):
        layer, weights = original(self, op, present_in, present_out, bias)
        weights[1] = weights[1] + np.arange(len(weights[1]))  # changes the softmax
        return layer, weights

    monkeypatch.setattr(DenseRule, "rebuild", broken)
    with pytest.raises(RuntimeError, match="slim model differs"):
        slim(model, check_inputs=x)


def test_slim_model_loads_without_keras_psp(tmp_path, rng):
    model = _prune_randomly(wrap(cifar_resnet(8, input_shape=(8, 8, 3))), rng)
    x = rng.random((3, 8, 8, 3)).astype("float32")
    assert_loads_without_keras_psp(slim(model), x, model.predict(x, verbose=0), tmp_path, rtol=1e-4)


def _bn_with_offsets(model, rng):
    """Random BN statistics: a cut filter then emits a non-zero act(β')."""
    for layer in iter_layers(model):
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [rng.uniform(0.5, 1.5, n), rng.uniform(0.2, 1.0, n), rng.normal(size=n) * 0.1,
                 rng.uniform(0.5, 1.5, n)]
            )


def _filter_cut_model(consumer_kernel, consumer_padding, rng):
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="producer")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(5, consumer_kernel, padding=consumer_padding, name="consumer")(x)
    model = keras.Model(inputs, L.Dense(3, name="fc")(L.Flatten()(x)))
    wrapped = wrap(model, structure="filter", layers=["producer"])
    alpha = np.ones(8, "float32")
    alpha[[2, 3, 6]] = 0.0
    wrapped.get_layer("producer").alpha.assign(alpha)
    _bn_with_offsets(wrapped, rng)
    return wrapped


@pytest.mark.parametrize("kernel, padding", [(1, "same"), (3, "valid")])
def test_cut_filters_constant_after_bn_fold_into_the_consumer_bias(kernel, padding, rng):
    """A cut filter still emits relu(β') after BN: 1×1 and valid consumers see
    it everywhere, so it leaves the model and its value moves to their bias."""
    wrapped = _filter_cut_model(kernel, padding, rng)
    small = _check(wrapped, rng.random((3, 6, 6, 3)).astype("float32"), rtol=1e-5)
    assert small.get_layer("producer").filters == 5
    assert small.get_layer("bn").gamma.shape == (5,)
    assert small.get_layer("consumer").kernel.shape[-2] == 5


def test_cut_filters_constant_before_same_padding_stay(rng):
    """With `same` padding a constant channel differs at the border (zero
    padding): removing it would be wrong, so it stays."""
    wrapped = _filter_cut_model(3, "same", rng)
    x = rng.random((3, 6, 6, 3)).astype("float32")
    small = slim(wrapped)
    reference = np.asarray(wrapped.predict(x, verbose=0))
    assert verify(wrapped, small, x) <= 1e-5 * np.abs(reference).max()
    assert small.get_layer("producer").filters == 8


def test_zero_constant_channels_leave_even_before_same_padding(rng):
    """Without bias or BN a cut filter is exactly zero, like the padding."""
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="producer")(inputs)
    x = L.Conv2D(5, 3, padding="same", name="consumer")(L.ReLU()(x))
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(x))
    wrapped = wrap(model, structure="filter", layers=["producer"])
    wrapped.get_layer("producer").alpha.assign(np.array([1, 0, 1, 0, 0, 1, 1, 1], "float32"))
    small = _check(wrapped, rng.random((2, 6, 6, 3)).astype("float32"), rtol=1e-5)
    assert small.get_layer("producer").filters == 5


@pytest.mark.parametrize("merge", [L.Add, L.Subtract, L.Average, L.Multiply, L.Maximum])
def test_layer_cut_on_a_residual_branch_removes_the_branch(merge, rng):
    model = cifar_resnet(8, input_shape=(8, 8, 3))
    if merge is not L.Add:  # same network with another merge in the first block
        config = model.get_config()
        for layer in config["layers"]:
            if layer["config"]["name"] == "s1b1_add":
                layer["class_name"] = merge.__name__
        model = keras.Model.from_config(config)
    wrapped = wrap(model, structure="layer", layers=["s1b1b_conv"])
    wrapped.get_layer("s1b1b_conv").alpha.assign(np.zeros(1, "float32"))
    _bn_with_offsets(wrapped, rng)
    x = rng.random((3, 8, 8, 3)).astype("float32")
    small = _check(wrapped, x, rtol=1e-5)
    names = {layer.name for layer in small.layers}
    if merge is L.Maximum:  # max(x, c) is not affine in x: the branch stays
        assert "s1b1a_conv" in names
        return
    assert not {"s1b1a_conv", "s1b1a_bn", "s1b1b_conv", "s1b1b_bn", "s1b1_add"} & names
    rescale = small.get_layer("s1b1_add_const")  # x ∘ act(β') as x * scale + offset
    assert isinstance(rescale, L.Rescaling)


def test_layer_cut_with_zero_output_leaves_no_trace(rng):
    model = wrap(cifar_resnet(8, input_shape=(8, 8, 3)), structure="layer", layers=["s1b1b_conv"])
    model.get_layer("s1b1b_conv").alpha.assign(np.zeros(1, "float32"))  # fresh BN: β' = 0
    small = _check(model, rng.random((2, 8, 8, 3)).astype("float32"), rtol=1e-5)
    assert not any(name.startswith("s1b1_add") for name in (la.name for la in small.layers))


def test_layer_cut_on_the_only_path_is_an_error():
    model = wrap(cifar_resnet(8, input_shape=(8, 8, 3)), structure="layer", layers=["s2b1p_conv"])
    model = wrap(model, structure="layer", layers=["s2b1b_conv"])
    for name in ("s2b1p_conv", "s2b1b_conv"):  # both paths through stage 2's first block
        model.get_layer(name).alpha.assign(np.zeros(1, "float32"))
    with pytest.raises(ValueError, match="'s2b1b_conv', 's2b1p_conv'.*only path"):
        slim(model)
    model.get_layer("s2b1b_conv").alpha.assign(np.ones(1, "float32"))
    assert slim(model) is not None  # one path left: fine
    chain = wrap(cifar_resnet(8, input_shape=(8, 8, 3)), structure="layer", layers=["stem_conv"])
    chain.get_layer("stem_conv").alpha.assign(np.zeros(1, "float32"))
    with pytest.raises(ValueError, match="'stem_conv'.*only path"):
        slim(chain)


def test_gather_false_keeps_zero_weights_instead(rng):
    model = _prune_randomly(wrap(cifar_resnet(8, input_shape=(8, 8, 3))), rng)
    x = rng.random((3, 8, 8, 3)).astype("float32")
    with_gather, without = slim(model), _check_options(model, x, gather=False)
    takes = [op for op in with_gather.operations if type(op).__name__ == "Take"]
    assert takes and not [op for op in without.operations if type(op).__name__ == "Take"]
    assert count_flops(without) > count_flops(with_gather)


def _check_options(model, x, **options):
    small = slim(model, **options)
    reference = np.asarray(model.predict(x, verbose=0))
    assert verify(model, small, x) <= 1e-4 * np.abs(reference).max()
    return small


@pytest.mark.parametrize("gather", [True, False])
def test_multiple_of_rounds_widths_up_and_stays_exact(gather, rng):
    model = _prune_randomly(wrap(models.densenet(10, growth_rate=6, input_shape=(8, 8, 3))), rng)
    _bn_with_offsets(model, rng)
    x = rng.random((3, 8, 8, 3)).astype("float32")
    exact = slim(model, gather=gather)
    small = _check_options(model, x, gather=gather, multiple_of=4)
    for layer in small.layers:
        if isinstance(layer, L.Conv2D):
            original = model.get_layer(layer.name).layer.filters
            assert layer.filters % 4 == 0 or layer.filters == original, layer.name
            assert layer.filters >= exact.get_layer(layer.name).filters
            source = layer.input._keras_history.operation
            if type(source).__name__ == "Take":  # gathered inputs are rounded too
                assert gather and layer.kernel.shape[-2] % 4 == 0, layer.name
    with pytest.raises(ValueError, match="multiple_of must be a positive integer"):
        slim(model, multiple_of=0)


class _NonTrainableFirst(L.Layer):
    """Creates its non-trainable weight first: `weights` lists it last."""

    def build(self, input_shape):
        self.count = self.add_weight(shape=(2,), initializer="ones", trainable=False)
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="zeros")

    def call(self, x):
        return x * self.scale + keras.ops.sum(self.count)


def test_slim_builds_layers_from_their_values_in_any_weight_order():
    """`slim` creates a new layer's variables from the kept values as it
    builds (no random initializers, no second assignment). For a layer whose
    `weights` order is not its creation order, the mismatch shows, and slim
    sets the weights after the build instead."""
    from keras_psp.surgery.slim import _initial_values

    values = [np.array([5.0, 6.0, 7.0], "float32"), np.array([2.0, 3.0], "float32")]
    plain = L.Dense(3)
    with _initial_values(plain, [np.full((4, 3), 0.5, "float32"), values[0]]) as created:
        plain.build((None, 4))
    assert [id(v) for v in created] == [id(v) for v in plain.weights]
    np.testing.assert_array_equal(to_numpy(plain.kernel), np.full((4, 3), 0.5))
    np.testing.assert_array_equal(to_numpy(plain.bias), values[0])
    assert "add_weight" not in vars(plain)  # the layer is left as Keras made it

    odd = _NonTrainableFirst()
    with _initial_values(odd, [values[1], values[0]]) as created:  # in creation order
        odd.build((None, 3))
    np.testing.assert_array_equal(to_numpy(odd.count), values[1])
    assert all(v is not None for v in created)
    assert [id(v) for v in created] != [id(v) for v in odd.weights]  # slim then sets them


def test_slim_weights_keep_their_keras_names_and_paths(rng):
    """The slim model's variables are named and pathed as the model's own
    (what saving, export and optimizers key on), whatever name TensorFlow's
    handles get while slim builds them, and they train."""
    model = _prune_randomly(wrap(models.cifar_resnet(depth=8, widths=(8, 8, 16), input_shape=(16, 16, 3), num_classes=3)), rng)
    small = slim(model)
    plain = {layer.name: layer for layer in iter_layers(model)}
    for layer in iter_layers(small):
        for variable in layer.weights:
            assert variable.path == f"{layer.name}/{variable.name}"
            own = getattr(plain[layer.name], "layer", plain[layer.name])  # PSP: wrapped layer
            assert variable.name in {v.name for v in own.weights}
    small.compile("sgd", "mse")
    x = rng.normal(size=(4, 16, 16, 3)).astype("float32")
    before = [np.array(to_numpy(v)) for v in small.trainable_weights]
    source = [np.array(to_numpy(v)) for v in model.weights]
    small.fit(x, np.zeros((4, 3), "float32"), epochs=1, verbose=0)
    after = small.trainable_weights
    assert any(not np.array_equal(b, to_numpy(v)) for b, v in zip(before, after, strict=True))
    for was, variable in zip(source, model.weights, strict=True):  # the source is untouched
        np.testing.assert_array_equal(was, to_numpy(variable))
