"""The PSP wrapper: threshold rule, regularizer, dtypes, config, errors."""

import keras
import numpy as np
import pytest
from keras import layers as L

from helpers import small_cnn, to_numpy
from keras_psp import PSP, keep_mask, wrap


def _mask(alpha, structure="channel", threshold=1e-2):
    return to_numpy(keep_mask(np.asarray(alpha, "float32"), threshold, structure))


# -- the threshold rule -------------------------------------------------------


def test_threshold_is_relative_to_the_largest_alpha():
    alpha = np.array([1.0, 0.5, 0.009, 0.011, 0.0, -0.8])
    np.testing.assert_array_equal(_mask(alpha), [1, 1, 0, 1, 0, 1])
    for scale in (1e-4, 1e3):  # a uniform rescaling cuts the same structures
        np.testing.assert_array_equal(_mask(alpha * scale), _mask(alpha))


def test_layer_structure_threshold_is_relative_to_the_initial_alpha():
    assert _mask([0.02], "layer").all()
    assert not _mask([0.005], "layer").any()
    assert not _mask([0.0], "channel").any()


def test_zero_threshold_cuts_only_exact_zeros():
    np.testing.assert_array_equal(_mask([1.0, 1e-9, 0.0, -1e-12], threshold=0.0), [1, 1, 0, 1])
    np.testing.assert_array_equal(_mask([0.0], "layer", threshold=0.0), [0])
    assert PSP(L.Dense(3), threshold=0.0).threshold == 0.0


@pytest.mark.parametrize("batchnorm", [True, False], ids=["with_bn", "without_bn"])
def test_threshold_means_the_same_with_and_without_batchnorm(batchnorm, rng):
    """A uniform shrink of α (which weight decay causes freely when BN follows)
    cuts nothing more, though every |α| falls below an absolute 1e-2; with BN
    (tiny epsilon, so that BN's cancellation is exact) the output is unchanged."""
    model = wrap(small_cnn(batchnorm=batchnorm, bn_epsilon=1e-9), layers=["conv1"],
                 regularizer="l2")  # raw α (the paper's): the layer computes with α as it is
    layer = model.get_layer("conv1")
    pattern = rng.uniform(0.2, 0.9, size=layer.alpha.shape).astype("float32")
    pattern[:3] = [0.001, 0.004, 0.0]  # three clearly unimportant channels
    x = rng.normal(size=(16, 8, 8, 1)).astype("float32")
    layer.alpha.assign(pattern)
    mask = layer.mask()
    assert mask.sum() == len(pattern) - 3 and not mask[:3].any()
    y = to_numpy(model(x, training=True))
    layer.alpha.assign(pattern * 1e-2)
    assert np.abs(to_numpy(layer.alpha)).max() < 1e-2
    np.testing.assert_array_equal(layer.mask(), mask)
    y_small = to_numpy(model(x, training=True))
    if batchnorm:
        np.testing.assert_allclose(y_small, y, rtol=1e-3, atol=1e-5)
    else:
        assert not np.allclose(y_small, y, atol=1e-3)


@pytest.mark.parametrize("structure, multiple_of", [
    ("channel", None), ("channel", 8), ("filter", 4), ("layer", None)])
def test_numpy_rule_equals_the_forward_passs(structure, multiple_of, rng):
    """Masks and folding run the pruning rule in numpy; training runs it in
    keras.ops. Both must cut and scale exactly the same structures."""
    from keras_psp.wrapper import effective_alpha

    size = 1 if structure == "layer" else 37
    for trial in range(20):
        alpha = rng.uniform(-1.5, 1.5, size).astype("float32")
        alpha[rng.random(size) < 0.3] = 0.0  # exact zeros stay cut
        alpha[rng.random(size) < 0.2] = 0.004  # ties, just under the 1e-2 threshold
        if trial == 0:
            alpha[:] = 0.0
        numpy_mask = keep_mask(alpha, 1e-2, structure, multiple_of)
        assert isinstance(numpy_mask, np.ndarray) and numpy_mask.dtype == bool
        np.testing.assert_array_equal(
            numpy_mask, to_numpy(keep_mask(keras.ops.convert_to_tensor(alpha), 1e-2,
                                           structure, multiple_of)))
        for relative in (False, True):
            np.testing.assert_allclose(
                effective_alpha(alpha, 1e-2, structure, multiple_of, relative, numpy=True),
                to_numpy(effective_alpha(alpha, 1e-2, structure, multiple_of, relative)),
                rtol=1e-6, atol=0)


def test_cut_structures_are_zero_in_the_training_forward_pass(rng):
    model = wrap(small_cnn(batchnorm=False), layers=["conv1"])
    layer = model.get_layer("conv1")
    alpha = np.ones(layer.alpha.shape, "float32")
    alpha[:4] = 5e-3  # below 1e-2 × max
    layer.alpha.assign(alpha)
    reference = wrap(small_cnn(batchnorm=False), layers=["conv1"])
    reference.set_weights(model.get_weights())
    ref_layer = reference.get_layer("conv1")
    alpha[:4] = 0.0
    ref_layer.alpha.assign(alpha)
    x = rng.normal(size=(4, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(model(x, training=True)), to_numpy(reference(x, training=True)), atol=1e-6
    )


# -- regularizer --------------------------------------------------------------


def _loss_of(layer):
    return float(sum(to_numpy(loss) for loss in layer.losses))


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({}, lambda a: 5e-3 * np.sum(np.abs(a)) / np.sqrt(np.mean(a**2))),
        ({"regularizer": "l2"}, lambda a: 2e-2 * np.sum(a**2)),
        ({"regularizer": "l2", "strength": 0.5}, lambda a: 0.5 * np.sum(a**2)),
        ({"regularizer": "l1", "strength": 0.1}, lambda a: 0.1 * np.sum(np.abs(a))),
        ({"regularizer": keras.regularizers.L1L2(0.1, 0.2)},
         lambda a: 0.1 * np.sum(np.abs(a)) + 0.2 * np.sum(a**2)),
        ({"regularizer": None}, lambda a: 0.0),
    ],
    ids=["default_relative_l1", "default_l2", "l2", "l1", "keras_object", "none"],
)
def test_alpha_regularizer(kwargs, expected, rng):
    layer = PSP(L.Dense(3, kernel_regularizer=None), **kwargs)
    layer.build((None, 5))
    alpha = rng.uniform(0.1, 2, size=5).astype("float32")
    layer.alpha.assign(alpha)
    layer(np.ones((1, 5), "float32"))
    np.testing.assert_allclose(_loss_of(layer), expected(alpha), rtol=1e-5)


def test_strength_with_a_regularizer_object_is_refused():
    with pytest.raises(ValueError, match="strength"):
        PSP(L.Dense(3), regularizer=keras.regularizers.L2(0.1), strength=0.2)
    with pytest.raises(ValueError, match=">= 0"):
        PSP(L.Dense(3), strength=-1.0)


# -- dtypes ---------------------------------------------------------------------


@pytest.fixture
def policy():
    previous = keras.config.dtype_policy()
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("name,compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_alpha_stays_float32_under_mixed_precision(name, compute, policy, digits):
    policy(name)
    model = wrap(small_cnn())
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    layer = model.get_layer("conv1")
    assert layer.compute_dtype == compute
    assert layer.alpha.dtype == "float32"
    (x, y), _ = digits
    before = to_numpy(layer.alpha).copy()
    model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)
    assert layer.alpha.dtype == "float32"
    assert not np.allclose(to_numpy(layer.alpha), before)
    assert np.all(np.isfinite(to_numpy(layer.alpha)))
    assert keras.backend.standardize_dtype(model(x[:2]).dtype) == compute


# -- config and errors ---------------------------------------------------------


def test_get_config_round_trip():
    layer = PSP(L.Conv2D(4, 3, name="c"), structure="column", threshold=0.05,
                regularizer="l1", strength=0.3)
    clone = PSP.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert (clone.structure, clone.threshold, clone.name) == ("column", 0.05, "c")
    assert isinstance(clone.alpha_regularizer, keras.regularizers.L1)
    assert float(clone.alpha_regularizer.l1) == pytest.approx(0.3)


def test_unsupported_layer_is_refused_with_its_name():
    with pytest.raises(TypeError, match="'norm' of type BatchNormalization.*Supported"):
        PSP(L.BatchNormalization(name="norm"))


def test_unknown_structure_is_refused():
    with pytest.raises(ValueError, match="Unknown structure 'row' for layer 'c'"):
        PSP(L.Conv2D(3, 3, name="c"), structure="row")


def test_double_wrapping_is_refused():
    with pytest.raises(ValueError, match="'c' is already wrapped"):
        PSP(PSP(L.Conv2D(3, 3, name="c")))


@pytest.mark.parametrize("threshold", [1.0, -0.1, float("nan")])
def test_threshold_outside_unit_interval_is_refused(threshold):
    with pytest.raises(ValueError, match="threshold"):
        PSP(L.Dense(3), threshold=threshold)


def test_lora_layer_is_refused():
    dense = L.Dense(3, name="d")
    dense.build((None, 4))
    dense.enable_lora(2)
    with pytest.raises(ValueError, match="'d' uses LoRA"):
        PSP(dense)


@pytest.mark.tensorflow_only
def test_alpha_gradient_is_the_papers_formula(rng):
    """∂E/∂α = Σ over the structure of ∂E/∂W_eff · W; zero for cut structures."""
    import tensorflow as tf

    layer = PSP(L.Conv2D(5, 3, use_bias=False), structure="channel", regularizer=None)
    layer.build((None, 6, 6, 4))
    alpha = np.array([1e-4, 0.5, 1.0, 2.0], "float32")  # channel 0 is cut
    layer.alpha.assign(alpha)
    x = tf.constant(rng.normal(size=(2, 6, 6, 4)).astype("float32"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) ** 2)
    grad_alpha = tape.gradient(loss, layer.alpha.value).numpy()

    w_eff = tf.Variable(layer.effective_kernels("float32")["kernel"])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.nn.conv2d(x, w_eff, 1, "VALID") ** 2)
    grad_w = tape.gradient(loss, w_eff).numpy()
    kernel = to_numpy(layer.layer.kernel)
    expected = (grad_w * kernel).sum(axis=(0, 1, 3))
    expected[0] = 0.0
    np.testing.assert_allclose(grad_alpha, expected, rtol=1e-4, atol=1e-4)
    assert grad_alpha[0] == 0.0
