"""`Conv1DTranspose`, `Conv2DTranspose`, `Conv3DTranspose`: kernel `(*k, filters, in)`,
output before input."""

from __future__ import annotations

import math

from keras import layers as L
from keras import ops
from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose

from keras_psp.copying import copy_layer
from keras_psp.layers.base import Boundary, LayerHandler, axis_plan, kept, op_weights
from keras_psp.layers.convolution import spatial_split
from keras_psp.layers.registry import register_layer


class ConvTransposeHandler(LayerHandler):
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


class ConvTransposeRule(Boundary):
    def connectivity(self, op):
        kernel = op_weights(op)[0]  # (*k, out, in)
        return kernel.reshape(-1, *kernel.shape[-2:]).any(axis=0).T

    def rebuild(self, op, present_in, present_out, bias=None):
        keep_in, keep_out = present_in[0], present_out[0]
        weights = op_weights(op)
        weights[0] = kept(kept(weights[0], keep_out, axis=-2), keep_in)
        if op.layer.use_bias:
            weights[1] = weights[1][keep_out]
        return copy_layer(op.layer, filters=int(keep_out.sum())), weights


def conv_transpose_macs(layer, input_shape, output_shape):
    # Every input position scatters one kernel per filter.
    positions, channels = spatial_split(layer, input_shape)
    return (positions * math.prod(layer.kernel_size) * channels
            * spatial_split(layer, output_shape)[1])


register_layer(L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose,
               handler=ConvTransposeHandler(), rule=ConvTransposeRule(),
               macs=conv_transpose_macs)
register_layer(BaseConvTranspose, macs=conv_transpose_macs)
