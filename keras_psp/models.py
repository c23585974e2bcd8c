"""Reference architectures used by the main job, the tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers


def _l2(weight_decay):
    return keras.regularizers.L2(weight_decay) if weight_decay else None


def _conv(x, filters, weight_decay, name, kernel_size=3, stride=1, use_bias=False):
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding="same",
        use_bias=use_bias,
        kernel_initializer="he_normal",
        kernel_regularizer=_l2(weight_decay),
        name=name,
    )(x)


def _bn(x, name):
    # BN momentum 0.9 (PyTorch's 0.1): the moving statistics keep up with weights
    # that move fast early in training, and with α shrinking under weight decay.
    return layers.BatchNormalization(momentum=0.9, name=name)(x)


def _conv_bn(x, filters, stride, weight_decay, name, relu=True, kernel_size=3):
    x = _conv(x, filters, weight_decay, f"{name}_conv", kernel_size, stride)
    x = _bn(x, f"{name}_bn")
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _bn_relu_conv(x, filters, weight_decay, name, kernel_size=3):
    """Pre-activation unit (DenseNet): BN → ReLU → convolution."""
    x = layers.ReLU(name=f"{name}_relu")(_bn(x, f"{name}_bn"))
    return _conv(x, filters, weight_decay, f"{name}_conv", kernel_size)


def _softmax(x, num_classes, weight_decay):
    return layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=_l2(weight_decay), name="logits"
    )(x)


def cifar_resnet(
    depth: int = 56,
    widths: Sequence[int] = (16, 32, 64),
    input_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    weight_decay: float = 5e-4,
    stem_stride: int = 1,
    inner_widths: Sequence[int] | None = None,
    name: str | None = None,
) -> keras.Model:
    """The CIFAR ResNet of He et al. (2016): `depth = 6n + 2`, basic blocks.

    Three stages of `n` two-convolution blocks with `widths` filters; a
    stride-2, 1×1 projection shortcut where the shape changes.

    Args:
        depth: 8, 20, 32, 44, 56, 110...
        widths: Filters of the three stages (each block's output).
        input_shape: Image shape, channels last.
        num_classes: Size of the softmax output.
        weight_decay: L2 strength on the convolution kernels (0 for none).
        stem_stride: Stride of the first convolution (2 halves the cost of
            every layer after it).
        inner_widths: One width per block, in block order (`3n` entries):
            the filters of each block's first convolution (`s{i}b{j}a_conv`),
            hence the input channels of its second. `None`: the stage width.
            Rebuilds, say, a pruned ResNet-56 at its pruned widths.
        name: Model name; defaults to `resnet{depth}`.

    Example:

    ```python
    model = keras_psp.models.cifar_resnet(56)   # 0.85 M parameters
    thin = keras_psp.models.cifar_resnet(8, inner_widths=(4, 8, 16))
    ```
    """
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"depth must be 6n + 2 (8, 20, 56...), got {depth}.")
    blocks = (depth - 2) // 6
    widths = tuple(widths)
    if inner_widths is None:
        inner_widths = [w for w in widths for _ in range(blocks)]
    inner_widths = list(inner_widths)
    if len(inner_widths) != len(widths) * blocks:
        raise ValueError(
            f"inner_widths needs one width per block: {len(widths) * blocks} for "
            f"depth {depth} ({len(widths)} stages of {blocks}), got {len(inner_widths)}."
        )
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn(inputs, widths[0], stem_stride, weight_decay, "stem")
    for stage, width in enumerate(widths):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            prefix = f"s{stage + 1}b{block + 1}"
            inner = inner_widths[stage * blocks + block]
            y = _conv_bn(x, inner, stride, weight_decay, f"{prefix}a")
            y = _conv_bn(y, width, 1, weight_decay, f"{prefix}b", relu=False)
            if stride != 1 or x.shape[-1] != width:
                x = _conv_bn(
                    x, width, stride, weight_decay, f"{prefix}p", relu=False, kernel_size=1
                )
            x = layers.Add(name=f"{prefix}_add")([x, y])
            x = layers.ReLU(name=f"{prefix}_out")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="logits")(x)
    return keras.Model(inputs, outputs, name=name or f"resnet{depth}")


def densenet(
    depth: int = 40,
    growth_rate: int = 12,
    bottleneck: bool = False,
    compression: float = 1.0,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    weight_decay: float = 1e-4,
    initial_filters: int | None = None,
    name: str | None = None,
) -> keras.Model:
    """The CIFAR DenseNet of Huang et al. (2017), plain or BC.

    A 3×3 stem, then three dense blocks of `n` layers joined by transitions
    (BN → ReLU → 1×1 conv to `floor(compression · C)` channels → 2×2 average
    pooling), then BN → ReLU → global average pooling → softmax. Each layer
    is BN → ReLU → 3×3 conv (`growth_rate` filters), with `bottleneck` first
    BN → ReLU → 1×1 conv (`4 · growth_rate`), and is concatenated to its input.

    Layer names: `stem_conv`; `b{i}l{j}_conv` (the 3×3), `b{i}l{j}_neck_conv`
    (the 1×1), `b{i}l{j}_cat`; `t{i}_conv`, `t{i}_pool`; `final_bn`, `logits`.

    Args:
        depth: `3n + 4` (40, 100...), or `6n + 4` with `bottleneck` (100, 250...).
        growth_rate: Filters each layer adds to the stream (k).
        bottleneck: Whether each layer starts with a 1×1 conv to `4k` channels.
        compression: Fraction of channels the transitions keep, in (0, 1].
        input_shape: Image shape, channels last.
        num_classes: Size of the softmax output.
        weight_decay: L2 strength on the convolution and dense kernels.
        initial_filters: Filters of the stem; defaults to 16, `2k` with
            `bottleneck` (as in the paper's DenseNet-BC).
        name: Model name; defaults to `densenet{depth}` (`densenet_bc{depth}`).

    Example:

    ```python
    model = keras_psp.models.densenet(40)                              # 1.0 M
    bc = keras_psp.models.densenet(100, bottleneck=True, compression=0.5)  # 0.8 M
    ```
    """
    per_layer = 6 if bottleneck else 3
    if depth < 4 + per_layer or (depth - 4) % per_layer:
        kind = "6n + 4 (10, 100, 250...) with bottleneck" if bottleneck else "3n + 4 (7, 40...)"
        raise ValueError(f"densenet depth must be {kind}, got {depth}.")
    if not 0.0 < compression <= 1.0:
        raise ValueError(f"compression must be in (0, 1], got {compression}.")
    n = (depth - 4) // per_layer
    if initial_filters is None:
        initial_filters = 2 * growth_rate if bottleneck else 16
    inputs = keras.Input(input_shape, name="image")
    x = _conv(inputs, initial_filters, weight_decay, "stem_conv")
    for b in range(1, 4):
        for i in range(1, n + 1):
            prefix = f"b{b}l{i}"
            y = x
            if bottleneck:
                y = _bn_relu_conv(y, 4 * growth_rate, weight_decay, f"{prefix}_neck", 1)
            y = _bn_relu_conv(y, growth_rate, weight_decay, prefix)
            x = layers.Concatenate(name=f"{prefix}_cat")([x, y])
        if b < 3:
            x = _bn_relu_conv(x, int(compression * x.shape[-1]), weight_decay, f"t{b}", 1)
            x = layers.AveragePooling2D(2, name=f"t{b}_pool")(x)
    x = layers.ReLU(name="final_relu")(_bn(x, "final_bn"))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = _softmax(x, num_classes, weight_decay)
    default = f"densenet_bc{depth}" if bottleneck and compression < 1 else f"densenet{depth}"
    return keras.Model(inputs, outputs, name=name or default)


def vgg(
    widths: Sequence[int | str] = (16, "M", 32, "M", 64, "M"),
    dense_units: Sequence[int] = (64,),
    input_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    batchnorm: bool = True,
    weight_decay: float = 5e-4,
    name: str | None = None,
) -> keras.Model:
    """A small VGG-style network with a `Flatten` → `Dense` head.

    Each integer in `widths` is a 3×3 conv (→ BN) → ReLU, each `"M"` a 2×2
    max pooling; then `Flatten` (channels last: channel `c` of the last
    feature map feeds every `c`-th Dense input) and `dense_units` ReLU Dense
    layers before the softmax. Names: `s{stage}c{j}_conv` (`_bn`, `_relu`),
    where each `"M"` (`s{stage}_pool`) ends a stage; `flatten`, `fc{i}`, `logits`.

    Args:
        widths: Conv filters and `"M"` poolings, in order.
        dense_units: Widths of the hidden Dense layers.
        input_shape: Image shape, channels last.
        num_classes: Size of the softmax output.
        batchnorm: BN after each conv (convs have biases without it).
        weight_decay: L2 strength on the convolution and dense kernels.
        name: Model name; defaults to `vgg`.

    Example:

    ```python
    model = keras_psp.models.vgg((32, 32, "M", 64, "M"), dense_units=(128,))
    ```
    """
    for w in widths:
        if w != "M" and (isinstance(w, (str, bool)) or not isinstance(w, int) or w < 1):
            raise ValueError(f"vgg widths takes positive ints and 'M', got {w!r}.")
    inputs = keras.Input(input_shape, name="image")
    x, stage, conv = inputs, 1, 0
    for w in widths:
        if w == "M":
            x = layers.MaxPooling2D(2, name=f"s{stage}_pool")(x)
            stage, conv = stage + 1, 0
            continue
        conv += 1
        prefix = f"s{stage}c{conv}"
        x = _conv(x, w, weight_decay, f"{prefix}_conv", use_bias=not batchnorm)
        if batchnorm:
            x = _bn(x, f"{prefix}_bn")
        x = layers.ReLU(name=f"{prefix}_relu")(x)
    x = layers.Flatten(name="flatten")(x)
    for i, units in enumerate(dense_units, 1):
        x = layers.Dense(
            units,
            activation="relu",
            kernel_initializer="he_normal",
            kernel_regularizer=_l2(weight_decay),
            name=f"fc{i}",
        )(x)
    return keras.Model(inputs, _softmax(x, num_classes, weight_decay), name=name or "vgg")
