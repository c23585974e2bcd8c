"""`Conv1D`, `Conv2D`, `Conv3D` (grouped included): kernel `(*k, in / groups, filters)`."""

from __future__ import annotations

import math

import numpy as np
from keras import layers as L
from keras import ops
from keras.src.layers.convolutional.base_conv import BaseConv

from keras_psp.layers.base import Boundary, LayerHandler, Plan, axis_plan, kept, op_weights
from keras_psp.layers.registry import register_layer


def spatial_split(layer, shape: tuple) -> tuple[int, int]:
    """(number of spatial positions, channels) of a conv input or output."""
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return math.prod(shape[2:]), int(shape[1])
    return math.prod(shape[1:-1]), int(shape[-1])


def conv_terms(layer, input_shape, output_shape) -> tuple[int, int, int]:
    """(output positions, input channels, kernel positions) of a convolution."""
    positions = spatial_split(layer, output_shape)[0]
    return positions, spatial_split(layer, input_shape)[1], math.prod(layer.kernel_size)


class ConvHandler(LayerHandler):
    """α of a convolution's input channels, filters, columns, kernel positions."""

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


class ConvRule(Boundary):
    """Cuts input channels and filters; grouped convolutions keep every channel."""

    def applies(self, layer, in_shapes, out_shapes):
        return layer.groups == 1

    def connectivity(self, op):
        kernel = op_weights(op)[0]
        return kernel.reshape(-1, *kernel.shape[-2:]).any(axis=0)

    def folds(self, layer):
        return layer.padding == "valid" or all(k == 1 for k in layer.kernel_size)

    def fold(self, op, values):
        kernel = op_weights(op)[0].astype("float64")
        return values @ kernel.sum(axis=tuple(range(kernel.ndim - 2)))

    def rebuild(self, op, present_in, present_out, bias=None):
        keep_in, keep_out = present_in[0], present_out[0]
        weights = op_weights(op)
        weights[0] = kept(kept(weights[0], keep_in, axis=-2), keep_out)
        if op.layer.use_bias:
            weights[1] = weights[1][keep_out]
        return self.with_bias(op, weights, keep_out, bias, filters=int(keep_out.sum()))


def conv_macs(layer, input_shape, output_shape):
    positions, channels, kernel = conv_terms(layer, input_shape, output_shape)
    return positions * kernel * (channels // layer.groups) * spatial_split(layer, output_shape)[1]


register_layer(L.Conv1D, L.Conv2D, L.Conv3D, handler=ConvHandler(), rule=ConvRule(),
               macs=conv_macs)
register_layer(BaseConv, macs=conv_macs)  # other subclasses of Keras's base: cost only
