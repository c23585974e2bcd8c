"""Models as people have them: keras_hub backbones, siamese encoders, shared
layers, adapted preprocessing, custom layers with quirks, text inputs.

Every case is wrapped, has α cut, and is slimmed with `check_inputs`: the
slim model must compute what the pruned one computes, or keras_psp must
refuse with an error that names the layer.
"""

import threading
import warnings

import hub_models
import keras
import numpy as np
import pytest
from keras import layers as L

import keras_psp
from helpers import cut_exactly, to_numpy
from keras_psp import count_flops, slim, strip, verify, wrap
from keras_psp.cloning import psp_layers
from keras_psp.copying import LayerCopyError


def _cut_at_random(model, fraction=0.4, seed=0):
    """Zeroes about `fraction` of every PSP layer's α (one structure stays)."""
    rng = np.random.default_rng(seed)
    for layer in psp_layers(model):
        alpha = np.ones(layer.alpha.shape, "float32")
        alpha[rng.random(alpha.shape) < fraction] = 0.0
        alpha.flat[rng.integers(alpha.size)] = 1.0
        layer.alpha.assign(alpha)


def _relative(a, b, x):
    scale = max(np.abs(np.concatenate(
        [np.ravel(y) for y in keras.tree.flatten(a.predict(x, verbose=0))])).max(), 1e-12)
    return verify(a, b, x) / scale


# -- keras_hub backbones ------------------------------------------------------------


#: Backbones of fixed input size whose convolutions and dense layers are stock Keras
#: layers or sit in composite layers that `wrap` opens: cutting 40 % of their α must
#: remove FLOPs. The others (token inputs, decoder blocks that stay whole: a warning
#: names them) must still come back exact.
PRUNABLE = {"resnet_basic", "resnet_bottleneck", "resnet_v2", "resnet_v2_bottleneck",
            "resnet_vd", "efficientnet", "efficientnet_v1", "mobilenet", "densenet", "vgg",
            "xception", "cspnet", "cspnet_cs3", "vit_wide", "deit_wide"}


@pytest.mark.parametrize("name", sorted(hub_models.FACTORIES))
def test_keras_hub_backbone_wrap_cut_slim_is_exact(name):
    model, x = hub_models.FACTORIES[name]()
    reference = to_numpy(keras.tree.flatten(model(x))[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown composite layers, broken configs
        wrapped = wrap(model)
        _cut_at_random(wrapped)
        small = slim(wrapped, check_inputs=x)  # raises if it differs
    assert _relative(wrapped, small, x) <= 1e-4
    assert small.count_params() <= model.count_params()
    assert not any(isinstance(layer, keras_psp.PSP) for layer in small._flatten_layers())
    np.testing.assert_array_equal(to_numpy(keras.tree.flatten(model(x))[0]), reference)  # untouched
    if name in PRUNABLE:
        assert psp_layers(wrapped)
        assert count_flops(small) <= 0.85 * count_flops(model)


#: Transformers and CNNs whose FLOPs sit inside keras_hub composite layers: opened by
#: `wrap`, or (Gemma's decoder blocks) pruned whole by their own family.
INSIDE = ["bert", "vit_wide", "deit_wide", "gemma_gqa", "efficientnet", "mobilenet"]
STRUCTURES = {"MultiHeadAttention": "head", "GemmaDecoderBlock": "block", "Layer": "channel"}


@pytest.mark.parametrize("name", INSIDE)
def test_keras_hub_composites_are_counted_and_pruned_inside(name):
    model, x = getattr(hub_models, name)()
    shape = {k: v.shape[1:] for k, v in x.items()} if isinstance(x, dict) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # keras_hub layers with broken configs
        before = count_flops(model, input_shape=shape)
        flat, kept = keras_psp.inlining.inline_composites(model)
        wrapped = wrap(model, structure=STRUCTURES)
    assert kept == []
    assert keras_psp.flops.invisible_share(model) == 0.0  # every weight's cost is seen
    assert count_flops(flat, input_shape=shape) == before  # traced inside = counted flat
    assert psp_layers(wrapped)
    cut_exactly(wrapped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = slim(wrapped, check_inputs=x)  # raises if it differs
    assert _relative(wrapped, small, x) <= 1e-4
    after = count_flops(small, input_shape=shape)
    assert after == count_flops(wrapped, pruned=True, input_shape=shape)
    assert after <= 0.7 * before, (after, before)


def test_bert_flops_equal_the_hand_count_at_a_given_sequence_length():
    """2 layers, 16 tokens, hidden 32, MLP 64: per layer the Q, K, V and output
    projections, the two attention matmuls and the MLP; then the pooler on
    the first token. Embedding lookups cost nothing."""
    model, x = hub_models.bert()
    length, hidden, mlp = 16, 32, 64
    layer = 4 * length * hidden * hidden + 2 * length * length * hidden + 2 * length * hidden * mlp
    shape = {name: (length,) for name in x}
    assert count_flops(model, input_shape=shape) == 2 * layer + hidden * hidden
    assert count_flops(model, input_shape={name: (8,) for name in x}) < 2 * layer
    with pytest.raises(ValueError, match=r"input_shape=\.\.\."):
        count_flops(model)  # token sequences of any length: say which
    with pytest.raises(ValueError, match="not inputs of model"):
        count_flops(model, input_shape={"tokens": (16,)})
    with pytest.raises(ValueError, match="leaves a size"):
        count_flops(model, input_shape={name: (None,) for name in x})
    with pytest.raises(ValueError, match="does not fit"):
        count_flops(model, input_shape={name: (16, 2) for name in x})


def test_keras_hub_broken_config_is_copied_and_named():
    """ViT's patch embedding cannot be re-created from its own config (a keras_hub
    bug): wrap copies it anyway, and says whose bug it is and what it means."""
    model, x = hub_models.vit()
    with pytest.warns(UserWarning, match=r"(?s)ViTPatchingAndEmbedding.*cannot be re-created from "
                      r"its own config.*will not load.*bug\s+in keras_hub"):
        keras_psp.copying._WARNED.discard(type(model.get_layer("vit_patching_and_embedding")))
        wrapped = wrap(model)
    assert verify(model, wrapped, x) == 0.0


# -- graphs from the wild -----------------------------------------------------------


def _siamese():
    inner = keras.Input((8,))
    encoder = keras.Model(inner, L.Dense(6, activation="relu", name="enc_dense")(inner),
                          name="encoder")
    a, b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    merged = L.Concatenate()([encoder(a), encoder(b)])
    return keras.Model([a, b], L.Dense(3, name="head")(merged))


def test_nested_model_called_twice_is_two_sets_of_ops(rng):
    model = _siamese()
    x = [rng.normal(size=(16, 8)).astype("float32") for _ in range(2)]
    assert count_flops(model) == 2 * 8 * 6 + 12 * 3  # both calls of the encoder count
    wrapped = wrap(model)
    small = slim(wrapped, check_inputs=x)
    assert verify(model, small, x) < 1e-6
    for moved in ([x[0] + 1.0, x[1]], [x[0], x[1] + 1.0]):  # it reads input a, and b
        assert verify(model, small, moved) < 1e-6
        assert np.abs(small.predict(moved, verbose=0) - small.predict(x, verbose=0)).max() > 1e-3
    logs = {}
    monitor = keras_psp.SeparationMonitor(verbose=0)
    monitor.set_model(wrapped)
    monitor.on_train_begin()
    monitor.on_epoch_end(0, logs)
    assert logs["psp_flops"] == 1.0  # nothing cut yet
    wrapped.get_layer("encoder").get_layer("enc_dense").alpha.assign(np.array([1, 0, 1, 1, 0, 1, 1, 1], "float32"))
    head = np.ones(12, "float32")
    head[[7, 8]] = 0  # units 1, 2 of the second call: the first call still reads them ...
    wrapped.get_layer("head").alpha.assign(head)
    assert slim(wrapped).get_layer("enc_dense").kernel.shape == (6, 6)  # ... so they stay
    head[[1, 2]] = 0  # unread by both calls: they leave the shared layer
    wrapped.get_layer("head").alpha.assign(head)
    small = slim(wrapped, check_inputs=x)
    dense = [layer for layer in small.layers if layer.name == "enc_dense"]
    assert len(dense) == 1 and len(dense[0]._inbound_nodes) == 2  # shared, as in the model
    assert dense[0].kernel.shape == (6, 4)  # inputs and the two unread units cut in both calls
    assert count_flops(small) == 2 * 6 * 4 + 8 * 3


@pytest.mark.parametrize("kind", ["dense_twice", "conv_on_two_inputs"])
def test_shared_layer_is_rebuilt_once_and_shared(kind, rng, tmp_path):
    if kind == "dense_twice":
        inputs = keras.Input((6,))
        tied = L.Dense(6, activation="tanh", name="tied")
        model = keras.Model(inputs, L.Dense(2, name="head")(tied(tied(inputs))))
        x = rng.normal(size=(8, 6)).astype("float32")
    else:
        a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
        tied = L.Conv2D(5, 3, padding="same", name="tied")
        pooled = L.GlobalAveragePooling2D()(L.Add()([tied(a), tied(b)]))
        model = keras.Model([a, b], L.Dense(2, name="head")(pooled))
        x = [rng.random((4, 8, 8, 3)).astype("float32") for _ in range(2)]
    wrapped = wrap(model, structure="filter")
    wrapped.get_layer("tied").alpha.assign(np.array([1, 0, 1, 1, 0, 1][: 6 if kind ==
                                                     "dense_twice" else 5], "float32"))
    small = slim(wrapped, check_inputs=x)
    assert verify(wrapped, small, x) < 1e-5
    shared = small.get_layer("tied")
    assert len(shared._inbound_nodes) == 2
    assert small.count_params() < strip(wrapped).count_params() or kind == "dense_twice"
    path = str(tmp_path / "shared.keras")
    small.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path).predict(x, verbose=0),
                               small.predict(x, verbose=0), atol=1e-6)


@pytest.mark.tensorflow_only  # string and lookup tensors
def test_adapted_preprocessing_state_is_copied(rng, tmp_path):
    """Normalization, Discretization and IntegerLookup adapted on data (as keras.io's
    examples start): wrap, strip and slim compute with the adapted state, and the slim
    model saved and loaded still does."""
    numbers = keras.Input((5,), name="numbers")
    codes = keras.Input((3,), dtype="int64", name="codes")
    norm, bins, lookup = L.Normalization(), L.Discretization(num_bins=4), L.IntegerLookup()
    train = rng.normal(3.0, 2.0, size=(200, 5)).astype("float32")
    norm.adapt(train)
    bins.adapt(train[:, :1])
    lookup.adapt(rng.integers(100, 110, size=(200, 3)))
    embedded = L.Flatten()(L.Embedding(16, 2)(lookup(codes)))
    binned = L.Flatten()(L.Embedding(4, 2)(bins(L.Lambda(lambda t: t[:, :1])(numbers))))
    hidden = L.Dense(8, activation="relu", name="hidden")(L.Concatenate()(
        [norm(numbers), embedded, binned]))
    model = keras.Model([numbers, codes], L.Dense(2, name="head")(hidden))
    x = [rng.normal(3.0, 2.0, size=(32, 5)).astype("float32"),
         rng.integers(100, 112, size=(32, 3)).astype("int64")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Lambda is a channel barrier
        wrapped = wrap(model)
        assert verify(model, wrapped, x) < 1e-6
        assert verify(model, strip(wrapped), x) < 1e-6
        wrapped.get_layer("head").alpha.assign(np.array([1, 0, 1, 1, 0, 1, 1, 1], "float32"))
        small = slim(wrapped, check_inputs=x)
    assert small.get_layer("hidden").units == 6
    assert _relative(strip(wrapped), small, x) < 1e-5
    path = str(tmp_path / "slim.keras")
    small.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = keras.saving.load_model(path, safe_mode=False)
    assert _relative(small, loaded, x) < 1e-6
    # the adapted statistics, not mean 0 / variance 1
    assert np.abs(to_numpy(small.get_layer(norm.name).mean)).max() > 1.0


def test_variable_length_token_inputs(rng):
    inputs = keras.Input((None,), dtype="int32")
    hidden = L.Dense(6, activation="relu", name="hidden")(L.Embedding(50, 8)(inputs))
    model = keras.Model(inputs, L.Dense(4, name="out")(hidden))
    wrapped = wrap(model)
    wrapped.get_layer("out").alpha.assign(np.array([1, 0, 1, 0, 1, 1], "float32"))
    x = rng.integers(0, 50, size=(3, 7)).astype("int32")
    small = slim(wrapped, check_inputs=x)
    assert small.get_layer("hidden").units == 4
    longer = rng.integers(0, 50, size=(2, 11)).astype("int32")  # any length
    assert verify(wrapped, small, longer) < 1e-5


@keras.saving.register_keras_serializable("tests_wild")
class _Renaming(L.Layer):
    """Appends "_0" to its name, as keras_hub's DepthwiseConvBlock does."""

    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self._name = self.name + "_0"
        self.units, self.dense = units, L.Dense(units)

    def call(self, x):
        return self.dense(x)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class _NoConfig(L.Layer):
    """`get_config` misses the required `units`: its config cannot re-create it."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units, self.dense = units, L.Dense(units)

    def call(self, x):
        return self.dense(x)

    def get_config(self):
        config = super().get_config()  # Keras would record `units` by itself
        config.pop("units", None)
        return config


def test_custom_layers_that_rename_themselves_or_have_broken_configs(rng):
    x = rng.normal(size=(4, 4)).astype("float32")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, L.Dense(2, name="head")(_Renaming(name="block")(inputs)))
    wrapped = wrap(model)
    assert verify(model, wrapped, x) == 0.0  # weights copied by object, not by name
    inputs = keras.Input((4,))
    model = keras.Model(inputs, L.Dense(2, name="head")(_NoConfig(3, name="broken")(inputs)))
    with pytest.warns(UserWarning, match=r"'broken'.*cannot be re-created from its own config"):
        wrapped = wrap(model, composites="keep")  # whole: the copy is a deep copy
    assert verify(model, wrapped, x) == 0.0
    with pytest.warns(UserWarning, match=r"'broken' \(unknown type _NoConfig\)"):
        small = slim(wrapped, check_inputs=x)
    assert verify(model, small, x) < 1e-6
    wrapped.layers[1].dense.kernel.assign(np.zeros((4, 3), "float32"))  # the copy is its own
    assert np.abs(to_numpy(model.layers[1].dense.kernel)).max() > 0


def test_a_layer_that_cannot_be_copied_at_all_is_named(rng):
    inputs = keras.Input((4,))
    layer = _NoConfig(3, name="locked")
    layer.lock = threading.Lock()  # neither its config nor a deep copy can re-create it
    model = keras.Model(inputs, L.Dense(2)(layer(inputs)))
    with pytest.raises(LayerCopyError, match=r"Cannot copy layer 'locked'.*get_config"):
        wrap(model)


def test_channels_first_is_warned_and_kept_exact(rng):
    inputs = keras.Input((4, 8, 8))
    x = L.Conv2D(6, 3, data_format="channels_first", name="cf1")(inputs)
    model = keras.Model(inputs, L.Conv2D(5, 1, data_format="channels_first", name="cf2")(x))
    with pytest.warns(UserWarning, match=r"cf1, cf2\) use data_format='channels_first'"):
        wrapped = wrap(model)
    wrapped.get_layer("cf2").alpha.assign(np.array([1, 0, 1, 0, 1, 0], "float32"))
    data = rng.random((2, 4, 8, 8)).astype("float32")
    if keras.backend.backend() == "tensorflow":
        data = None  # TF's CPU kernels have no channels_first convolution: no check
    with pytest.warns(UserWarning, match=r"'cf1' \(data_format='channels_first'\)"):
        small = slim(wrapped, check_inputs=data)
    assert small.count_params() == strip(wrapped).count_params()  # nothing removed, said so


# -- non-finite values and bad arguments ---------------------------------------------


def _dense_with(value, where="bias"):
    inputs = keras.Input((4,))
    dense = L.Dense(3, name="bad")
    model = keras.Model(inputs, dense(inputs))
    kernel, bias = dense.get_weights()
    (bias if where == "bias" else kernel).flat[0] = value
    dense.set_weights([kernel, bias])
    return model


@pytest.mark.parametrize("value", [np.inf, np.nan], ids=["inf", "nan"])
def test_non_finite_outputs_are_refused(value, rng):
    model = _dense_with(value, "bias" if value == np.inf else "kernel")
    x = rng.normal(size=(4, 4)).astype("float32")
    with pytest.raises(ValueError, match=r"produces non-finite values.*'bad'"):
        slim(wrap(model), check_inputs=x)
    with pytest.raises(ValueError, match="non-finite"):
        verify(model, model, x)


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("value", [np.inf, np.nan], ids=["inf", "nan"])
def test_export_refuses_non_finite_outputs(value, rng, tmp_path):
    from keras_psp.export import VerificationError

    model = _dense_with(value, "bias" if value == np.inf else "kernel")
    x = rng.normal(size=(4, 4)).astype("float32")
    path = tmp_path / "model"
    with pytest.raises(VerificationError, match=r"produces non-finite values") as caught:
        keras_psp.export(model, path, check_inputs=x)
    assert "nan" not in str(caught.value).replace("NaN", "") and not path.exists()


def test_slim_validates_its_arguments_up_front(rng):
    wrapped = wrap(keras.Sequential([keras.Input((4,)), L.Dense(3), L.Dense(2)]))
    x = rng.normal(size=(4, 4)).astype("float32")
    with pytest.raises(ValueError, match="no examples"):
        slim(wrapped, check_inputs=np.zeros((0, 4), "float32"))
    with pytest.raises(ValueError, match="`atol` must be a finite number >= 0"):
        slim(wrapped, check_inputs=x, atol=-1)
    with pytest.raises(ValueError, match="`atol`"):
        slim(wrapped, check_inputs=x, atol=float("nan"))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="contains 1 NaN or inf"):
        slim(wrapped, check_inputs=bad)


def test_monitor_on_a_sequential_without_input(rng):
    model = keras.Sequential([keras_psp.PSP(L.Dense(3)), keras_psp.PSP(L.Dense(2))])
    model.compile("sgd", "mse")
    x, y = rng.normal(size=(8, 4)).astype("float32"), np.zeros((8, 2), "float32")
    """fit builds such a model on its first batch: the callbacks start then."""
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[keras_psp.SeparationMonitor(
        verbose=0, every_n_steps=1), keras_psp.FlopsBudget(target=0.9, verbose=0)])
    assert len(history.history["psp_cut"]) == 2 and history.history["psp_flops"][-1] <= 0.9


@pytest.mark.tensorflow_only
def test_litert_export_of_dynamic_spatial_sizes(rng, tmp_path):
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(L.Conv2D(4, 3)(inputs)))
    with pytest.raises(ValueError, match=r"unknown size.*Pass check_inputs"):
        keras_psp.export(model, tmp_path / "a.tflite", format="tflite")
    x = rng.random((2, 9, 9, 3)).astype("float32")
    report = keras_psp.export(model, tmp_path / "a.tflite", format="tflite", check_inputs=x)
    assert report.checked == 2 and report.max_diff < 1e-5


def test_keras_hub_vit_flops_are_counted_inside_its_composite_layers():
    """ViT-tiny (17 tokens of width 16, 2 heads, MLP 32, 2 layers): the patch
    convolution, and in each encoder block (keras_hub composites) the attention's
    projections and matmuls and the MLP, counted by hand."""
    model, _ = hub_models.vit()
    patches = 16 * (8 * 8 * 3) * 16
    attention = 3 * 17 * 16 * 16 + 2 * 17 * 17 * (8 + 8) + 17 * 16 * 16
    mlp = 2 * 17 * 16 * 32
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing unseen: its class token is free
        assert count_flops(model) == patches + 2 * (attention + mlp)
    assert keras_psp.flops.invisible_share(model) == 0.0


def test_bert_trains_to_a_flops_budget_counted_at_a_given_length():
    backbone, x = hub_models.bert()
    model = keras.Model(backbone.input, backbone.output["pooled_output"])
    shape = {name: (hub_models.BERT_SEQ_LEN,) for name in x}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = wrap(model, structure={"MultiHeadAttention": "head", "Dense": "channel"})
    rng = np.random.default_rng(0)
    inputs = {k: np.concatenate([v] * 16) for k, v in x.items()}
    y = rng.normal(size=(32, 32)).astype("float32")
    wrapped.compile(keras.optimizers.SGD(0.01, momentum=0.9), "mse")
    budget = keras_psp.FlopsBudget(0.6, end=0.5, verbose=0, input_shape=shape)
    monitor = keras_psp.SeparationMonitor(verbose=0, input_shape=shape)
    history = wrapped.fit(inputs, y, batch_size=8, epochs=2, verbose=0,
                          callbacks=[monitor, budget])
    assert history.history["psp_flops"][-1] <= 0.6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = slim(wrapped, check_inputs=x)
    ratio = count_flops(small, input_shape=shape) / count_flops(model, input_shape=shape)
    assert 0.5 <= ratio <= 0.6
    assert abs(monitor.history[-1]["psp_flops"] - ratio) < 1e-9
    rows = keras_psp.summary(wrapped, print_fn=lambda text: None, slim_model=small,
                             input_shape=shape)
    assert rows[-1]["flops_after"] / rows[-1]["flops_before"] == pytest.approx(ratio)
    cut = keras_psp.prune_to(wrapped, flops=0.4, input_shape=shape)
    assert cut.reached <= 0.4
    with pytest.raises(ValueError, match=r"input_shape=\.\.\."):
        keras_psp.prune_to(wrapped, flops=0.3)  # without the length: say so
