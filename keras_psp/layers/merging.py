"""Merges: `Add`, `Subtract`, `Multiply`, `Average`, `Maximum`, `Minimum` (and
the `x + y` operations of KerasTensors), which force one channel set on all
their inputs; `Concatenate`, which maps channels by offset."""

from __future__ import annotations

import numpy as np
from keras import layers as L

from keras_psp.copying import copy_layer
from keras_psp.layers.base import Fixed, Rule
from keras_psp.layers.registry import register_layer

_AFFINE_MERGES = {"Add", "Subtract", "Average", "Multiply"}


class Merge(Rule):
    """Element-wise merges: one channel set for every input and the output."""

    def applies(self, layer, in_shapes, out_shapes):
        return all(s[-1] == out_shapes[0][-1] for s in in_shapes)  # no broadcasting

    def edges(self, op, shapes):
        channels = np.arange(shapes[op.outputs[0]][-1])
        return [(i, channels, 0, channels) for i in range(len(op.inputs))]

    def constant(self, op, const_in, shapes):
        return [np.logical_and.reduce(const_in)]

    def constant_inputs(self, op, const_in, shapes) -> list[int]:
        """Inputs constant everywhere that `without_constants` can drop.

        `x + c`, `x - c`, `c - x`, `mean(x, c)` and `x * c` are `x * scale +
        offset`; dropping the constant input removes the branch behind it (a
        residual branch whose layer was cut). Maximum and Minimum keep theirs.
        """
        drop = [i for i, const in enumerate(const_in) if const.all()]
        rest = [key for i, key in enumerate(op.inputs) if i not in drop]
        if type(op.layer).__name__ not in _AFFINE_MERGES or not drop or not rest:
            return []
        if any(shapes[key] != shapes[op.outputs[0]] for key in rest):
            return []  # the kept inputs must not rely on broadcasting
        return drop

    def without_constants(self, op, tensors, drop, values):
        """Rebuilds the merge on `tensors`, folding constant inputs `values`.

        Args:
            op: The merge's `Op`.
            tensors: The new tensors of the inputs that stay.
            drop: Indices of the dropped inputs.
            values: Their per-channel values, over the kept output channels.
        """
        kind, n, k = type(op.layer).__name__, len(op.inputs), len(tensors)
        x = tensors[0] if k == 1 else copy_layer(op.layer)(tensors)
        scale, offset = np.float64(1.0), np.sum(values, axis=0)
        if kind == "Subtract" and drop == [0]:
            scale = np.float64(-1.0)
        elif kind == "Subtract":
            offset = -offset
        elif kind == "Average":
            scale, offset = np.float64(k / n), offset / n
        elif kind == "Multiply":
            scale, offset = np.prod(values, axis=0), np.zeros_like(offset)
        if np.all(scale == 1) and not np.any(offset):
            return x
        as_config = lambda v: float(v) if np.ndim(v) == 0 else v.astype("float32")  # noqa: E731
        return L.Rescaling(
            scale=as_config(scale), offset=as_config(offset), name=f"{op.layer.name}_const"
        )(x)


class Concat(Rule):
    """`Concatenate` on the last axis: input `i`'s channels at its offset."""

    def applies(self, layer, in_shapes, out_shapes):
        return layer.axis in (-1, len(in_shapes[0]) - 1)

    def edges(self, op, shapes):
        out, offset = [], 0
        for i, key in enumerate(op.inputs):
            size = shapes[key][-1]
            out.append((i, np.arange(size), 0, np.arange(offset, offset + size)))
            offset += size
        return out

    def constant(self, op, const_in, shapes):
        return [np.concatenate(const_in)]


register_layer(L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum, rule=Merge())
register_layer(L.Concatenate, rule=Concat())


def _register_optional() -> None:
    """Merges outside the public API, when this Keras has them."""
    try:  # `x + y` on KerasTensors records keras.ops operations
        from keras.src.ops import numpy as knp

        register_layer(knp.Add, knp.Subtract, knp.Multiply, knp.Maximum, knp.Minimum,
                       rule=Merge())
    except (ImportError, AttributeError):
        pass
    try:  # InceptionResNetV2's residual `x + scale * branch`
        from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

        register_layer(CustomScaleLayer, rule=Merge())
    except ImportError:
        pass
    try:  # ConvNeXt's per-channel scale; its channels are pinned by LayerNorm
        from keras.src.applications.convnext import LayerScale

        register_layer(LayerScale, rule=Fixed())
    except ImportError:
        pass


_register_optional()
