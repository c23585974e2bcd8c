"""How structure scales (α) map onto the kernels of each supported layer.

A *structure* is a group of kernel weights that shares one trainable scale:

- ``"channel"``: one input channel (for `Dense`: one input feature);
- ``"filter"``: one output channel;
- ``"column"``: one kernel position × one input channel (for `Dense`, which
  has no kernel positions, a column is an input feature, as in the im2col view
  of a fully connected layer);
- ``"shape"``: one kernel position, across all channels;
- ``"layer"``: the whole layer.

Every supported layer family has one small `LayerHandler` in a registry. A
handler says which kernel axes each structure spans (`plan`) and how to run
the layer on explicitly given kernels (`forward`). Adding a layer type means
writing one handler and registering it with `register_handler`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
from keras import ops

STRUCTURES = ("channel", "filter", "column", "shape", "layer")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where the α of one wrapped layer lives.

    Attributes:
        kernel: Name of the layer attribute holding the kernel that α scales.
        shape: Shape of α: one entry per structure.
        expand: Maps α (of `shape`) to a tensor that broadcasts against the
            kernel, so that `kernel * expand(alpha)` is the effective kernel.
        reduce: The adjoint of `expand`, in numpy: sums a kernel-shaped array
            over each structure's entries, giving an array of `shape` (e.g.
            the squared norm of each structure's weights).
    """

    kernel: str
    shape: tuple[int, ...]
    expand: Callable
    reduce: Callable


def axis_plan(kernel: str, kernel_shape, axes, flat: bool = False) -> Plan:
    """A plan whose α spans the given kernel axes (in kernel order).

    Args:
        kernel: Kernel attribute name.
        kernel_shape: The kernel's shape.
        axes: Kernel axes α spans; `()` gives a single, layer-wide α.
        flat: Store α as one flat vector over the spanned axes (row-major),
            e.g. the `in × depth_multiplier` outputs of a depthwise kernel.
    """
    kernel_shape = tuple(int(d) for d in kernel_shape)
    dims = tuple(kernel_shape[a] for a in axes)
    if not axes:
        shape = (1,)
    elif flat:
        shape = (int(_prod(dims)),)
    else:
        shape = dims
    target = tuple(d if i in axes else 1 for i, d in enumerate(kernel_shape))
    others = tuple(i for i in range(len(kernel_shape)) if i not in axes)

    def reduce(values):
        return np.reshape(np.sum(values, axis=others), shape)

    return Plan(kernel, shape, lambda a: ops.reshape(a, target), reduce)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


class LayerHandler:
    """Rules for one family of layers.

    Attributes:
        kernels: Attribute names of the layer's kernels, in weight order.
        structures: The structures this family supports.
        missing: Why a structure is not supported, by structure name.
    """

    kernels: tuple[str, ...] = ("kernel",)
    structures: tuple[str, ...] = STRUCTURES
    missing: dict[str, str] = {}

    def plan(self, layer: keras.layers.Layer, structure: str) -> Plan:
        """Returns the `Plan` of `structure` for a built `layer`."""
        raise NotImplementedError

    def forward(self, layer, inputs, kernels: dict):
        """Runs `layer` on `inputs` with `kernels`, before bias/activation."""
        raise NotImplementedError

    def finish(self, layer, outputs):
        """Adds the layer's bias and applies its activation."""
        bias = getattr(layer, "bias", None)
        if bias is not None:
            bias = ops.cast(bias, outputs.dtype)
            if getattr(layer, "data_format", "channels_last") == "channels_first":
                ndim = len(outputs.shape)
                bias = ops.reshape(bias, (1, -1) + (1,) * (ndim - 2))
            outputs = ops.add(outputs, bias)
        if layer.activation is not None:
            outputs = layer.activation(outputs)
        return outputs


class ConvHandler(LayerHandler):
    """`Conv1D`, `Conv2D`, `Conv3D`: kernel `(*k, in / groups, filters)`."""

    def plan(self, layer, structure):
        shape = layer.kernel.shape
        rank = layer.rank
        k = tuple(range(rank))
        groups = getattr(layer, "groups", 1)
        if structure == "filter":
            return axis_plan("kernel", shape, (rank + 1,))
        if structure == "shape":
            return axis_plan("kernel", shape, k)
        if structure == "layer":
            return axis_plan("kernel", shape, ())
        if groups == 1:
            axes = (rank,) if structure == "channel" else k + (rank,)
            return axis_plan("kernel", shape, axes)
        return _grouped_plan(layer, structure)

    def forward(self, layer, inputs, kernels):
        padding = layer.padding
        if padding == "causal":
            left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            if layer.data_format == "channels_last":
                inputs = ops.pad(inputs, [[0, 0], [left, 0], [0, 0]])
            else:
                inputs = ops.pad(inputs, [[0, 0], [0, 0], [left, 0]])
            padding = "valid"
        return ops.conv(
            inputs,
            kernels["kernel"],
            strides=list(layer.strides),
            padding=padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )


def _grouped_plan(layer, structure) -> Plan:
    """Input-channel structures of a grouped convolution.

    Input channel `c` lives at kernel index `c % ipg` of the filters of group
    `c // ipg` (`ipg` input channels per group), so α is regrouped and
    repeated over each group's filters.
    """
    shape = tuple(int(d) for d in layer.kernel.shape)
    rank = layer.rank
    groups = layer.groups
    ipg, filters = shape[rank], shape[rank + 1]
    opg = filters // groups
    positions = shape[:rank] if structure == "column" else ()

    def expand(a):
        a = ops.reshape(a, positions + (groups, ipg))
        perm = tuple(range(len(positions))) + (len(positions) + 1, len(positions))
        a = ops.repeat(ops.transpose(a, perm), opg, axis=-1)
        return ops.reshape(a, (positions or (1,) * rank) + (ipg, filters))

    def reduce(values):  # (*k, ipg, filters) -> positions + (groups * ipg,)
        v = np.sum(np.reshape(values, shape[:rank] + (ipg, groups, opg)), axis=-1)
        v = np.swapaxes(v, -1, -2).reshape(shape[:rank] + (groups * ipg,))
        return v if positions else np.sum(v, axis=tuple(range(rank)))

    return Plan("kernel", positions + (ipg * groups,), expand, reduce)


class ConvTransposeHandler(LayerHandler):
    """`Conv1DTranspose`, `Conv2DTranspose`, `Conv3DTranspose`.

    The kernel is `(*k, filters, in)`: output before input.
    """

    def plan(self, layer, structure):
        shape = layer.kernel.shape
        rank = layer.rank
        k = tuple(range(rank))
        axes = {
            "channel": (rank + 1,),
            "filter": (rank,),
            "column": k + (rank + 1,),
            "shape": k,
            "layer": (),
        }[structure]
        return axis_plan("kernel", shape, axes)

    def forward(self, layer, inputs, kernels):
        return ops.conv_transpose(
            inputs,
            kernels["kernel"],
            strides=list(layer.strides),
            padding=layer.padding,
            output_padding=layer.output_padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )


class DepthwiseHandler(LayerHandler):
    """`DepthwiseConv1D`, `DepthwiseConv2D`: kernel `(*k, in, multiplier)`.

    Output channel `c * multiplier + j` comes from input channel `c`.
    """

    def plan(self, layer, structure):
        shape = layer.kernel.shape
        rank = layer.rank
        k = tuple(range(rank))
        if structure == "filter":
            return axis_plan("kernel", shape, (rank, rank + 1), flat=True)
        axes = {
            "channel": (rank,),
            "column": k + (rank,),
            "shape": k,
            "layer": (),
        }[structure]
        return axis_plan("kernel", shape, axes)

    def forward(self, layer, inputs, kernels):
        return ops.depthwise_conv(
            inputs,
            kernels["kernel"],
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )


class SeparableHandler(LayerHandler):
    """`SeparableConv1D`, `SeparableConv2D`: depthwise then pointwise.

    Input-side structures (channel, column, shape) scale the depthwise
    kernel; filter and layer scale the pointwise kernel.
    """

    kernels = ("depthwise_kernel", "pointwise_kernel")

    def plan(self, layer, structure):
        rank = layer.rank
        k = tuple(range(rank))
        if structure in ("filter", "layer"):
            axes = (rank + 1,) if structure == "filter" else ()
            return axis_plan("pointwise_kernel", layer.pointwise_kernel.shape, axes)
        axes = {"channel": (rank,), "column": k + (rank,), "shape": k}[structure]
        return axis_plan("depthwise_kernel", layer.depthwise_kernel.shape, axes)

    def forward(self, layer, inputs, kernels):
        return ops.separable_conv(
            inputs,
            kernels["depthwise_kernel"],
            kernels["pointwise_kernel"],
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )


class DenseHandler(LayerHandler):
    """`Dense` on inputs of any rank: kernel `(in, units)`."""

    structures = ("channel", "filter", "column", "layer")
    missing = {
        "shape": "a Dense kernel has no kernel positions; use 'channel', "
        "'filter', 'column' or 'layer'"
    }

    def plan(self, layer, structure):
        axes = {"channel": (0,), "column": (0,), "filter": (1,), "layer": ()}
        return axis_plan("kernel", layer.kernel.shape, axes[structure])

    def forward(self, layer, inputs, kernels):
        return ops.matmul(inputs, kernels["kernel"])


_REGISTRY: dict[type, LayerHandler] = {}


def register_handler(handler: LayerHandler, *layer_types: type) -> None:
    """Registers `handler` for the exact classes in `layer_types`.

    Example:

    ```python
    class MyConv(keras.layers.Conv2D):  # same math, different defaults
        pass

    keras_psp.structures.register_handler(ConvHandler(), MyConv)
    ```
    """
    for layer_type in layer_types:
        _REGISTRY[layer_type] = handler


def get_handler(layer) -> LayerHandler | None:
    """The handler of `layer`'s exact class, or None if unsupported."""
    return _REGISTRY.get(type(layer))


def supported_layer_types() -> tuple[type, ...]:
    """The layer classes `PSP` can wrap."""
    return tuple(_REGISTRY)


L = keras.layers
register_handler(ConvHandler(), L.Conv1D, L.Conv2D, L.Conv3D)
register_handler(
    ConvTransposeHandler(), L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose
)
register_handler(DepthwiseHandler(), L.DepthwiseConv1D, L.DepthwiseConv2D)
register_handler(SeparableHandler(), L.SeparableConv1D, L.SeparableConv2D)
register_handler(DenseHandler(), L.Dense)
del L
