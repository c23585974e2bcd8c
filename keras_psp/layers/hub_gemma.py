"""keras_hub's `GemmaDecoderBlock`: query heads and MLP neurons, pruned whole.

A Gemma decoder block builds its causal mask from the sequence length, so
its call does not trace into a graph and `wrap` cannot open it
(`keras_psp.inlining`). Its family prunes it whole (`keras_psp.layers.composite`):

- ``"head"``: one α per query head, on the head's slice of the attention
  output projection (its whole contribution);
- ``"channel"``: one α per MLP neuron, on the neuron's row of the MLP output
  projection (`ffw_linear`), as for a `Dense` layer's input channels;
- ``"block"``: both, one α vector (heads first, then neurons).

`slim` rebuilds the block from its config with `num_query_heads`,
`num_key_value_heads` and `intermediate_dim` reduced and the matching slices
of its query, key, value, output and MLP kernels. Grouped-query attention
stays valid: every key/value head keeps the same number of query heads (the
most any group keeps; cut heads that fill a group up contribute zero, so
the block stays exact), and a key/value head whose query heads are all cut
leaves with them. The block's input and output width is kept.
"""

from __future__ import annotations

import numpy as np

from keras_psp.copying import copy_layer
from keras_psp.layers.base import Fixed, axis_plan, joint_plan, kept, op_weights
from keras_psp.layers.composite import SublayerScales
from keras_psp.layers.registry import register_layer

HEADS = "attention.output_dense.kernel"  # (query heads, head_dim, hidden)
NEURONS = "ffw_linear.kernel"  # (intermediate_dim // 2, hidden)


class GemmaBlockScales(SublayerScales):
    """α per query head and/or MLP neuron of a `GemmaDecoderBlock`."""

    kernels = (HEADS, NEURONS)
    structures = ("head", "channel", "block")
    missing = {s: "a Gemma decoder block is pruned by query heads ('head'), MLP neurons "
                  "('channel') or both ('block')" for s in ("filter", "column", "shape", "layer")}

    def plan(self, layer, structure):
        heads = axis_plan(HEADS, layer.attention.output_dense.kernel.shape, (0,))
        neurons = axis_plan(NEURONS, layer.ffw_linear.kernel.shape, (0,))
        return {"head": heads, "channel": neurons}.get(structure) or joint_plan(heads, neurons)


def _rows_alive(kernel: np.ndarray) -> np.ndarray:
    return np.abs(kernel).reshape(kernel.shape[0], -1).max(axis=1) > 0


class GemmaBlockRule(Fixed):
    """Keeps the block's channels; drops cut query heads (in whole key/value
    groups, or evenly across them) and cut MLP neurons."""

    @staticmethod
    def keep(op) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bool per query head, per key/value head and per MLP neuron: True where kept."""
        layer = op.layer
        weights = dict(zip((id(v) for v in layer.weights), op_weights(op), strict=True))
        heads = _rows_alive(weights[id(layer.attention.output_dense.kernel)])
        neurons = _rows_alive(weights[id(layer.ffw_linear.kernel)])
        if len(op.outputs) > 1:  # called with a cache: its shape names every head
            heads[:] = True
        groups = heads.reshape(layer.num_key_value_heads, -1)  # query heads by key/value head
        kv = groups.any(axis=1)
        if not kv.any():
            kv[0] = groups[0, 0] = True
        per_group = int(groups.sum(axis=1).max())
        for g in np.flatnonzero(kv):  # fill up with cut heads: they contribute zero
            missing = per_group - int(groups[g].sum())
            groups[g, np.flatnonzero(~groups[g])[:missing]] = True
        groups[~kv] = False
        if not neurons.any():
            neurons[0] = True
        return groups.reshape(-1), kv, neurons

    def shrunk(self, op):
        heads, kv, neurons = self.keep(op)
        return {"num_query_heads": int(heads.sum()), "num_key_value_heads": int(kv.sum()),
                "intermediate_dim": 2 * int(neurons.sum())}

    def rebuild(self, op, present_in, present_out):
        layer = op.layer
        heads, kv, neurons = self.keep(op)
        attention = layer.attention
        axes = {  # what each kept mask slices, and on which axis
            id(attention.query_dense.kernel): (heads, 0),  # (heads, hidden, head_dim)
            id(attention.key_dense.kernel): (kv, 0),
            id(attention.value_dense.kernel): (kv, 0),
            id(attention.output_dense.kernel): (heads, 0),  # (heads, head_dim, hidden)
            id(layer.gating_ffw.kernel): (neurons, 1),  # (hidden, neurons)
            id(layer.gating_ffw_2.kernel): (neurons, 1),
            id(layer.ffw_linear.kernel): (neurons, 0),  # (neurons, hidden)
        }
        weights = []
        for variable, value in zip(layer.weights, op_weights(op), strict=True):
            keep, axis = axes.get(id(variable), (None, 0))
            weights.append(value if keep is None else kept(value, keep, axis=axis))
        return copy_layer(layer, **self.shrunk(op)), weights


def gemma_block_macs(layer, input_shape, output_shape) -> int:
    """Projections (query, key, value, output), the two attention matmuls and
    the gated MLP, from the config, so that a shrunk block counts as built.
    (The rotary embedding's few multiplications count zero.)"""
    tokens, hidden = int(input_shape[1]), int(input_shape[2])
    heads, kv = int(layer.num_query_heads), int(layer.num_key_value_heads)
    head_dim, neurons = int(layer.head_dim), int(layer.intermediate_dim) // 2
    projections = tokens * hidden * head_dim * (2 * heads + 2 * kv)
    attention = 2 * heads * tokens * tokens * head_dim
    return projections + attention + 3 * tokens * hidden * neurons


def register() -> None:
    from keras_hub.src.models.gemma.gemma_decoder_block import GemmaDecoderBlock

    register_layer(GemmaDecoderBlock, handler=GemmaBlockScales(), rule=GemmaBlockRule(),
                   macs=gemma_block_macs)
