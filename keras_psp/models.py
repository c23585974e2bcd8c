"""Reference architectures used by the main job, the tests and benchmarks."""

from __future__ import annotations

import keras
from keras import layers


def _conv_bn(x, filters, stride, weight_decay, name, relu=True, kernel_size=3):
    # BN momentum 0.9 (PyTorch's 0.1): the moving statistics keep up with weights
    # that move fast early in training, and with α shrinking under weight decay.
    x = layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=keras.regularizers.L2(weight_decay) if weight_decay else None,
        name=f"{name}_conv",
    )(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    if relu:
        x = layers.ReLU(name=f"{name}_relu")(x)
    return x


def cifar_resnet(
    depth: int = 56,
    widths: tuple[int, int, int] = (16, 32, 64),
    input_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    weight_decay: float = 5e-4,
    stem_stride: int = 1,
    name: str | None = None,
) -> keras.Model:
    """The CIFAR ResNet of He et al. (2016): `depth = 6n + 2`, basic blocks.

    Three stages of `n` two-convolution blocks with `widths` filters; a
    stride-2, 1×1 projection shortcut where the shape changes.

    Args:
        depth: 8, 20, 32, 44, 56, 110...
        widths: Filters of the three stages.
        input_shape: Image shape, channels last.
        num_classes: Size of the softmax output.
        weight_decay: L2 strength on the kernels (0 for none).
        stem_stride: Stride of the first convolution (2 halves the cost of
            every layer after it).
        name: Model name; defaults to `resnet{depth}`.

    Example:

    ```python
    model = keras_psp.models.cifar_resnet(56)   # 0.85 M parameters
    ```
    """
    if (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 (8, 20, 56...), got {depth}.")
    blocks = (depth - 2) // 6
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn(inputs, widths[0], stem_stride, weight_decay, "stem")
    for stage, width in enumerate(widths):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            prefix = f"s{stage + 1}b{block + 1}"
            y = _conv_bn(x, width, stride, weight_decay, f"{prefix}a")
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
