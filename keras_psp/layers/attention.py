"""Attention: `MultiHeadAttention` heads.

`PSP(MultiHeadAttention(...), structure="head")` gives every head one α,
which scales the head's slice of the output projection: the head's whole
contribution to the layer's output. A head whose α is cut contributes
nothing, and `slim` rebuilds the layer with `num_heads` reduced and the
matching slices of its query, key, value (and gate) projections removed;
the other heads, softmax included, compute exactly what they did. The layer's
input and output channels are kept.

`count_flops` counts a `MultiHeadAttention` as its four projections plus the
two attention matmuls (scores `QKᵀ` and their weighted sum of `V`): softmax
and dropout count zero, as BN and activations do.
"""

from __future__ import annotations

import math

import numpy as np
from keras import layers as L
from keras import ops
from keras.src import backend

from keras_psp.copying import copy_layer
from keras_psp.layers.base import KERNEL_STRUCTURES, Fixed, LayerHandler, axis_plan, op_weights
from keras_psp.layers.registry import register_layer

#: The output projection's kernel, `(heads, value_dim, *output)`: α scales axis 0.
OUTPUT_KERNEL = "_output_dense.kernel"


class AttentionHandler(LayerHandler):
    """α per head of a `MultiHeadAttention`, on its output projection.

    `forward` runs the layer's own attention (masks, causal mask, dropout,
    gate) and projects the heads' outputs with the α-scaled kernel.
    """

    kernels = (OUTPUT_KERNEL,)
    structures = ("head",)
    missing = {s: "a MultiHeadAttention is pruned by whole heads; use structure='head'"
               for s in KERNEL_STRUCTURES}
    call_arguments = True

    def plan(self, layer, structure):
        return axis_plan(OUTPUT_KERNEL, layer._output_dense.kernel.shape, (0,))

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
        heads, scores = layer._compute_attention(
            layer._query_dense(query), layer._key_dense(key), layer._value_dense(value),
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


class AttentionRule(Fixed):
    """Keeps every channel in and out; drops the heads whose output slice is
    zero (α folded in) from all the projections, with `num_heads` reduced.

    Heads stay when the call returns the attention scores (their shape names
    the heads) or when every head is cut (one stays, so the layer is valid).
    """

    @staticmethod
    def alive(op) -> np.ndarray:
        """Bool per head: True where the head is kept."""
        layer = op.layer
        index = [id(v) for v in layer.weights].index(id(layer._output_dense.kernel))
        kernel = op_weights(op)[index]
        alive = np.abs(kernel).reshape(kernel.shape[0], -1).max(axis=1) > 0
        if len(op.outputs) > 1:
            alive[:] = True
        elif not alive.any():
            alive[0] = True
        return alive

    def shrunk(self, op):
        return {"num_heads": int(self.alive(op).sum())}

    def rebuild(self, op, present_in, present_out):
        layer = op.layer
        weights = op_weights(op)
        output_kernel = layer._output_dense.kernel
        alive = self.alive(op)
        if alive.all():
            return copy_layer(layer), weights
        axes = {}  # head axis of each sublayer's weights: (kernel, bias)
        for dense in (layer._query_dense, layer._key_dense, layer._value_dense,
                      getattr(layer, "_gate_dense", None)):
            if dense is not None:
                axes[id(dense.kernel)] = 1  # (in, heads, dim)
                if dense.bias is not None:
                    axes[id(dense.bias)] = 0  # (heads, dim)
        axes[id(output_kernel)] = 0  # (heads, dim, out)
        sliced = [np.compress(alive, w, axis=axes[id(v)]) if id(v) in axes else w
                  for v, w in zip(layer.weights, weights, strict=True)]
        return copy_layer(layer, num_heads=int(alive.sum())), sliced


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
