"""Channels that are constant whatever the input, and their values.

A filter whose kernel is cut still emits its bias, or act(β) after BN: a
constant channel. Surgery may drop such a channel only where that is exact
(see `Boundary.folds`), so it needs to know which channels are constant
(structurally, from the rules) and their values (from one probe evaluation).
"""

from __future__ import annotations

import keras
import numpy as np

from keras_psp.graph import Graph, width


def find_constants(graph: Graph, rules, conn: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Returns, for every tensor key, a bool per channel: True where constant."""
    shapes = graph.shapes
    const = {key: np.zeros(width(shapes[key]), bool) for key in graph.input_keys}
    for op, rule in zip(graph.ops, rules, strict=True):
        const_in = [const.get(key, np.zeros(width(shapes[key]), bool)) for key in op.inputs]
        if rule.boundary and not rule.fixed:
            outs = rule.constant(op, const_in, shapes, conn[id(op)])
        else:
            outs = rule.constant(op, const_in, shapes)
        const.update(zip(op.outputs, outs, strict=True))
    return const


def check_cut_layers(graph: Graph, conn: dict[int, np.ndarray]) -> None:
    """Raises if layers with every weight cut block every path to an output.

    Such a model no longer depends on its input (a cut layer on a residual
    branch is fine: surgery removes the branch).
    """
    cut = {op_id for op_id, matrix in conn.items() if not matrix.any()}
    if not cut:
        return
    reached, blocking = set(graph.input_keys), []
    for op in graph.ops:
        if reached.intersection(op.inputs):
            if id(op) in cut:
                blocking.append(op.layer.name)
            else:
                reached.update(op.outputs)
    if not reached.issuperset(graph.output_keys):
        names = ", ".join(f"'{name}'" for name in blocking)
        raise ValueError(
            f"slim: layer(s) {names} have every structure cut (all weights zero) and lie "
            "on the only path(s) from the model's inputs to its output, so the model no "
            "longer depends on its input. Lower the threshold or the regularization "
            "strength, or do not wrap these layers."
        )


def _probe_input(tensor) -> np.ndarray:
    shape = [1] + [32 if d is None else int(d) for d in tensor.shape[1:]]
    return np.zeros(shape, dtype=keras.backend.standardize_dtype(tensor.dtype))


def probe_values(graph: Graph, keys) -> dict[int, np.ndarray]:
    """Evaluates the graph once on zeros; returns channel values of `keys`.

    Only the ops the requested tensors depend on run. A constant channel has
    the same value at every position, so the first position is read.
    """
    keys = set(keys)
    if not keys:
        return {}
    producer = {key: op for op in graph.ops for key in op.outputs}
    needed, stack = set(), list(keys)
    while stack:
        op = producer.get(stack.pop())
        if op is not None and id(op) not in needed:
            needed.add(id(op))
            stack.extend(op.inputs)
    inputs = graph.model.inputs
    values = {
        key: _probe_input(t) for key, t in zip(graph.input_keys, inputs, strict=True)
    }
    for op in graph.ops:
        if id(op) not in needed:
            continue
        args, kwargs = op.node.arguments.fill_in(
            {tid: values[key] for tid, key in op.local.items()}
        )
        outputs = keras.tree.flatten(op.source(*args, **kwargs))
        values.update(zip(op.outputs, outputs, strict=True))
    result = {}
    for key in keys:
        value = keras.ops.convert_to_numpy(values[key])
        result[key] = value[(0,) * (value.ndim - 1)].astype("float64")
    return result
