"""prune_to: a one-shot cut to a FLOPs target, from the current α."""

import warnings

import keras
import numpy as np
import pytest

from helpers import small_cnn
from keras_psp import count_flops, prune_to, slim, wrap
from keras_psp.cloning import psp_layers
from keras_psp.models import cifar_resnet, densenet
from keras_psp.ranking import scores


def _random_alpha(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in psp_layers(model):
        layer.alpha.assign(rng.uniform(0.05, 1.0, layer.alpha.shape).astype("float32"))


def _mobilenet():
    return keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, weights=None,
                                          classes=10)


@pytest.mark.parametrize("build", [lambda: cifar_resnet(20), lambda: densenet(40, growth_rate=12),
                                   _mobilenet], ids=["resnet20", "densenet40", "mobilenetv2"])
def test_prune_to_lands_within_tolerance(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = wrap(build())
    _random_alpha(model)
    cut = prune_to(model, flops=0.5)
    true = count_flops(slim(model)) / count_flops(model)
    assert 0.48 <= true <= 0.5 and cut.flops == pytest.approx(true)
    assert cut.before == 1.0 and cut.target == 0.5 and cut.count == cut.structures > 0
    for name, entries in cut.cut.items():  # what it reports is what it cut: α exactly 0
        alpha = np.ravel(keras.ops.convert_to_numpy(model.get_layer(name).alpha))
        assert np.all(alpha[entries] == 0)


def _equal_norm_kernels(model):
    """Every structure's weights of equal norm, so that the scores follow α."""
    for layer in psp_layers(model):
        kernel = layer.layer.kernel
        kernel.assign(np.ones(kernel.shape, "float32"))


def test_scores_are_effective_weight_norms_relative_to_the_layer(rng):
    model = wrap(small_cnn())
    conv1 = model.get_layer("conv1")
    alpha = rng.uniform(0.1, 1.0, 8).astype("float32")
    conv1.alpha.assign(alpha * 1e-3)  # the scale of α means nothing
    kernel = keras.ops.convert_to_numpy(conv1.layer.kernel)
    expected = alpha * np.sqrt((kernel**2).sum(axis=(0, 1, 3)))  # (3, 3, in, out): per input
    np.testing.assert_allclose(scores(conv1), expected / np.sqrt(np.mean(expected**2)), rtol=1e-5)
    conv1.alpha.assign(np.where(np.arange(8) < 3, 0.0, alpha).astype("float32"))
    assert np.all(scores(conv1)[:3] == 0)  # cut: 0, and the rest relative to the kept ones
    assert np.sqrt(np.mean(scores(conv1)[3:] ** 2)) == pytest.approx(1.0)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_prune_to_cuts_in_score_order(allocation):
    model = wrap(small_cnn())
    _equal_norm_kernels(model)
    conv1, head = model.get_layer("conv1"), model.get_layer("head")
    conv1.alpha.assign(np.linspace(0.1, 0.8, 8).astype("float32"))
    head.alpha.assign(np.linspace(0.9, 1.0, 16).astype("float32"))
    cut = prune_to(model, flops=0.6, allocation=allocation)
    for entries in cut.cut.values():  # each layer loses its lowest first
        np.testing.assert_array_equal(entries, np.arange(len(entries)))
    if allocation == "global":
        assert list(cut.cut) == ["conv1"]  # conv1: 0.2, 0.4, ... relative; head: 0.95 or more
    else:
        lost = [len(cut.cut.get(name, [])) / size for name, size in (("conv1", 8), ("head", 16))]
        assert lost[1] > 0 and abs(lost[0] - lost[1]) <= 1 / 8  # the same share, ± one
    again = prune_to(model, flops=0.9, allocation=allocation)  # above what is left: nothing
    assert again.count == 0 and again.flops == pytest.approx(cut.flops)
    assert np.sum(~conv1.mask()) == len(cut.cut.get("conv1", []))  # cuts stay


def test_prune_to_zeroes_the_optimizer_slots(rng):
    model = wrap(small_cnn())
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(rng.random((8, 8, 8, 1)), np.arange(8) % 10, verbose=0)
    _random_alpha(model)
    cut = prune_to(model, flops=0.5)
    for name, entries in cut.cut.items():
        path = model.get_layer(name).alpha.path.replace("/", "_") + "_"
        slots = [v for v in model.optimizer.variables if v.name.startswith(path)]
        assert slots and all(np.all(np.ravel(keras.ops.convert_to_numpy(v))[entries] == 0)
                             for v in slots)


def test_prune_to_refuses_what_cannot_be_reached():
    model = wrap(small_cnn(), layers=["head"])
    with pytest.raises(ValueError, match=r"cannot reach 0.100 .*leaves 0\.118"):
        prune_to(model, flops=0.1)
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="`flops` must be in"):
            prune_to(model, flops=bad)
    with pytest.raises(ValueError, match="no PSP layers"):
        prune_to(small_cnn(), flops=0.5)


def test_layer_wise_alpha_is_named_when_a_target_cannot_be_reached():
    model = cifar_resnet(8, (8, 8, 8), input_shape=(16, 16, 1), preactivation=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = wrap(model, structure="layer", layers=lambda layer: layer.name.endswith("b_conv"))
    with pytest.raises(ValueError, match=r"Layer-wise α \('s1b1b_conv'.*never cut by a budget"):
        prune_to(wrapped, flops=0.5)
