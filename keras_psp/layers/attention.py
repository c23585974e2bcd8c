"""Attention and its projections: `EinsumDense` and `MultiHeadAttention` (cost).

`count_flops` counts an `EinsumDense` as the product of its equation's
dimensions, and a `MultiHeadAttention` as its four projections plus the two
attention matmuls (scores `QKᵀ` and their weighted sum of `V`): softmax and
dropout count zero, as BN and activations do. Surgery keeps every channel
through both (their heads and widths get no α yet), and `slim` says so.
"""

from __future__ import annotations

import math

from keras import layers as L

from keras_psp.layers.registry import register_layer


def by_name(fn):
    """Marks a MAC function that takes the shapes of the call's arguments by
    parameter name (`{"query": shape, "value": shape, ...}`, tensors only)
    instead of the first input's shape."""
    fn.by_name = True
    return fn


def einsum_macs(layer, input_shape, output_shape) -> int:
    """One multiply-accumulate per combination of the equation's letters,
    the batch (the input's first axis) excepted."""
    equation = layer.equation.replace(" ", "")
    inputs, rest = equation.split(",")
    kernel, _ = rest.split("->")
    shape = list(input_shape)
    leading = 1
    if "..." in inputs:
        explicit = inputs.replace("...", "")
        covered = len(shape) - len(explicit)
        leading = math.prod(int(d) for d in shape[1:covered])
        inputs, shape = explicit, shape[covered:]
    else:
        shape[0] = 1  # the batch
    sizes = dict(zip(inputs, shape, strict=True))
    sizes.update(zip(kernel.replace("...", ""), layer.kernel.shape, strict=True))
    return leading * math.prod(int(sizes[c]) for c in set(inputs) | set(kernel))


@by_name
def attention_macs(layer, arguments, output_shape) -> int:
    """Projections of query, key and value, scores, weighted sum, output."""
    query = arguments["query"]
    value = arguments.get("value", query)
    key = arguments.get("key") or value
    heads, key_dim = int(layer.num_heads), int(layer.key_dim)
    value_dim = int(layer.value_dim or layer.key_dim)
    q = tuple(query[:-1]) + (heads, key_dim)  # (B, Tq..., heads, key_dim)
    v = tuple(value[:-1]) + (heads, value_dim)
    positions_q = math.prod(int(d) for d in query[1:-1])
    positions_v = math.prod(int(d) for d in value[1:-1])
    total = (einsum_macs(layer._query_dense, query, q)
             + einsum_macs(layer._key_dense, key, None)
             + einsum_macs(layer._value_dense, value, v))
    total += heads * positions_q * positions_v * (key_dim + value_dim)
    projected = tuple(q[:-1]) + (value_dim,)
    return total + einsum_macs(layer._output_dense, projected, output_shape)


register_layer(L.EinsumDense, macs=einsum_macs)
register_layer(L.MultiHeadAttention, macs=attention_macs)
