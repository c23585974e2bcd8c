"""Cost of a model: multiply-accumulates (`count_flops`) and parameters.

Like the pruning literature, "FLOPs" here are the multiply-accumulates (MACs)
of convolution and dense layers for one example; batch normalization,
activations, pooling, merges and biases count zero. TensorFlow's profiler
counts 2 FLOPs per MAC, so its conv/matmul total is twice `count_flops`.

Each layer type has one MAC function in a registry (`register_macs`), applied
to every call in the model's flat functional graph (nested models inlined).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import keras
from keras.src.layers.convolutional.base_conv import BaseConv
from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose
from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv
from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv
from keras.src.models.functional import Functional

from keras_psp.cloning import check_graph_model
from keras_psp.groups import ChannelGroups
from keras_psp.surgery.graph import flatten
from keras_psp.wrapper import PSP

MacFunction = Callable[[keras.layers.Layer, tuple, tuple], int]
_REGISTRY: dict[type, MacFunction] = {}

# Layers with weights but (by the convention above) no MACs: no warning.
ZERO_MAC_TYPES = tuple(
    getattr(keras.layers, name)
    for name in ("BatchNormalization", "LayerNormalization", "GroupNormalization")
    + ("Normalization", "Embedding", "PReLU")
) + tuple(
    # per-channel scales of applications (ConvNeXt's LayerScale), when present
    cls
    for module, name in (("keras.src.applications.convnext", "LayerScale"),)
    for cls in [getattr(__import__(module, fromlist=[name]), name, None)]
    if cls is not None
) + (ChannelGroups,)  # group α: a per-channel scale that folds into its reader


def register_macs(*layer_types: type) -> Callable[[MacFunction], MacFunction]:
    """Registers `fn(layer, input_shape, output_shape) -> MACs` for layer types.

    Shapes are those of one call, batch dimension first. Read channel counts
    from the shapes, not from the layer's config (`filters`, `units`): the
    same function then counts the layer at the widths `slim` leaves it.
    Subclasses of a registered type use its function unless they have their own.

    Example:

    ```python
    @keras_psp.flops.register_macs(MyConv)
    def _my_conv(layer, input_shape, output_shape):
        return math.prod(output_shape[1:]) * layer.kernel.shape[0]
    ```
    """

    def decorator(fn: MacFunction) -> MacFunction:
        _REGISTRY.update(dict.fromkeys(layer_types, fn))
        return fn

    return decorator


def _split(layer, shape: tuple) -> tuple[int, int]:
    """(number of spatial positions, channels) of a conv input or output."""
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return math.prod(shape[2:]), int(shape[1])
    return math.prod(shape[1:-1]), int(shape[-1])


def _terms(layer, input_shape, output_shape) -> tuple[int, int, int]:
    """(output positions, input channels, kernel positions) of a convolution."""
    positions = _split(layer, output_shape)[0]
    return positions, _split(layer, input_shape)[1], math.prod(layer.kernel_size)


# Channel counts come from the shapes, not from the layer's config, so that the
# same functions count a layer at the widths surgery leaves (`keras_psp.surgery.cost`).


@register_macs(BaseConv)
def _conv(layer, input_shape, output_shape):
    positions, channels, kernel = _terms(layer, input_shape, output_shape)
    return positions * kernel * (channels // layer.groups) * _split(layer, output_shape)[1]


@register_macs(BaseConvTranspose)
def _conv_transpose(layer, input_shape, output_shape):
    # Every input position scatters one kernel per filter.
    positions, channels = _split(layer, input_shape)
    return positions * math.prod(layer.kernel_size) * channels * _split(layer, output_shape)[1]


@register_macs(BaseDepthwiseConv)
def _depthwise(layer, input_shape, output_shape):
    positions, channels, kernel = _terms(layer, input_shape, output_shape)
    return positions * kernel * channels * layer.depth_multiplier


@register_macs(BaseSeparableConv)
def _separable(layer, input_shape, output_shape):
    positions, channels, kernel = _terms(layer, input_shape, output_shape)
    # Depthwise (kernel MACs per channel), then pointwise (filters per channel).
    filters = _split(layer, output_shape)[1]
    return positions * channels * layer.depth_multiplier * (kernel + filters)


@register_macs(keras.layers.Dense)
def _dense(layer, input_shape, output_shape):
    return math.prod(input_shape[1:-1]) * int(input_shape[-1]) * int(output_shape[-1])


def mac_function(layer) -> MacFunction | None:
    """The MAC function registered for `layer`'s class or its closest base."""
    return _mac_function(layer)


def _mac_function(layer) -> MacFunction | None:
    return next((_REGISTRY[c] for c in type(layer).__mro__ if c in _REGISTRY), None)


def _check(model, action: str) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(f"Cannot {action} {model!r}: expected a keras.Model.")
    if not isinstance(model, (keras.Sequential, Functional)):
        raise TypeError(
            f"Cannot {action} model '{model.name}': a subclassed model ({type(model).__name__}) "
            "has no functional graph. Rebuild it with the functional API or keras.Sequential."
        )
    check_graph_model(model, action)


def count_flops(model: keras.Model, pruned: bool = False) -> int:
    """Multiply-accumulates of one example through `model` ("FLOPs").

    Counts the MACs of convolutions (all kinds, grouped included) and `Dense`
    layers, per call, on the shapes of the model's functional graph; other
    layers count zero (the pruning literature's convention). A PSP wrapper
    counts as the layer it wraps. Layers with weights of an unregistered type
    count zero, with one warning naming them (see `register_macs`).

    Args:
        model: A built Sequential or functional model with fixed input shape
            (batch dimension excepted); nested models are counted inline.
        pruned: If True, count the model that `keras_psp.slim(model)` returns.

    Returns:
        The number of multiply-accumulates per example, an int.

    Example:

    ```python
    model = keras_psp.models.cifar_resnet(56)
    keras_psp.count_flops(model)                # 125_747_840
    keras_psp.count_flops(wrapped, pruned=True)  # after slim
    ```
    """
    _check(model, "count the FLOPs of")
    if pruned:  # from surgery's channel plan: no model is built
        from keras_psp.surgery.cost import slim_flops

        return slim_flops(model)
    per_layer, unknown = _walk(model)
    _warn_unknown(unknown)
    return sum(per_layer.values())


def layer_flops(model: keras.Model) -> dict[str, int]:
    """Multiply-accumulates per example of each layer of `model`, by name.

    The same count as `count_flops`, before summing: one entry per layer with
    a MAC function (see `register_macs`), in graph order, its calls summed
    (a shared layer, a nested model called twice). A PSP wrapper counts as
    the layer it wraps, under the wrapper's name. Layers without a MAC
    function are left out.

    Args:
        model: A built Sequential or functional model with fixed input shape.

    Returns:
        A dict `{layer name: MACs}`; its values sum to `count_flops(model)`.

    Example:

    ```python
    keras_psp.flops.layer_flops(model)   # {"conv0": 4608, "conv1": 73728, ...}
    ```
    """
    _check(model, "count the FLOPs of")
    per_layer, unknown = _walk(model)
    _warn_unknown(unknown)
    return per_layer


def _walk(model) -> tuple[dict[str, int], list[str]]:
    """(MACs by layer name, unknown layers with weights) of the flat graph."""
    graph = flatten(model)
    per_layer: dict[str, int] = {}
    unknown = []
    for op in graph.ops:
        layer = op.layer.layer if isinstance(op.layer, PSP) else op.layer
        fn = _mac_function(layer)
        if fn is None:
            if getattr(layer, "weights", None) and not isinstance(layer, ZERO_MAC_TYPES):
                unknown.append(f"'{layer.name}' ({type(layer).__name__})")
            continue
        input_shape, output_shape = graph.shapes[op.inputs[0]], graph.shapes[op.outputs[0]]
        if None in input_shape[1:] or None in output_shape[1:]:
            raise ValueError(
                f"Cannot count the FLOPs of layer '{layer.name}': its input shape "
                f"{input_shape} is not fixed. Build the model on a fixed input shape."
            )
        name = op.layer.name
        per_layer[name] = per_layer.get(name, 0) + int(fn(layer, input_shape, output_shape))
    return per_layer, unknown


def _warn_unknown(unknown: list[str]) -> None:
    if unknown:
        names = ", ".join(dict.fromkeys(unknown))
        warnings.warn(
            f"count_flops counted 0 MACs for layers of unknown type with weights: "
            f"{names}. Register their cost with keras_psp.flops.register_macs.",
            stacklevel=3,
        )


def count_params(model: keras.Model, pruned: bool = False) -> int:
    """Number of parameters of `model` (`model.count_params()`).

    Args:
        model: A built Sequential or functional model. For a PSP-wrapped model
            the α scales and their strength variables (one per PSP layer) count too.
        pruned: If True, count the model that `keras_psp.slim(model)` returns.

    Returns:
        The number of parameters, an int.

    Example:

    ```python
    keras_psp.count_params(wrapped, pruned=True)   # parameters after slim
    ```
    """
    _check(model, "count the parameters of")
    if pruned:
        from keras_psp.surgery.slim import slim

        return int(slim(model).count_params())
    return int(model.count_params())
