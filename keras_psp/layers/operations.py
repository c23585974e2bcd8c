"""`keras.ops` operations recorded in functional graphs (`x * 2`, `ops.gelu(x)`,
the mask arithmetic of an opened composite layer).

Element-wise functions of one tensor carry channel `c` to channel `c`, and so
do reductions over axes other than the channels (`ops.mean(x, axis=(1, 2))`
of a squeeze-and-excitation block). Binary arithmetic is a merge
(`keras_psp.layers.merging`). Every other operation keeps all its channels,
which is exact.

`ops.einsum` and `ops.matmul` (attention scores and their weighted sum, in a
graph or inside a composite layer's call) count one MAC per combination of
their operands' indices, the batch excepted; other operations count zero.
"""

from __future__ import annotations

import math

from keras.src.ops import core, nn
from keras.src.ops import math as kmath
from keras.src.ops import numpy as knp

from keras_psp.layers.base import Passthrough
from keras_psp.layers.registry import register_layer

#: Element-wise functions of one tensor.
ELEMENTWISE = tuple(
    getattr(module, name)
    for module, names in (
        (nn, ("Relu", "Relu6", "Sigmoid", "Softplus", "Softsign", "Silu", "LogSigmoid",
              "LeakyRelu", "HardSigmoid", "HardSilu", "Elu", "Selu", "Gelu", "Celu",
              "TanhShrink", "HardTanh", "SoftShrink", "HardShrink", "Squareplus")),
        (knp, ("Absolute", "Negative", "Square", "Sqrt", "Exp", "Expm1", "Log", "Log1p",
               "Tanh", "Sin", "Cos", "Sign", "Clip", "Reciprocal", "Round", "Floor", "Ceil")),
        (core, ("Cast", "StopGradient")),
        (kmath, ("Erf", "Rsqrt")),
    )
    for name in names
    if hasattr(module, name)
)


class Reduction(Passthrough):
    """A reduction (mean, sum, max, min) over axes that leave the channels."""

    def applies(self, layer, in_shapes, out_shapes):
        axis = getattr(layer, "axis", None)
        if axis is None:
            return False  # over everything
        rank = len(in_shapes[0])
        axes = {a % rank for a in ((axis,) if isinstance(axis, int) else axis)}
        return rank - 1 not in axes and out_shapes[0][-1] == in_shapes[0][-1]


def all_inputs(fn):
    """Marks a MAC function that takes the shapes of all the call's tensor
    arguments (a list, in call order) instead of the first one's."""
    fn.all_inputs = True
    return fn


def _size(d) -> int:
    return 1 if d is None else int(d)  # None: the batch


def einsum_shape_macs(equation: str, shapes: list[tuple]) -> int:
    """MACs of `einsum(equation, *operands)` with operands of `shapes`: the
    product of every index's size (`...` broadcast), the batch's (None) excepted."""
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    sizes, ellipsis = {}, []
    for spec, shape in zip(inputs, shapes, strict=True):
        if "..." in spec:
            head, tail = spec.split("...")
            covered = len(shape) - len(head) - len(tail)
            ellipsis.append(shape[len(head):len(head) + covered])
            spec, shape = head + tail, shape[:len(head)] + shape[len(head) + covered:]
        for letter, d in zip(spec, shape, strict=True):
            sizes[letter] = max(sizes.get(letter, 1), _size(d))
    broadcast = max(ellipsis, key=len, default=())
    return math.prod(sizes.values()) * math.prod(_size(d) for d in broadcast)


@all_inputs
def einsum_macs(op, input_shapes, output_shape) -> int:
    return einsum_shape_macs(op.subscripts, input_shapes)


def matmul_shape_macs(a: tuple, b: tuple) -> int:
    """MACs of `matmul(a, b)`: the broadcast batch dimensions times m·k·n."""
    if len(a) < 2 or len(b) < 2:  # a vector: one dot product per output
        return math.prod(_size(d) for d in a) * (_size(b[-1]) if len(b) > 1 else 1)
    batch = [max(_size(x), _size(y)) for x, y in zip(a[-3::-1], b[-3::-1], strict=False)]
    batch += [_size(d) for d in (a if len(a) > len(b) else b)[:-2][: -len(batch) or None]]
    return math.prod(batch) * _size(a[-2]) * _size(a[-1]) * _size(b[-1])


@all_inputs
def matmul_macs(op, input_shapes, output_shape) -> int:
    return matmul_shape_macs(*input_shapes[:2])


register_layer(knp.Einsum, macs=einsum_macs)
register_layer(knp.Matmul, macs=matmul_macs)
register_layer(*ELEMENTWISE, rule=Passthrough())
register_layer(knp.Mean, knp.Sum, knp.Max, knp.Min, rule=Reduction())
