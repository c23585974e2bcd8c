"""`MultiHeadAttention` heads as structures: the wrapper's math, training, slim, cost."""

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_psp
from keras_psp import PSP, count_flops, prune_to, slim, wrap
from keras_psp.cloning import psp_layers
from keras_psp.layers.attention import attention_macs

RNG = np.random.default_rng(0)
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _inputs(*shapes):
    return [RNG.normal(size=(3, *s)).astype("float32") for s in shapes]


def _encoder(heads=4, key_dim=8, width=16, tokens=10, mlp=32, use_bias=True, name="enc"):
    """One pre-norm transformer block of stock layers, as in keras.io's ViT example."""
    inputs = keras.Input((tokens, width))
    x = L.LayerNormalization(name="ln1")(inputs)
    x = L.MultiHeadAttention(heads, key_dim, use_bias=use_bias, name="attention")(x, x)
    x = L.Add()([inputs, x])
    h = L.LayerNormalization(name="ln2")(x)
    h = L.Dense(mlp, activation="gelu", name="mlp_in")(h)
    h = L.Dense(width, name="mlp_out")(h)
    x = L.Add()([x, h])
    outputs = L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs, name=name)


CALLS = {
    # name: (layer factory, argument shapes, call keyword arguments)
    "self": (lambda: L.MultiHeadAttention(4, 8), [(6, 16), (6, 16)], {}),
    "cross_with_key": (lambda: L.MultiHeadAttention(3, 5), [(6, 16), (7, 12), (7, 9)], {}),
    # Keras 3.15's own MultiHeadAttention fails on JAX when value_dim != key_dim
    "value_dim": (lambda: L.MultiHeadAttention(3, 5, value_dim=6), [(6, 16), (7, 12)], {}),
    "causal": (lambda: L.MultiHeadAttention(2, 4, use_bias=False), [(6, 8), (6, 8)],
               {"use_causal_mask": True}),
    "output_shape": (lambda: L.MultiHeadAttention(2, 4, output_shape=(5,)), [(6, 8), (6, 8)], {}),
    "gate": (lambda: L.MultiHeadAttention(2, 4, use_gate=True), [(6, 8), (6, 8)], {}),
}


def _call_pair(case):
    factory, shapes, kwargs = CALLS[case]
    args = _inputs(*shapes)
    plain = factory()
    expected = plain(*args, **kwargs)
    wrapped = PSP(factory(), structure="head")
    wrapped.layer.build_from_config(plain.get_build_config())
    wrapped.layer.set_weights(plain.get_weights())
    return plain, wrapped, args, kwargs, expected


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.tensorflow_only) if c == "value_dim" else c
    for c in sorted(CALLS)])
def test_head_alpha_starts_equal_and_scales_each_head(case):
    plain, wrapped, args, kwargs, expected = _call_pair(case)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(wrapped(*args, **kwargs)),
                               keras.ops.convert_to_numpy(expected), **TOL)
    assert tuple(wrapped.alpha.shape) == (plain.num_heads,)
    # α = (a, 0, ...): the layer's output is the output bias plus `a` times head 0's share
    alpha = np.zeros(plain.num_heads, "float32")
    alpha[0] = 1.0
    wrapped.alpha.assign(alpha)
    one = keras.ops.convert_to_numpy(wrapped(*args, **kwargs))
    kernel = keras.ops.convert_to_numpy(plain._output_dense.kernel).copy()
    kernel[1:] = 0.0
    plain._output_dense.kernel.assign(kernel)
    np.testing.assert_allclose(one, keras.ops.convert_to_numpy(plain(*args, **kwargs)), **TOL)


def test_head_alpha_returns_attention_scores_and_masks():
    layer = L.MultiHeadAttention(2, 4)
    q, v = _inputs((5, 8), (7, 8))
    mask = RNG.random((3, 5, 7)) > 0.3
    out, scores = layer(q, v, attention_mask=mask, return_attention_scores=True)
    wrapped = PSP(L.MultiHeadAttention(2, 4), structure="head")
    wrapped.layer.build_from_config(layer.get_build_config())
    wrapped.layer.set_weights(layer.get_weights())
    out2, scores2 = wrapped(q, v, attention_mask=mask, return_attention_scores=True)
    out3 = wrapped(query=q, value=v, attention_mask=mask)  # by keyword, as keras_hub calls it
    for a, b in ((out, out2), (scores, scores2), (out, out3)):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(b), keras.ops.convert_to_numpy(a),
                                   **TOL)


def test_attention_structures_and_heads_fit_only_attention():
    with pytest.raises(ValueError, match=r"pruned by heads \('head'\) or by dimensions"):
        PSP(L.MultiHeadAttention(2, 4), structure="channel")
    with pytest.raises(ValueError, match="supports 'channel'"):
        PSP(L.Conv2D(4, 3), structure="head")
    with pytest.raises(TypeError, match="takes one input"):
        PSP(L.Dense(3))(np.ones((2, 4), "float32"), np.ones((2, 4), "float32"))


def test_training_moves_head_alpha():
    model = wrap(_encoder(), structure="head")
    (alpha,) = [layer.alpha for layer in psp_layers(model)]
    before = keras.ops.convert_to_numpy(alpha).copy()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x = _inputs((10, 16))[0]
    model.fit(x, RNG.normal(size=(3, 3)).astype("float32"), epochs=2, verbose=0)
    after = keras.ops.convert_to_numpy(alpha)
    assert np.all(np.isfinite(after)) and np.abs(after - before).max() > 1e-4


@pytest.mark.tensorflow_only
def test_cut_heads_leave_the_slim_model_exactly(tmp_path):
    model = _encoder(heads=4)
    wrapped = wrap(wrap(model, structure="head"), structure="channel",
                   layers=["mlp_out"])  # MLP neurons: the input features of the second Dense
    x = _inputs((10, 16))[0]
    np.testing.assert_allclose(wrapped.predict(x, verbose=0), model.predict(x, verbose=0), **TOL)
    attention, mlp = psp_layers(wrapped)
    attention.alpha.assign(np.array([0.0, 1.3, 0.0, 0.7], "float32"))
    alpha = np.ones(32, "float32")
    alpha[::3] = 0.0
    mlp.alpha.assign(alpha)
    small = slim(wrapped, check_inputs=x)
    np.testing.assert_allclose(small.predict(x, verbose=0), wrapped.predict(x, verbose=0), **TOL)
    layer = small.get_layer("attention")
    assert layer.num_heads == 2
    assert tuple(layer._query_dense.kernel.shape) == (16, 2, 8)
    assert tuple(layer._output_dense.kernel.shape) == (2, 8, 16)
    assert small.get_layer("mlp_in").units == 21
    assert not psp_layers(small)
    # FLOPs: the slim model counts 2 of 4 heads, and the plan counted the same before slim
    full = count_flops(model)
    assert count_flops(small) < full
    assert keras_psp.summary(wrapped, print_fn=lambda *_: None)[-1]["flops_after"] == count_flops(small)
    path = tmp_path / "slim.keras"
    small.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), small.predict(x, verbose=0), **TOL)


@pytest.mark.tensorflow_only
def test_heads_stay_when_the_call_returns_scores_and_one_head_always_stays():
    inputs = keras.Input((6, 8))
    out, scores = L.MultiHeadAttention(3, 4, name="attention")(inputs, inputs,
                                                               return_attention_scores=True)
    model = keras.Model(inputs, [out, scores])
    wrapped = wrap(model, structure="head")
    (layer,) = psp_layers(wrapped)
    layer.alpha.assign(np.array([1.0, 0.0, 0.0], "float32"))
    x = _inputs((6, 8))[0]
    kept = slim(wrapped, check_inputs=x)
    assert kept.get_layer("attention").num_heads == 3  # the scores' shape names every head
    # every head cut: one stays (its output slice zero), so the layer stays valid
    model = _encoder(heads=2)
    wrapped = wrap(model, structure="head")
    psp_layers(wrapped)[0].alpha.assign(np.zeros(2, "float32"))
    small = slim(wrapped, check_inputs=_inputs((10, 16))[0])
    assert small.get_layer("attention").num_heads == 1


@pytest.mark.tensorflow_only
def test_prune_to_cuts_heads_and_neurons_to_a_flops_target():
    model = _encoder(heads=8, key_dim=8, width=32, mlp=128)
    wrapped = wrap(wrap(model, structure="head"), structure="channel", layers=["mlp_out"])
    for layer in psp_layers(wrapped):  # distinct α, as training leaves them
        layer.alpha.assign(RNG.uniform(0.2, 1.5, layer.alpha.shape).astype("float32"))
    prune_to(wrapped, flops=0.6)
    x = _inputs((10, 32))[0]
    small = slim(wrapped, check_inputs=x)
    assert abs(count_flops(small) / count_flops(model) - 0.6) <= 0.02
    assert small.get_layer("attention").num_heads < 8
    assert small.get_layer("mlp_in").units < 128


def test_attention_macs_follow_the_heads():
    layer = L.MultiHeadAttention(4, 8, value_dim=6)
    layer.build((None, 10, 16), (None, 7, 12))
    shapes = {"query": (None, 10, 16), "value": (None, 7, 12)}
    # projections q, k, v; scores and weighted sum; output projection
    by_hand = (10 * 16 * 4 * 8 + 7 * 12 * 4 * 8 + 7 * 12 * 4 * 6
               + 4 * 10 * 7 * (8 + 6) + 10 * 4 * 6 * 16)
    assert attention_macs(layer, shapes, (None, 10, 16)) == by_hand


# the slim layer's value_dim differs from its key_dim, which Keras 3.15's own
# MultiHeadAttention cannot run on JAX (see "value_dim" above)
@pytest.mark.tensorflow_only
@pytest.mark.parametrize("case", ["self", "cross_with_key", "causal", "gate"])
@pytest.mark.parametrize("structure", ["value", "key"])
def test_value_and_key_dimensions_leave_the_slim_layer_exactly(structure, case):
    factory, shapes, kwargs = CALLS[case]
    args = _inputs(*shapes)
    inputs = [keras.Input(shape) for shape in shapes]
    model = keras.Model(inputs, factory()(*inputs, **kwargs))
    wrapped = wrap(model, structure=structure)
    (layer,) = psp_layers(wrapped)
    np.testing.assert_allclose(wrapped.predict(args, verbose=0), model.predict(args, verbose=0),
                               **TOL)
    alpha = RNG.uniform(0.5, 1.5, size=layer.alpha.shape).astype("float32")
    alpha[1::2] = 0.0
    layer.alpha.assign(alpha)
    small = slim(wrapped, check_inputs=args)  # raises if it differs
    np.testing.assert_allclose(small.predict(args, verbose=0), wrapped.predict(args, verbose=0),
                               **TOL)
    (attention,) = [m for m in small.layers if isinstance(m, L.MultiHeadAttention)]
    original = model.layers[-1]
    kept = int(np.sum(alpha > 0))
    if structure == "value":
        assert (attention.key_dim, attention.value_dim) == (original.key_dim, kept)
    else:
        assert (attention.key_dim, attention.value_dim) == (kept, original.value_dim or
                                                            original.key_dim)
    assert attention.num_heads == original.num_heads
    assert count_flops(small) == count_flops(wrapped, pruned=True) < count_flops(model)
