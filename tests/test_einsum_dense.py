"""`EinsumDense` as a dense layer on the last axis (a transformer's MLP, as
keras_hub writes it): wrapped, cut and slimmed like `Dense`; other equations
keep their channels and are refused by `PSP` with the reason."""

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_psp
from helpers import to_numpy
from keras_psp import count_flops, slim, verify, wrap
from keras_psp.cloning import psp_layers


def _gated_mlp():
    inputs = keras.Input((6, 8))
    up = L.EinsumDense("btd,df->btf", output_shape=(None, 32), bias_axes="f",
                       activation="gelu", name="up")(inputs)
    gate = L.EinsumDense("btd,df->btf", output_shape=(None, 32), name="gate")(inputs)
    down = L.EinsumDense("...f,fd->...d", output_shape=8, name="down")(up * gate)
    heads = L.EinsumDense("btd,dnh->btnh", output_shape=(None, 2, 4), name="heads")(inputs)
    return keras.Model(inputs, [down + inputs, heads])


def test_a_gated_mlp_of_einsum_dense_loses_its_cut_neurons_exactly(rng, tmp_path):
    model = _gated_mlp()
    x = rng.normal(size=(3, 6, 8)).astype("float32")
    wrapped = wrap(model)
    assert sorted(layer.name for layer in psp_layers(wrapped)) == ["down", "gate", "up"]
    assert verify(model, wrapped, x) < 1e-6
    down = wrapped.get_layer("down")
    alpha = np.ones(32, "float32")
    alpha[::3] = 0.0  # 11 neurons
    down.alpha.assign(alpha)
    small = slim(wrapped, check_inputs=x)  # raises if it differs
    assert small.get_layer("up").partial_output_shape[-1] == 21
    assert small.get_layer("gate").kernel.shape == (8, 21)
    assert small.get_layer("heads").kernel.shape == (8, 2, 4)  # not dense-form: whole
    assert count_flops(small) == count_flops(wrapped, pruned=True) < count_flops(model)
    small.save(tmp_path / "small.keras")
    loaded = keras.saving.load_model(tmp_path / "small.keras")
    for a, b in zip(keras.tree.flatten(loaded(x)), keras.tree.flatten(small(x)), strict=True):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6, atol=1e-6)


def test_einsum_dense_macs_count_the_open_sizes_at_the_real_shape():
    model = _gated_mlp()
    # up, gate: 6 tokens × 8 × 32 each; down: 6 × 32 × 8; heads: 6 × 8 × 2 × 4
    assert count_flops(model) == 2 * 6 * 8 * 32 + 6 * 32 * 8 + 6 * 8 * 8


def test_other_equations_are_refused_with_the_reason():
    layer = L.EinsumDense("btd,dnh->btnh", output_shape=(None, 2, 4), name="heads")
    layer.build((None, 6, 8))
    with pytest.raises(TypeError, match=r"'heads'.*not a dense layer on the last axis"):
        keras_psp.PSP(layer)
