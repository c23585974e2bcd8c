"""One registry of layer families (`keras_psp.register_layer`), looked up by class
hierarchy, and the README's extension guide, run as written."""

import pathlib
import re
import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

import keras_psp
from helpers import to_numpy
from keras_psp import count_flops, slim, strip, verify, wrap
from keras_psp.layers import registry

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def guide():
    """The README's "Extending keras_psp" code block, executed; the registry is
    restored afterwards."""
    text = README.read_text()
    section = text[text.index("## Extending keras_psp"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    saved = dict(registry._FAMILIES)
    namespace = {}
    exec(compile(code, "README.md (Extending keras_psp)", "exec"), namespace)
    yield namespace
    registry._FAMILIES.clear()
    registry._FAMILIES.update(saved)


@pytest.fixture
def families(monkeypatch):
    """A copy of the registry that a test may change."""
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))


def _no_slim_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "keeps every channel" in m or "0 MACs" in m], messages
    return result


def test_the_readme_guide_wraps_cuts_and_counts_a_users_layers(guide, rng):
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = guide["ChannelScale"](name="s1")(x)
    x = L.ReLU()(x)
    x = guide["Pointwise"](5, name="pw")(x)
    x = guide["ChannelScale"](name="s2")(x)
    outputs = L.Dense(2, name="head")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    for name, width in (("s1", 6), ("s2", 5)):
        model.get_layer(name).scale.assign(rng.uniform(0.5, 2.0, width).astype("float32"))
    assert count_flops(model) == 36 * 9 * 3 * 6 + 36 * 6 * 5 + 5 * 2

    wrapped = _no_slim_warnings(lambda: wrap(model, structure="channel"))
    assert isinstance(wrapped.get_layer("pw"), keras_psp.PSP)  # the user's layer has an α
    x_check = rng.random((4, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(to_numpy(wrapped(x_check)), to_numpy(model(x_check)), atol=1e-6)
    wrapped.get_layer("pw").alpha.assign(np.array([1, 0, 1, 0, 1, 1], "float32"))
    wrapped.get_layer("head").alpha.assign(np.array([1, 1, 0, 1, 0], "float32"))

    small = _no_slim_warnings(lambda: slim(wrapped, check_inputs=x_check))
    assert small.get_layer("c1").filters == 4  # cut through the scale, into the conv
    assert small.get_layer("pw").filters == 3 and small.get_layer("pw").kernel.shape == (4, 3)
    np.testing.assert_array_equal(to_numpy(small.get_layer("s1").scale),
                                  to_numpy(model.get_layer("s1").scale)[[0, 2, 4, 5]])
    np.testing.assert_array_equal(to_numpy(small.get_layer("s2").scale),
                                  to_numpy(model.get_layer("s2").scale)[[0, 1, 3]])
    assert verify(strip(wrapped), small, x_check) < 1e-5
    expected = 36 * 9 * 3 * 4 + 36 * 4 * 3 + 3 * 2
    assert count_flops(small) == expected == count_flops(wrapped, pruned=True)


def test_unregistered_layers_keep_their_channels_and_the_warnings_point_to_the_guide(rng):
    class Unknown(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

        def call(self, x):
            return x * self.w

    inputs = keras.Input((6, 6, 3))
    x = Unknown(name="unknown")(L.Conv2D(6, 3, name="c1")(inputs))
    model = keras.Model(inputs, L.Conv2D(2, 1, name="c2")(x))
    with pytest.warns(UserWarning, match=r"0 MACs.*'unknown'.*register_layer.*Extending"):
        count_flops(model)
    wrapped = wrap(model, layers=["c2"])
    wrapped.get_layer("c2").alpha.assign(np.array([1, 0, 1, 0, 1, 1], "float32"))
    with pytest.warns(UserWarning, match=r"keeps every channel through layer\(s\) 'unknown'"
                                         r"(.|\n)*Extending keras_psp"):
        small = slim(wrapped, check_inputs=rng.random((2, 6, 6, 3)).astype("float32"))
    assert small.get_layer("c1").filters == 6


def test_a_subclass_is_in_its_bases_family_unless_it_has_its_own_call(rng, families):
    class SameConv(L.Conv2D):  # inherits Conv2D's math
        pass

    class DoubledConv(L.Conv2D):  # its own call: other math
        def call(self, x):
            return super().call(x) * 2.0

    assert keras_psp.layers.handler_of(SameConv) is keras_psp.layers.handler_of(L.Conv2D)
    with pytest.raises(TypeError, match=r"subclasses Conv2D but has its own `call`"):
        keras_psp.PSP(DoubledConv(4, 3))

    inputs = keras.Input((6, 6, 3))
    x = SameConv(6, 3, name="same")(inputs)
    x = DoubledConv(5, 1, name="doubled")(x)
    model = keras.Model(inputs, L.Conv2D(2, 1, name="last")(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # both counted: no unknown-layer warning
        assert count_flops(model) == 16 * 9 * 3 * 6 + 16 * 6 * 5 + 16 * 5 * 2
    wrapped = wrap(model, structure="channel")
    assert isinstance(wrapped.get_layer("same"), keras_psp.PSP)
    assert not isinstance(wrapped.get_layer("doubled"), keras_psp.PSP)
    wrapped.get_layer("last").alpha.assign(np.array([1, 0, 1, 1, 0], "float32"))
    x_check = rng.random((2, 6, 6, 3)).astype("float32")
    with pytest.warns(UserWarning, match=r"'doubled' \(unknown type DoubledConv\)"):
        small = slim(wrapped, check_inputs=x_check)
    assert small.get_layer("doubled").filters == 5  # kept whole: its math is unknown
    assert verify(strip(wrapped), small, x_check) < 1e-5

    keras_psp.register_layer(DoubledConv, rule=keras_psp.layers.Fixed())  # now known
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        slim(wrapped, check_inputs=x_check)


def test_every_wrappable_family_can_also_be_cut_and_counted():
    for layer_type in keras_psp.layers.wrappable_types():
        found = keras_psp.layers.family(layer_type)
        assert found.rule is not None, layer_type
        assert found.macs is not None, layer_type


def test_register_layer_refuses_what_is_not_a_class():
    with pytest.raises(TypeError, match="at least one layer class"):
        keras_psp.register_layer(rule=keras_psp.layers.Fixed())
    with pytest.raises(TypeError, match="expected layer classes"):
        keras_psp.register_layer(L.Dense(2), rule=keras_psp.layers.Fixed())


def test_kept_slices_an_axis_and_refuses_a_mask_of_another_length():
    """`kept` is boolean indexing of one axis (through `np.compress`), and
    like boolean indexing it refuses a mask that does not fit the axis
    (`np.compress` alone would read a short mask as False for the rest)."""
    from keras_psp.layers import kept

    kernel = np.arange(2 * 3 * 4 * 5, dtype="float32").reshape(2, 3, 4, 5)
    keep_in = np.array([True, False, True, True])
    keep_out = np.array([False, True, True, False, True])
    np.testing.assert_array_equal(kept(kept(kernel, keep_in, axis=-2), keep_out),
                                  kernel[..., keep_in, :][..., keep_out])
    with pytest.raises(ValueError, match="keep mask of shape"):
        kept(kernel, keep_out[:3])
    with pytest.raises(ValueError, match="keep mask of shape"):
        kept(kernel, keep_in, axis=-1)
