"""Reference architectures: shapes, names, parameter counts, save/load."""

import keras
import numpy as np
import pytest
from keras import layers as L

from helpers import to_numpy
from keras_psp.models import cifar_resnet, densenet, imagenet_resnet, vgg


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_densenet_parameter_counts_match_the_paper():
    # Huang et al. (2017), Table 2, counts trainable parameters: DenseNet
    # (L=40, k=12) "1.0M", DenseNet-BC (L=100, k=12) "0.8M". count_params()
    # adds the BN moving mean and variance.
    plain = densenet(40)
    assert (_trainable(plain), plain.count_params()) == (1_019_722, 1_037_818)
    assert plain.name == "densenet40"
    bc = densenet(100, bottleneck=True, compression=0.5)
    assert (_trainable(bc), bc.count_params()) == (769_162, 793_150)
    assert bc.name == "densenet_bc100"
    assert bc.get_layer("stem_conv").filters == 24  # 2k for BC


def test_densenet_layers_and_transition_widths():
    k = 5
    model = densenet(10, growth_rate=k, bottleneck=True, compression=0.5, input_shape=(8, 8, 3))
    assert model.get_layer("b1l1_neck_conv").kernel.shape == (1, 1, 2 * k, 4 * k)
    assert model.get_layer("b1l1_conv").kernel.shape == (3, 3, 4 * k, k)
    assert isinstance(model.get_layer("b1l1_cat"), L.Concatenate)
    assert model.get_layer("b1l1_cat").output.shape[-1] == 3 * k
    assert model.get_layer("t1_conv").filters == 7  # floor(0.5 · 15)
    assert model.get_layer("t2_conv").filters == 6  # floor(0.5 · (7 + k))
    assert isinstance(model.get_layer("t2_pool"), L.AveragePooling2D)
    assert model.get_layer("b3l1_cat").output.shape[1:] == (2, 2, 6 + k)
    convs = [la for la in model.layers if isinstance(la, L.Conv2D)]
    assert all(not c.use_bias and c.padding == "same" for c in convs)
    assert all(la.momentum == 0.9 for la in model.layers if isinstance(la, L.BatchNormalization))
    plain = densenet(7, growth_rate=k, initial_filters=8, input_shape=(8, 8, 3))
    assert plain.get_layer("stem_conv").filters == 8
    assert plain.get_layer("t1_conv").filters == 8 + k  # compression 1


@pytest.mark.parametrize(
    "kwargs", [dict(depth=41), dict(depth=4), dict(depth=43, bottleneck=True), dict(compression=0)]
)
def test_densenet_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="depth|compression"):
        densenet(**kwargs)


def _shapes(model):
    return {la.name: [tuple(w.shape) for w in la.weights] for la in model.layers}


def test_inner_widths_change_only_the_a_convs():
    kw = dict(depth=20, widths=(8, 16, 32), input_shape=(8, 8, 3))
    base = cifar_resnet(**kw)
    same = cifar_resnet(**kw, inner_widths=[8] * 3 + [16] * 3 + [32] * 3)
    assert same.get_config() == base.get_config()
    inner = [3, 4, 5, 6, 7, 8, 9, 10, 11]
    thin = cifar_resnet(**kw, inner_widths=inner)
    old, new = _shapes(base), _shapes(thin)
    assert old.keys() == new.keys()
    changed = {n for n in old if old[n] != new[n]}
    blocks = [f"s{s}b{b}" for s in (1, 2, 3) for b in (1, 2, 3)]
    assert changed == {f"{p}{suffix}" for p in blocks for suffix in ("a_conv", "a_bn", "b_conv")}
    for prefix, width, stage in zip(blocks, inner, [8] * 3 + [16] * 3 + [32] * 3, strict=True):
        assert thin.get_layer(f"{prefix}a_conv").kernel.shape[-1] == width
        assert thin.get_layer(f"{prefix}b_conv").kernel.shape[2:] == (width, stage)


@pytest.mark.parametrize("inner", [[4] * 8, [4] * 10, []])
def test_inner_widths_of_the_wrong_length_raise(inner):
    with pytest.raises(ValueError, match="one width per block: 9"):
        cifar_resnet(20, inner_widths=inner)


def test_imagenet_resnet_parameter_counts_match_torchvision():
    # torchvision's resnet18 / resnet34 (trainable: no BN moving statistics).
    assert _trainable(imagenet_resnet(18)) == 11_689_512
    assert _trainable(imagenet_resnet(34)) == 21_797_672


def test_imagenet_resnet_layers():
    model = imagenet_resnet(18, widths=(4, 8, 16, 32), input_shape=(32, 32, 3), num_classes=7)
    assert model.name == "resnet18" and model.output.shape == (None, 7)
    assert model.get_layer("stem_conv").kernel.shape == (7, 7, 3, 4)
    assert model.get_layer("stem_conv").strides == (2, 2)
    assert model.get_layer("stem_pool").output.shape == (None, 8, 8, 4)
    assert model.get_layer("s4b2_out").output.shape == (None, 1, 1, 32)
    projections = sorted(la.name for la in model.layers if la.name.endswith("p_conv"))
    assert projections == ["s2b1p_conv", "s3b1p_conv", "s4b1p_conv"]
    assert isinstance(model.get_layer("logits").kernel_regularizer, keras.regularizers.L2)
    thin = imagenet_resnet(18, widths=(4, 8, 16, 32), input_shape=(32, 32, 3),
                           inner_widths=(1, 2, 3, 4, 5, 6, 7, 8))
    assert thin.get_layer("s3b2a_conv").filters == 6
    for kwargs, match in ((dict(depth=50), "ResNet50"), (dict(widths=(8, 16)), "4 stage widths"),
                          (dict(inner_widths=[4] * 7), "one width per block: 8")):
        with pytest.raises(ValueError, match=match):
            imagenet_resnet(**kwargs)


def test_preactivation_blocks_end_in_their_convolution():
    model = cifar_resnet(8, widths=(4, 8, 16), input_shape=(8, 8, 3), preactivation=True)
    assert model.name == "preact_resnet8"
    names = {la.name for la in model.layers}
    assert "stem_bn" not in names and {"final_bn", "final_relu"} <= names
    assert not any(name.endswith("_out") for name in names)  # no ReLU after the addition
    for prefix in ("s1b1", "s2b1", "s3b1"):
        add = model.get_layer(f"{prefix}_add")
        branch_end = model.get_layer(f"{prefix}b_conv")
        assert any(t is branch_end.output for t in add.input)
        assert isinstance(model.get_layer(f"{prefix}_pre_bn"), L.BatchNormalization)
    projection = model.get_layer("s2b1p_conv")  # reads the pre-activated input, no BN after
    assert projection.input is model.get_layer("s2b1_pre_relu").output
    assert "s2b1p_bn" not in names
    assert sum(la.count_params() for la in model.layers) == model.count_params()


def test_vgg_flatten_feeds_dense():
    model = vgg((8, "M", 16, 16, "M"), dense_units=(12, 6), input_shape=(8, 8, 3))
    flatten = model.get_layer("flatten")
    assert isinstance(flatten, L.Flatten)
    assert flatten.output.shape[-1] == 2 * 2 * 16
    assert model.get_layer("fc1").input is flatten.output
    assert model.get_layer("fc1").kernel.shape == (64, 12)
    assert model.get_layer("s2c2_conv").kernel.shape == (3, 3, 16, 16)
    assert vgg(input_shape=(8, 8, 3), dense_units=()).get_layer("logits").input.shape == (None, 64)
    bare = vgg(input_shape=(8, 8, 3), batchnorm=False)
    assert not any(isinstance(la, L.BatchNormalization) for la in bare.layers)
    assert bare.get_layer("s1c1_conv").use_bias
    with pytest.raises(ValueError, match="positive ints and 'M'"):
        vgg((16, "max"))


@pytest.mark.parametrize(
    "build",
    [
        lambda: cifar_resnet(8, input_shape=(8, 8, 3), inner_widths=(3, 5, 7)),
        lambda: cifar_resnet(8, input_shape=(8, 8, 3), preactivation=True),
        lambda: imagenet_resnet(18, (4, 8, 8, 8), input_shape=(8, 8, 3), num_classes=10),
        lambda: densenet(7, growth_rate=4, input_shape=(8, 8, 3)),
        lambda: densenet(10, 4, bottleneck=True, compression=0.5, input_shape=(8, 8, 3)),
        lambda: vgg(input_shape=(8, 8, 3)),
        lambda: vgg(batchnorm=False, dense_units=(16, 8), input_shape=(8, 8, 3)),
    ],
    ids=["resnet8_inner", "preact_resnet8", "resnet18", "densenet7", "densenet_bc10", "vgg", "vgg_no_bn"],
)
def test_forward_and_keras_round_trip(build, rng, tmp_path):
    model = build()
    x = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    y = to_numpy(model(x, training=False))
    assert y.shape == (2, 10)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert [la.name for la in loaded.layers] == [la.name for la in model.layers]
    np.testing.assert_allclose(to_numpy(loaded(x, training=False)), y, rtol=1e-5, atol=1e-6)
