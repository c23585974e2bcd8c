"""Which channels of a flat graph are coupled: one connected component per
set of channels that must be kept or cut together."""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from keras_psp.graph import Graph, width


def live_ops(graph: Graph, dropped: dict[int, list[int]]) -> set[int]:
    """`id`s of the ops the graph's outputs depend on, merges reading only
    their inputs not in `dropped`."""
    used, live = set(graph.output_keys), set()
    for op in reversed(graph.ops):
        if used.intersection(op.outputs):
            live.add(id(op))
            skip = dropped.get(id(op), ())
            used.update(k for i, k in enumerate(op.inputs) if i not in skip)
    return live


@dataclasses.dataclass
class Coupling:
    """Every channel of every tensor on one axis, and the groups they form.

    Attributes:
        keys: Tensor keys, in graph order.
        offset: Where each tensor's channels start on the axis.
        total: Channels in all.
        required: True for channels that must stay (model inputs and
            outputs, tensors of fixed layers).
        labels: The coupled group (connected component) of each channel.
    """

    keys: list
    offset: dict
    total: int
    required: np.ndarray
    labels: np.ndarray
    shapes: dict

    def span(self, key) -> slice:
        """The channels of tensor `key` on the axis."""
        return slice(self.offset[key], self.offset[key] + width(self.shapes[key]))


def couple(graph: Graph, ops: list, rule_of: dict, dropped: dict, shared: dict) -> Coupling:
    """Couples the channels of the live `ops` ((op, rule) pairs) into groups."""
    shapes = graph.shapes
    keys = list(shapes)
    offset, total = {}, 0
    for key in keys:
        offset[key] = total
        total += width(shapes[key])
    coupling = Coupling(keys, offset, total, np.zeros(total, bool), np.zeros(total, int), shapes)
    span, required = coupling.span, coupling.required
    rows, cols = [], []
    for key in graph.input_keys + graph.output_keys:
        required[span(key)] = True
    for op, rule in ops:
        if rule.fixed:
            for key in op.inputs + op.outputs:
                required[span(key)] = True
        skip = dropped.get(id(op), ())
        for i, ch_in, o, ch_out in rule.edges(op, shapes):
            if i not in skip:
                rows.append(offset[op.inputs[i]] + ch_in)
                cols.append(offset[op.outputs[o]] + ch_out)
    for calls in shared.values():  # one layer, one set of channels for all its calls
        first, rule = calls[0], rule_of[id(calls[0])]
        if not (first.layer.weights or rule.boundary or rule.width_in_config):
            continue  # nothing in the layer depends on the channels
        for op in calls[1:]:
            for a, b in [*zip(first.inputs, op.inputs, strict=True),
                         *zip(first.outputs, op.outputs, strict=True)]:
                if width(shapes[a]) != width(shapes[b]):
                    required[span(a)] = required[span(b)] = True
                    continue
                rows.append(offset[a] + np.arange(width(shapes[a])))
                cols.append(offset[b] + np.arange(width(shapes[b])))
    rows = np.concatenate(rows) if rows else np.zeros(0, int)
    cols = np.concatenate(cols) if cols else np.zeros(0, int)
    adjacency = coo_matrix((np.ones(len(rows), bool), (rows, cols)), shape=(total, total))
    _, coupling.labels = connected_components(adjacency, directed=False)
    return coupling
