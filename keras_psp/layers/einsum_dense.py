"""`EinsumDense`: a `Dense` written as an einsum, and its cost in general.

An `EinsumDense` whose equation is a dense layer on the last axis
(`"btd,df->btf"`, `"...d,de->...e"`, `"abc,cd->abd"`: the input's last axis
contracted with a 2-D kernel `(in, out)`, every other axis passed on in
order, a bias on the output axis or none) is wrapped, cut and slimmed
exactly like `Dense`: `"channel"` (input features), `"filter"` (outputs),
`"column"` (= input features) and `"layer"`; the slim layer has a smaller
`output_shape`. Other equations (the per-head projections of an attention
layer) keep every channel; all count one MAC per combination of the
equation's indices, the batch excepted.
"""

from __future__ import annotations

import math

from keras import layers as L
from keras import ops

from keras_psp.copying import copy_layer
from keras_psp.layers.dense import DenseHandler, DenseRule
from keras_psp.layers.registry import register_layer


def dense_axes(layer) -> tuple[str, str] | None:
    """`(input letter, output letter)` of an `EinsumDense` that is a dense
    layer on the last axis, else None."""
    equation = layer.equation.replace(" ", "")
    inputs, rest = equation.split(",")
    kernel, output = rest.split("->")
    if len(kernel) != 2 or "..." in kernel:
        return None
    k_in, k_out = kernel
    passed = inputs[:-1]
    if not inputs or inputs[-1] != k_in or output != passed + k_out or k_in in output:
        return None
    if k_out in passed or (layer.bias_axes not in (None, k_out)):
        return None
    return k_in, k_out


class EinsumDenseHandler(DenseHandler):
    """α on the kernel `(in, out)` of a dense-form `EinsumDense`."""

    def fits(self, layer) -> str | None:
        if dense_axes(layer) is None:
            return (f"its equation {layer.equation!r} is not a dense layer on the last axis "
                    "(such as 'btd,df->btf')")
        return None

    def forward(self, layer, inputs, kernels):
        return ops.einsum(layer.equation, inputs, kernels["kernel"])


class EinsumDenseRule(DenseRule):
    """A dense-form `EinsumDense` shrinks as `Dense` does; others keep their channels."""

    def applies(self, layer, in_shapes, out_shapes):
        return dense_axes(layer) is not None

    def rebuild(self, op, present_in, present_out, bias=None):
        layer, keep_in, keep_out = op.layer, present_in[0], present_out[0]
        weights = self.sliced(op, keep_in, keep_out, layer.bias is not None)
        output_shape = list(layer.partial_output_shape)
        output_shape[-1] = int(keep_out.sum())
        updates = {"output_shape": tuple(output_shape)}
        if bias is not None and bias[keep_out].any():
            extra = bias[keep_out].astype(weights[0].dtype)
            if layer.bias is not None:
                weights[1] = weights[1] + extra
            else:
                updates["bias_axes"] = dense_axes(layer)[1]
                weights.append(extra)
        return copy_layer(layer, **updates), weights


def _letters(spec: str, shape) -> tuple[str, list, list]:
    """`(letters, their sizes, the sizes "..." covers)` of one einsum operand."""
    shape = list(shape)
    if "..." not in spec:
        return spec, shape, []
    head, tail = spec.split("...")
    covered = len(shape) - len(head) - len(tail)
    return (head + tail, shape[:len(head)] + shape[len(head) + covered:],
            shape[len(head):len(head) + covered])


def einsum_macs(layer, input_shape, output_shape) -> int:
    """One multiply-accumulate per combination of the equation's letters,
    the batch (the input's first axis) excepted. Sizes come from the input
    and output shapes first, so that a layer `slim` narrows counts as built."""
    inputs, rest = layer.equation.replace(" ", "").split(",")
    kernel, output = rest.split("->")
    letters, sizes, broadcast = _letters(inputs, input_shape)
    batch = letters[0] if not inputs.startswith("...") else None
    leading = math.prod(int(d) for d in broadcast[1:] if d is not None)
    known = dict(zip(letters, sizes, strict=True))
    out_letters, out_sizes, _ = _letters(output, output_shape)
    for letter, size in zip(out_letters, out_sizes, strict=True):
        known.setdefault(letter, size)
    kernel_letters = kernel.replace("...", "")
    for letter, size in zip(kernel_letters, layer.kernel.shape, strict=True):
        known.setdefault(letter, size)
    if batch is not None:
        known[batch] = 1
    return leading * math.prod(int(known[c]) for c in set(letters) | set(kernel_letters))


register_layer(L.EinsumDense, handler=EinsumDenseHandler(), rule=EinsumDenseRule(),
               macs=einsum_macs)
