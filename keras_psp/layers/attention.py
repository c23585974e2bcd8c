"""Attention: `MultiHeadAttention` heads, value and key dimensions.

`PSP(MultiHeadAttention(...), structure="head")` gives every head one α,
which scales the head's slice of the output projection: the head's whole
contribution to the layer's output. A head whose α is cut contributes
nothing, and `slim` rebuilds the layer with `num_heads` reduced and the
matching slices of its query, key, value (and gate) projections removed;
the other heads, softmax included, compute exactly what they did.
`structure="value"` and `"key"` cut dimensions of every head's values
(`value_dim`) and of its queries and keys (`key_dim`) the same way. The
layer's input and output channels are kept.

`count_flops` counts a `MultiHeadAttention` as its four projections plus the
two attention matmuls (scores `QKᵀ` and their weighted sum of `V`): softmax
and dropout count zero, as BN and activations do.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from keras import layers as L
from keras import ops
from keras.src import backend

from keras_psp.copying import copy_layer
from keras_psp.layers.base import (
    KERNEL_STRUCTURES,
    Fixed,
    LayerHandler,
    Plan,
    axis_plan,
    kept,
    op_weights,
)
from keras_psp.layers.registry import register_layer

#: The output projection's kernel, `(heads, value_dim, *output)`: α of heads
#: scales axis 0, α of value dimensions axis 1.
OUTPUT_KERNEL = "_output_dense.kernel"
#: The query projection, `(in, heads, key_dim)` and `(heads, key_dim)`: α of
#: key dimensions scales the query's last axis, kernel and bias alike.
QUERY_KERNEL, QUERY_BIAS = "_query_dense.kernel", "_query_dense.bias"


@dataclasses.dataclass(frozen=True)
class _QueryPlan(Plan):
    """α per key dimension: one scale on the query kernel's and bias's last axis."""

    def scales(self, alpha) -> dict:
        if isinstance(alpha, np.ndarray):  # numpy in, numpy out (offline folding)
            scale = np.reshape(alpha, (-1,))
        else:
            scale = ops.reshape(alpha, (-1,))
        return {QUERY_KERNEL: scale, QUERY_BIAS: scale}


class AttentionHandler(LayerHandler):
    """α per head, per value dimension or per key dimension of a
    `MultiHeadAttention`.

    `"head"` scales a head's slice of the output projection (its whole
    contribution); `"value"` one dimension of every head's value, through
    the output projection's rows that read it; `"key"` one dimension of every
    head's query (kernel and bias), so a cut one adds nothing to the
    attention scores. `forward` runs the layer's own attention (masks,
    causal mask, dropout, gate) with the scaled query and output kernels.
    """

    kernels = (OUTPUT_KERNEL, QUERY_KERNEL, QUERY_BIAS)
    structures = ("head", "value", "key")
    missing = {s: "a MultiHeadAttention is pruned by heads ('head') or by dimensions of its "
                  "values ('value') or keys ('key')" for s in KERNEL_STRUCTURES}
    call_arguments = True

    def plan(self, layer, structure):
        output = layer._output_dense.kernel.shape
        if structure == "head":
            return axis_plan(OUTPUT_KERNEL, output, (0,))
        if structure == "value":
            return axis_plan(OUTPUT_KERNEL, output, (1,))
        query = axis_plan(QUERY_KERNEL, layer._query_dense.kernel.shape, (2,))
        return _QueryPlan(QUERY_KERNEL, query.shape, query.expand, query.reduce)

    def build(self, layer, input_shape):
        layer.build(input_shape, input_shape)  # self-attention; build it first for cross-attention

    def forward(self, layer, query, kernels, value=None, key=None, query_mask=None,
                value_mask=None, key_mask=None, attention_mask=None,
                return_attention_scores=False, training=None, use_causal_mask=False):
        value = query if value is None else value
        key = value if key is None else key
        query_mask = backend.get_keras_mask(query)
        attention_mask = layer._compute_attention_mask(
            query, value, query_mask=query_mask, value_mask=value_mask, key_mask=key_mask,
            attention_mask=attention_mask, use_causal_mask=use_causal_mask)
        gate = layer._gate_dense(query) if layer._use_gate else None
        projected = ops.einsum(layer._query_dense.equation, query, kernels[QUERY_KERNEL])
        if kernels.get(QUERY_BIAS) is not None:
            projected = ops.add(projected, kernels[QUERY_BIAS])
        heads, scores = layer._compute_attention(
            projected, layer._key_dense(key), layer._value_dense(value),
            attention_mask, training, return_attention_scores)
        if gate is not None:
            heads = ops.multiply(heads, gate)
        dense = layer._output_dense
        outputs = ops.einsum(dense.equation, heads, kernels[OUTPUT_KERNEL])
        if dense.bias is not None:
            outputs = ops.add(outputs, ops.cast(dense.bias, outputs.dtype))
        if query_mask is not None:
            backend.set_keras_mask(outputs, query_mask)
        return (outputs, scores) if return_attention_scores else outputs

    def finish(self, layer, outputs):
        return outputs  # the output projection's bias is in `forward`


def _alive(array: np.ndarray, axis: int) -> np.ndarray:
    """Bool per index of `axis`: True where some entry is not zero."""
    return np.moveaxis(np.abs(array), axis, 0).reshape(array.shape[axis], -1).max(axis=1) > 0


class AttentionRule(Fixed):
    """Keeps every channel in and out; drops heads, value dimensions and key
    dimensions whose weights are zero (α folded in) from all the projections,
    with `num_heads`, `value_dim` and `key_dim` reduced.

    A head is cut when its output slice is zero, a value dimension when the
    output rows that read it are, a key dimension when the query's kernel and
    bias are zero on it (the new layer's query is scaled so that its smaller
    `1/sqrt(key_dim)` gives the same scores). Heads stay when the call
    returns the attention scores (their shape names the heads); one of each
    stays when all are cut, so the layer is valid.
    """

    @staticmethod
    def keep(op) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bool per head, per key dimension and per value dimension: True where kept."""
        layer = op.layer
        weights = dict(zip((id(v) for v in layer.weights), op_weights(op), strict=True))
        output = weights[id(layer._output_dense.kernel)]
        heads, values = _alive(output, 0), _alive(output, 1)
        keys = _alive(weights[id(layer._query_dense.kernel)], 2)
        if layer._query_dense.bias is not None:
            keys |= _alive(weights[id(layer._query_dense.bias)], 1)
        if len(op.outputs) > 1:
            heads[:] = True
        for alive in (heads, keys, values):
            if not alive.any():
                alive[0] = True
        return heads, keys, values

    def shrunk(self, op):
        heads, keys, values = self.keep(op)
        return {"num_heads": int(heads.sum()), "key_dim": int(keys.sum()),
                "value_dim": int(values.sum())}

    def rebuild(self, op, present_in, present_out):
        layer = op.layer
        weights = op_weights(op)
        heads, keys, values = self.keep(op)
        if heads.all() and keys.all() and values.all():
            return copy_layer(layer), weights
        cuts = {}  # per variable: (mask, axis) pairs
        projections = [(layer._query_dense, keys), (layer._key_dense, keys),
                       (layer._value_dense, values), (getattr(layer, "_gate_dense", None), values)]
        for dense, dims in projections:
            if dense is not None:
                cuts[id(dense.kernel)] = [(heads, 1), (dims, 2)]  # (in, heads, dim)
                if dense.bias is not None:
                    cuts[id(dense.bias)] = [(heads, 0), (dims, 1)]  # (heads, dim)
        cuts[id(layer._output_dense.kernel)] = [(heads, 0), (values, 1)]  # (heads, dim, out)
        scale = np.sqrt(keys.sum() / keys.size)  # 1/sqrt(key_dim) of the new layer
        query = {id(layer._query_dense.kernel)}
        if layer._query_dense.bias is not None:
            query.add(id(layer._query_dense.bias))
        sliced = []
        for variable, value in zip(layer.weights, weights, strict=True):
            for keep, axis in cuts.get(id(variable), ()):
                value = kept(value, keep, axis=axis)
            if id(variable) in query and not keys.all():
                value = (value * scale).astype(value.dtype)
            sliced.append(value)
        return copy_layer(layer, **self.shrunk(op)), sliced


def by_name(fn):
    """Marks a MAC function that takes the shapes of the call's arguments by
    parameter name (`{"query": shape, "value": shape, ...}`, tensors only)
    instead of the first input's shape."""
    fn.by_name = True
    return fn


@by_name
def attention_macs(layer, arguments, output_shape) -> int:
    """Projections of query, key and value (and the gate), scores, weighted
    sum, output projection; from `num_heads`, so that a layer with heads cut
    counts as the one `slim` builds."""
    query = arguments["query"]
    value = arguments.get("value", query)
    key = arguments.get("key") or value
    heads, key_dim = int(layer.num_heads), int(layer.key_dim)
    value_dim = int(layer.value_dim or layer.key_dim)
    rank = len(query)

    def positions(shape):
        return math.prod(int(d) for d in shape[1:-1])

    total = positions(query) * int(query[-1]) * heads * key_dim
    total += positions(key) * int(key[-1]) * heads * key_dim
    total += positions(value) * int(value[-1]) * heads * value_dim
    if getattr(layer, "_use_gate", False):
        total += positions(query) * int(query[-1]) * heads * value_dim
    total += heads * positions(query) * positions(value) * (key_dim + value_dim)
    out = math.prod(int(d) for d in output_shape[rank - 1:])
    return total + positions(query) * heads * value_dim * out


register_layer(L.MultiHeadAttention, handler=AttentionHandler(), rule=AttentionRule(),
               macs=attention_macs)
