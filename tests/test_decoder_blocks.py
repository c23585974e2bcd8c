"""keras_hub's Gemma decoder block, pruned whole (`keras_psp.layers.hub_gemma`):
α per query head and MLP neuron inside the block's own call, and a slim block
rebuilt from its config with whole key/value groups or even groups."""

import warnings

import hub_models
import keras
import numpy as np
import pytest

from helpers import to_numpy
from keras_psp import PSP, count_flops, slim, verify, wrap
from keras_psp.cloning import psp_layers


def _wrapped(structure="block"):
    model, x = hub_models.gemma_gqa()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # keras_hub layers with broken configs
        wrapped = wrap(model, structure={"GemmaDecoderBlock": structure})
    return model, wrapped, x


def test_gemma_blocks_wrap_exactly_train_and_round_trip(tmp_path):
    model, wrapped, x = _wrapped()
    blocks = psp_layers(wrapped)
    assert [layer.alpha.shape for layer in blocks] == [(4 + 128,)] * 2  # heads, then neurons
    assert verify(model, wrapped, x) == 0.0
    query = blocks[0].layer.attention.query_dense.kernel
    before = [to_numpy(v).copy() for v in (blocks[0].alpha, query)]
    y = np.random.default_rng(1).normal(size=(2, 8, 32)).astype("float32")
    wrapped.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
    wrapped.fit(x, y, epochs=2, batch_size=2, verbose=0)
    after = [to_numpy(v) for v in (blocks[0].alpha, query)]
    assert all(np.abs(a - b).max() > 1e-6 for a, b in zip(before, after, strict=True))  # α, weights train
    wrapped.save(tmp_path / "wrapped.keras")
    loaded = keras.saving.load_model(tmp_path / "wrapped.keras")
    assert isinstance(loaded.get_layer("decoder_block_0"), PSP)
    assert verify(wrapped, loaded, x) == 0.0


def test_gemma_heads_leave_in_whole_groups_or_evenly_and_slim_is_exact(tmp_path):
    model, wrapped, x = _wrapped()
    first, second = psp_layers(wrapped)
    alpha = np.ones(132, "float32")
    alpha[[0, 1]] = 0.0  # both query heads of key/value head 0
    alpha[4:4 + 48] = 0.0  # 48 of 128 neurons
    first.alpha.assign(alpha)
    alpha = np.ones(132, "float32")
    alpha[2] = 0.0  # one query head of key/value head 1: a zero head fills it up again
    second.alpha.assign(alpha)
    small = slim(wrapped, check_inputs=x)  # raises if it differs
    assert verify(wrapped, small, x) < 1e-5
    blocks = [small.get_layer(f"decoder_block_{i}") for i in range(2)]
    assert [(b.num_query_heads, b.num_key_value_heads, b.intermediate_dim) for b in blocks] == [
        (2, 1, 160), (4, 2, 256)]
    shape = {name: (8,) for name in x}
    assert count_flops(small, input_shape=shape) == count_flops(
        wrapped, pruned=True, input_shape=shape) < count_flops(model, input_shape=shape)
    small.save(tmp_path / "small.keras")
    loaded = keras.saving.load_model(tmp_path / "small.keras")
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(small(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("structure,size", [("head", 4), ("channel", 128)])
def test_gemma_heads_or_neurons_alone(structure, size):
    model, wrapped, x = _wrapped(structure)
    assert [layer.alpha.shape for layer in psp_layers(wrapped)] == [(size,)] * 2
    layer = psp_layers(wrapped)[0]
    alpha = np.ones(size, "float32")
    alpha[: size // 2] = 0.0
    layer.alpha.assign(alpha)
    small = slim(wrapped, check_inputs=x)
    block = small.get_layer("decoder_block_0")
    expected = (2, 1, 256) if structure == "head" else (4, 2, 128)
    assert (block.num_query_heads, block.num_key_value_heads, block.intermediate_dim) == expected


def test_gemma_block_refuses_kernel_structures():
    model, _ = hub_models.gemma_gqa()
    with pytest.raises(ValueError, match=r"pruned by query heads \('head'\)"):
        PSP(model.get_layer("decoder_block_0"), structure="filter")
