"""How α maps onto each supported layer's kernel (runs on TF and JAX)."""

import keras
import numpy as np
import pytest
from keras import layers as L

from helpers import LAYER_CASES, built_pair, to_numpy
from keras_psp import PSP, STRUCTURES
from keras_psp.layers import handler_of

CASE_NAMES = sorted(LAYER_CASES)


def _fits(case, structure):
    factory, _ = LAYER_CASES[case]
    return structure in handler_of(factory()).structures


PAIRS = [(c, s) for c in CASE_NAMES for s in STRUCTURES if _fits(c, s)]


def _wrapped(case, structure, rng, **kwargs):
    factory, shape = LAYER_CASES[case]
    plain, twin = built_pair(factory, shape, rng)
    wrapped = PSP(twin, structure=structure, **kwargs)
    wrapped.build((None,) + shape)
    return plain, wrapped, shape


def _owner(layer, structure, kernel_name, kernel_shape):
    """Independent spec: index of the α entry owning each kernel element."""
    idx = np.indices(kernel_shape)
    rank = len(kernel_shape) - 2
    k = tuple(idx[:rank])
    if isinstance(layer, L.Dense):
        i, o = idx
        return {"channel": (i,), "column": (i,), "filter": (o,)}.get(structure, (0 * i,))
    a, b = idx[rank], idx[rank + 1]
    if isinstance(layer, (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)):
        o, c = a, b
    elif isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        c, o = a, a * kernel_shape[-1] + b
    elif isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):
        c, o = (a, None) if kernel_name == "depthwise_kernel" else (None, b)
    else:  # Conv: input channel from group and in-group index
        opg = kernel_shape[-1] // layer.groups
        c, o = (b // opg) * kernel_shape[rank] + a, b
    return {
        "channel": (c,),
        "filter": (o,),
        "column": k + (c,),
        "shape": k,
        "layer": (0 * a,),
    }[structure]


@pytest.mark.parametrize("case,structure", PAIRS)
def test_wrapped_layer_starts_equal_to_plain_layer(case, structure, rng):
    plain, wrapped, shape = _wrapped(case, structure, rng)
    x = rng.normal(size=(2,) + shape).astype("float32")
    np.testing.assert_allclose(to_numpy(wrapped(x)), to_numpy(plain(x)), rtol=0, atol=1e-6)
    assert to_numpy(wrapped.alpha).dtype == np.float32
    np.testing.assert_array_equal(to_numpy(wrapped.alpha), 1.0)
    assert wrapped.mask().all() and wrapped.mask().dtype == bool


@pytest.mark.parametrize("case,structure", PAIRS)
def test_alpha_shape_has_one_entry_per_structure(case, structure, rng):
    plain, wrapped, shape = _wrapped(case, structure, rng)
    layer = wrapped.layer
    c_in = shape[-1]
    c_out = plain.compute_output_shape((None,) + shape)[-1]
    positions = tuple(getattr(layer, "kernel_size", ()))
    expected = {
        "channel": (c_in,),
        "filter": (c_out,),
        "column": positions + (c_in,),
        "shape": positions,
        "layer": (1,),
    }[structure]
    assert tuple(wrapped.alpha.shape) == expected
    assert wrapped.mask().shape == expected


@pytest.mark.parametrize("case,structure", PAIRS)
def test_effective_kernel_scales_each_structure_by_its_alpha(case, structure, rng):
    _, wrapped, _ = _wrapped(case, structure, rng)
    alpha = rng.uniform(0.5, 2.0, size=wrapped.alpha.shape).astype("float32")
    alpha.flat[0] = 0.0  # one cut structure (unless there is only one)
    wrapped.alpha.assign(alpha)
    effective = {n: to_numpy(v) for n, v in wrapped.effective_kernels("float32").items()}
    for name, value in effective.items():
        kernel = to_numpy(getattr(wrapped.layer, name))
        if name != wrapped.plan.kernel:
            np.testing.assert_array_equal(value, kernel)
            continue
        kept = alpha * wrapped.mask()
        if wrapped.relative:  # the default penalty: α relative to the RMS of the kept α
            kept = kept / np.sqrt(np.sum(kept**2) / wrapped.mask().sum())
        scale = kept[_owner(wrapped.layer, structure, name, kernel.shape)]
        np.testing.assert_allclose(value, kernel * scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_cut_channel_no_longer_influences_the_output(case, rng):
    _, wrapped, shape = _wrapped(case, "channel", rng)
    alpha = np.ones(wrapped.alpha.shape, "float32")
    alpha[1] = 0.0
    wrapped.alpha.assign(alpha)
    x = rng.normal(size=(2,) + shape).astype("float32")
    y = to_numpy(wrapped(x))
    for channel, changes in ((1, False), (0, True)):
        x2 = x.copy()
        x2[..., channel] += 5.0
        same = np.allclose(to_numpy(wrapped(x2)), y, atol=1e-5)
        assert same != changes, f"channel {channel}"


@pytest.mark.parametrize("case", CASE_NAMES)
def test_cut_filter_outputs_only_its_bias(case, rng):
    _, wrapped, shape = _wrapped(case, "filter", rng)
    alpha = np.ones(wrapped.alpha.shape, "float32")
    alpha[2] = 0.0
    wrapped.alpha.assign(alpha)
    y = to_numpy(wrapped(rng.normal(size=(2,) + shape).astype("float32")))
    bias = to_numpy(wrapped.layer.bias)[2]
    constant = to_numpy(wrapped.layer.activation(keras.ops.convert_to_tensor([bias])))[0]
    np.testing.assert_allclose(y[..., 2], constant, atol=1e-6)
    assert np.std(y[..., 0]) > 1e-3


@pytest.mark.parametrize("case", CASE_NAMES)
def test_cut_layer_outputs_only_bias(case, rng):
    _, wrapped, shape = _wrapped(case, "layer", rng)
    wrapped.alpha.assign(np.full((1,), 0.5 * wrapped.threshold, "float32"))
    assert not wrapped.mask().any()
    y = to_numpy(wrapped(rng.normal(size=(2,) + shape).astype("float32")))
    assert np.allclose(y, y.reshape(-1, y.shape[-1])[0], atol=1e-6)


def test_dense_has_no_shape_structure():
    with pytest.raises(ValueError, match=r"'shape' does not fit layer 'fc' \(Dense\).*'channel'"):
        PSP(L.Dense(3, name="fc"), structure="shape")


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow",
    reason="TensorFlow's CPU kernels have no channels_first convolution",
)
def test_channels_first_convolution(rng):
    plain, twin = built_pair(
        lambda: L.Conv2D(6, 3, data_format="channels_first"), (4, 7, 7), rng
    )
    for structure in ("channel", "filter"):
        wrapped = PSP(plain.__class__.from_config(plain.get_config()), structure=structure)
        wrapped.build((None, 4, 7, 7))
        wrapped.layer.set_weights(plain.get_weights())
        x = rng.normal(size=(2, 4, 7, 7)).astype("float32")
        np.testing.assert_allclose(to_numpy(wrapped(x)), to_numpy(plain(x)), atol=1e-5)


@pytest.mark.parametrize("case,structure", PAIRS)
def test_reduce_is_the_adjoint_of_expand(case, structure, rng):
    """`plan.reduce` sums kernel entries per structure: Σ V·expand(α) = Σ reduce(V)·α
    for every V and α (what `keras_psp.ranking.scores` relies on for ‖W‖ per structure)."""
    _, wrapped, _ = _wrapped(case, structure, rng)
    plan = wrapped.plan
    kernel_shape = tuple(getattr(wrapped.layer, plan.kernel).shape)
    values = rng.normal(size=kernel_shape)
    alpha = rng.normal(size=plan.shape).astype("float32")
    expanded = np.broadcast_to(to_numpy(plan.expand(alpha)), kernel_shape)
    reduced = plan.reduce(values)
    assert reduced.shape == tuple(plan.shape)
    np.testing.assert_allclose(np.sum(values * expanded), np.sum(reduced * alpha), rtol=1e-5)
    # and with the owner spec: each structure's sum is over exactly its entries
    owner = _owner(wrapped.layer, structure, plan.kernel, kernel_shape)
    for index in list(np.ndindex(*plan.shape))[:3]:
        mine = np.ones(kernel_shape, bool)
        for axis_owner, i in zip(owner, index, strict=True):
            mine &= np.broadcast_to(axis_owner, kernel_shape) == i
        np.testing.assert_allclose(reduced[index], values[mine].sum(), rtol=1e-6, atol=1e-9)
