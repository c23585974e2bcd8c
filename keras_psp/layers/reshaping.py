"""`Flatten` (channels last: channel `c` → outputs `p * C + c`) and `Reshape`s
that keep the channel axis last (`Reshape((1, 1, C))`)."""

from __future__ import annotations

import numpy as np
from keras import layers as L

from keras_psp.copying import copy_layer
from keras_psp.layers.base import Passthrough, Rule
from keras_psp.layers.registry import register_layer


class FlattenRule(Rule):
    """Channels-last Flatten: input channel `c` → outputs `p * C + c`."""

    def applies(self, layer, in_shapes, out_shapes):
        return len(in_shapes[0]) >= 2

    def edges(self, op, shapes):
        channels = shapes[op.inputs[0]][-1]
        total = shapes[op.outputs[0]][-1]
        outputs = np.arange(total)
        return [(0, outputs % channels, 0, outputs)]

    def constant(self, op, const_in, shapes):
        return [np.tile(const_in[0], shapes[op.outputs[0]][-1] // len(const_in[0]))]


class ReshapeRule(Passthrough):
    """`Reshape` that keeps the channel axis last, as `Reshape((1, 1, C))`."""

    width_in_config = True

    def applies(self, layer, in_shapes, out_shapes):
        return in_shapes[0][-1] == out_shapes[0][-1] == layer.target_shape[-1]

    def rebuild(self, op, present_in, present_out):
        target = tuple(op.layer.target_shape[:-1]) + (int(present_out[0].sum()),)
        return copy_layer(op.layer, target_shape=target), None


register_layer(L.Flatten, rule=FlattenRule())
register_layer(L.Reshape, rule=ReshapeRule())
