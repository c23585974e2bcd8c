"""The PSP paper's reference architectures as plain Keras functional models.

Part of the public API (README, "Reference architectures"): CIFAR ResNets
(`cifar_resnet`, post- or pre-activation, widths and inner widths of one's
choice), ImageNet ResNets (`imagenet_resnet`), DenseNets (`densenet`) and a
small VGG (`vgg`). The main job, the study, the paper examples, the tests and
the benchmarks build their models here.
"""

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


def _basic_block(x, inner, width, stride, weight_decay, prefix):
    """Post-activation basic block: conv-BN-ReLU, conv-BN, + shortcut, ReLU."""
    y = _conv_bn(x, inner, stride, weight_decay, f"{prefix}a")
    y = _conv_bn(y, width, 1, weight_decay, f"{prefix}b", relu=False)
    if stride != 1 or x.shape[-1] != width:
        x = _conv_bn(x, width, stride, weight_decay, f"{prefix}p", relu=False, kernel_size=1)
    x = layers.Add(name=f"{prefix}_add")([x, y])
    return layers.ReLU(name=f"{prefix}_out")(x)


def _preact_block(x, inner, width, stride, weight_decay, prefix):
    """Pre-activation basic block: BN-ReLU-conv twice, + shortcut (no ReLU).

    The branch ends in its second convolution, whose output meets the
    shortcut directly: a scale on that convolution is not cancelled by a BN.
    """
    pre = layers.ReLU(name=f"{prefix}_pre_relu")(_bn(x, f"{prefix}_pre_bn"))
    if stride != 1 or x.shape[-1] != width:
        x = _conv(pre, width, weight_decay, f"{prefix}p_conv", kernel_size=1, stride=stride)
    y = _conv_bn(pre, inner, stride, weight_decay, f"{prefix}a")
    y = _conv(y, width, weight_decay, f"{prefix}b_conv")
    return layers.Add(name=f"{prefix}_add")([x, y])


def _stages(x, widths, blocks, inner_widths, weight_decay, preactivation):
    """Residual stages; the first block of every stage but the first has stride 2."""
    block_fn = _preact_block if preactivation else _basic_block
    index = 0
    for stage, (width, count) in enumerate(zip(widths, blocks, strict=True)):
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            x = block_fn(
                x, inner_widths[index], width, stride, weight_decay, f"s{stage + 1}b{block + 1}"
            )
            index += 1
    if preactivation:
        x = layers.ReLU(name="final_relu")(_bn(x, "final_bn"))
    return x


def _inner_widths(inner_widths, widths, blocks, what):
    if inner_widths is None:
        return [w for w, n in zip(widths, blocks, strict=True) for _ in range(n)]
    inner_widths = list(inner_widths)
    if len(inner_widths) != sum(blocks):
        raise ValueError(
            f"inner_widths needs one width per block: {sum(blocks)} for {what}, "
            f"got {len(inner_widths)}."
        )
    return inner_widths


def cifar_resnet(
    depth: int = 56,
    widths: Sequence[int] = (16, 32, 64),
    input_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    weight_decay: float = 5e-4,
    stem_stride: int = 1,
    inner_widths: Sequence[int] | None = None,
    preactivation: bool = False,
    name: str | None = None,
) -> keras.Model:
    """The CIFAR ResNet of He et al. (2016): `depth = 6n + 2`, basic blocks.

    Three stages of `n` two-convolution blocks with `widths` filters; a
    stride-2, 1×1 projection shortcut where the shape changes.

    With `preactivation`, the blocks are the full pre-activation blocks of
    He et al., "Identity Mappings in Deep Residual Networks" (2016): BN →
    ReLU → conv twice, added to the shortcut without a ReLU after, the
    projection reading the pre-activated input, and BN → ReLU before the
    pooling. Each branch then ends in its convolution `s{i}b{j}b_conv`, not
    in a BN: a layer-wise PSP scale there weighs the whole branch against
    the shortcut (`structure="layer"`; a BN right after would cancel it).

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
        preactivation: Pre-activation blocks (see above).
        name: Model name; defaults to `resnet{depth}` (`preact_resnet{depth}`).

    Example:

    ```python
    model = keras_psp.models.cifar_resnet(56)   # 0.85 M parameters
    thin = keras_psp.models.cifar_resnet(8, inner_widths=(4, 8, 16))
    ```
    """
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"depth must be 6n + 2 (8, 20, 56...), got {depth}.")
    widths = tuple(widths)
    blocks = [(depth - 2) // 6] * len(widths)
    inner_widths = _inner_widths(
        inner_widths, widths, blocks, f"depth {depth} ({len(widths)} stages of {blocks[0]})"
    )
    inputs = keras.Input(input_shape, name="image")
    if preactivation:
        x = _conv(inputs, widths[0], weight_decay, "stem_conv", stride=stem_stride)
    else:
        x = _conv_bn(inputs, widths[0], stem_stride, weight_decay, "stem")
    x = _stages(x, widths, blocks, inner_widths, weight_decay, preactivation)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="logits")(x)
    default = f"preact_resnet{depth}" if preactivation else f"resnet{depth}"
    return keras.Model(inputs, outputs, name=name or default)


IMAGENET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def imagenet_resnet(
    depth: int = 18,
    widths: Sequence[int] = (64, 128, 256, 512),
    input_shape: tuple[int, int, int] = (224, 224, 3),
    num_classes: int = 1000,
    weight_decay: float = 5e-5,
    inner_widths: Sequence[int] | None = None,
    name: str | None = None,
) -> keras.Model:
    """The ImageNet ResNet-18 or -34 of He et al. (2016), basic blocks.

    A 7×7 stride-2 stem (conv → BN → ReLU) and 3×3 stride-2 max pooling,
    four stages of basic blocks (2-2-2-2 or 3-4-6-3; stride 2 at the start
    of stages 2-4, with a 1×1 projection shortcut + BN), global average
    pooling and a softmax. With the default widths the parameters match
    torchvision's `resnet18`/`resnet34` (11.69 M / 21.80 M trainable). For
    ResNet-50 use `keras.applications.ResNet50(weights=None)`.

    Layer names follow `cifar_resnet`: `stem_conv`, `stem_bn`, `stem_pool`,
    `s{i}b{j}a_conv` / `b_conv` / `p_conv` (and `_bn`), `s{i}b{j}_add`,
    `pool`, `logits`.

    Args:
        depth: 18 or 34.
        widths: Filters of the four stages (narrower ones make test models).
        input_shape: Image shape, channels last (any size ≥ 32).
        num_classes: Size of the softmax output.
        weight_decay: L2 strength on the convolution and dense kernels
            (Keras's `L2`: 5e-5 is SGD weight decay 1e-4).
        inner_widths: One width per block (filters of its first convolution);
            `None`: the stage width.
        name: Model name; defaults to `resnet{depth}`.

    Example:

    ```python
    model = keras_psp.models.imagenet_resnet(18)
    tiny = keras_psp.models.imagenet_resnet(18, widths=(8, 16, 32, 64), input_shape=(32, 32, 3))
    ```
    """
    if depth not in IMAGENET_BLOCKS:
        raise ValueError(
            f"imagenet_resnet builds depth 18 or 34 (basic blocks), got {depth}. "
            "For ResNet-50 use keras.applications.ResNet50(weights=None)."
        )
    widths = tuple(widths)
    if len(widths) != 4:
        raise ValueError(f"imagenet_resnet needs 4 stage widths, got {widths}.")
    blocks = IMAGENET_BLOCKS[depth]
    inner_widths = _inner_widths(inner_widths, widths, blocks, f"ResNet-{depth}")
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn(inputs, widths[0], 2, weight_decay, "stem", kernel_size=7)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    x = _stages(x, widths, blocks, inner_widths, weight_decay, preactivation=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(
        inputs, _softmax(x, num_classes, weight_decay), name=name or f"resnet{depth}"
    )


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
