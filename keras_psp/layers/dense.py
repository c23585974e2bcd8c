"""`Dense` on inputs of any rank: kernel `(in, units)`."""

from __future__ import annotations

import math

from keras import layers as L
from keras import ops

from keras_psp.layers.base import Boundary, LayerHandler, axis_plan, kept, op_weights
from keras_psp.layers.registry import register_layer


class DenseHandler(LayerHandler):
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


class DenseRule(Boundary):
    def connectivity(self, op):
        return op_weights(op)[0] != 0

    def folds(self, layer):
        return True

    def fold(self, op, values):
        return values @ op_weights(op)[0].astype("float64")

    @staticmethod
    def sliced(op, keep_in, keep_out, has_bias: bool) -> list:
        """The layer's weights: kernel `(in, out)` and bias sliced."""
        weights = op_weights(op)
        weights[0] = kept(kept(weights[0], keep_in, axis=0), keep_out, axis=1)
        if has_bias:
            weights[1] = weights[1][keep_out]
        return weights

    def rebuild(self, op, present_in, present_out, bias=None):
        keep_in, keep_out = present_in[0], present_out[0]
        weights = self.sliced(op, keep_in, keep_out, op.layer.use_bias)
        return self.with_bias(op, weights, keep_out, bias, units=int(keep_out.sum()))


def dense_macs(layer, input_shape, output_shape):
    return math.prod(input_shape[1:-1]) * int(input_shape[-1]) * int(output_shape[-1])


register_layer(L.Dense, handler=DenseHandler(), rule=DenseRule(), macs=dense_macs)
