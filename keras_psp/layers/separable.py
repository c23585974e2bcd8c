"""`SeparableConv1D`, `SeparableConv2D`: depthwise then pointwise.

Input-side structures (channel, column, shape) scale the depthwise kernel;
filter and layer scale the pointwise kernel.
"""

from __future__ import annotations

import numpy as np
from keras import layers as L
from keras import ops
from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv

from keras_psp.copying import copy_layer
from keras_psp.layers.base import Boundary, LayerHandler, axis_plan, kept, op_weights
from keras_psp.layers.convolution import conv_terms, spatial_split
from keras_psp.layers.registry import register_layer


class SeparableHandler(LayerHandler):
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


class SeparableRule(Boundary):
    def connectivity(self, op):
        depthwise, pointwise = op_weights(op)[:2]  # (*k, in, m), (*1, in*m, out)
        reads = np.any(depthwise != 0, axis=tuple(range(depthwise.ndim - 2)))
        mixes = pointwise.reshape(pointwise.shape[-2:]) != 0
        c_in, m = reads.shape
        return np.any(reads.reshape(c_in, m, 1) & mixes.reshape(c_in, m, -1), axis=1)

    def rebuild(self, op, present_in, present_out, bias=None):
        keep_in, keep_out = present_in[0], present_out[0]
        m = op.layer.depth_multiplier
        weights = op_weights(op)
        weights[0] = kept(weights[0], keep_in, axis=-2)
        weights[1] = kept(kept(weights[1], np.repeat(keep_in, m), axis=-2), keep_out)
        if op.layer.use_bias:
            weights[2] = weights[2][keep_out]
        return copy_layer(op.layer, filters=int(keep_out.sum())), weights


def separable_macs(layer, input_shape, output_shape):
    positions, channels, kernel = conv_terms(layer, input_shape, output_shape)
    # Depthwise (kernel MACs per channel), then pointwise (filters per channel).
    filters = spatial_split(layer, output_shape)[1]
    return positions * channels * layer.depth_multiplier * (kernel + filters)


register_layer(L.SeparableConv1D, L.SeparableConv2D, handler=SeparableHandler(),
               rule=SeparableRule(), macs=separable_macs)
register_layer(BaseSeparableConv, macs=separable_macs)
