"""`DepthwiseConv1D`, `DepthwiseConv2D`: kernel `(*k, in, multiplier)`.

Output channel `c * multiplier + j` comes from input channel `c`.
"""

from __future__ import annotations

import numpy as np
from keras import layers as L
from keras import ops
from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv

from keras_psp.copying import copy_layer
from keras_psp.layers.base import LayerHandler, Rule, axis_plan, kept, op_weights
from keras_psp.layers.convolution import conv_terms
from keras_psp.layers.registry import register_layer


class DepthwiseHandler(LayerHandler):
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


class DepthwiseRule(Rule):
    """Input channel `c` feeds outputs `c * m ... c * m + m - 1`."""

    def edges(self, op, shapes):
        channels = shapes[op.inputs[0]][-1]
        m = op.layer.depth_multiplier
        return [(0, np.repeat(np.arange(channels), m), 0, np.arange(channels * m))]

    def rebuild(self, op, present_in, present_out):
        keep = present_in[0]
        weights = op_weights(op)
        weights[0] = kept(weights[0], keep, axis=-2)
        if op.layer.use_bias:
            m = op.layer.depth_multiplier
            weights[1] = weights[1].reshape(-1, m)[keep].ravel()
        return copy_layer(op.layer), weights


def depthwise_macs(layer, input_shape, output_shape):
    positions, channels, kernel = conv_terms(layer, input_shape, output_shape)
    return positions * kernel * channels * layer.depth_multiplier


register_layer(L.DepthwiseConv1D, L.DepthwiseConv2D, handler=DepthwiseHandler(),
               rule=DepthwiseRule(), macs=depthwise_macs)
register_layer(BaseDepthwiseConv, macs=depthwise_macs)
