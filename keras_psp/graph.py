"""A functional model as one flat list of layer calls, and its rebuild.

Nested Sequential and functional models are inlined, so surgery sees every
layer call of the whole network on one graph of tensors.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
from collections.abc import Callable

import keras
from keras.src.models.functional import Functional


def width(shape: tuple) -> int:
    """Channels of a tensor: its last axis; 0 when unknown (token ids of
    variable length) or when the last axis is the batch (rank 1)."""
    if len(shape) < 2 or shape[-1] is None:
        return 0
    return int(shape[-1])


@dataclasses.dataclass
class Op:
    """One layer call.

    Attributes:
        layer: The called layer.
        node: Keras's record of the call (its arguments).
        inputs: Keys of the input tensors, in call order.
        outputs: Keys of the output tensors.
        local: Maps `id` of the call's own KerasTensors to graph keys.
        arrays: Weights to use instead of `layer.get_weights()` (set by
            `unwrap` for a PSP layer: its plain layer's weights, α folded).
        source: The layer the model calls (a PSP wrapper after `unwrap`).
        plain_weights: `layer.get_weights()`, read once by the surgery rules.
        arguments: The call's `(args, kwargs)` with tensors of concrete
            shape (`with_input_shape`); None: the model's own.
    """

    layer: keras.layers.Layer
    node: object
    inputs: list[int]
    outputs: list[int]
    local: dict[int, int]
    arrays: list | None = None
    source: object = None
    plain_weights: list | None = dataclasses.field(default=None, repr=False)
    arguments: tuple | None = dataclasses.field(default=None, repr=False)

    def call_arguments(self) -> tuple:
        """`(args, kwargs)` of the call, with concrete shapes where set."""
        if self.arguments is not None:
            return self.arguments
        return self.node.arguments.args, self.node.arguments.kwargs

    def __post_init__(self):
        if self.source is None:
            self.source = self.layer


@dataclasses.dataclass
class Graph:
    """A flat functional graph; tensors are identified by integer keys."""

    model: keras.Model
    input_keys: list[int]
    output_keys: list[int]
    ops: list[Op]
    shapes: dict[int, tuple]

    def shared(self) -> dict[int, list[Op]]:
        """Ops of layers called more than once (a shared layer, each call of a
        nested model called twice), by `id` of the layer."""
        calls: dict[int, list[Op]] = {}
        for op in self.ops:
            if isinstance(op.layer, keras.layers.Layer):
                calls.setdefault(id(op.layer), []).append(op)
        return {k: v for k, v in calls.items() if len(v) > 1}

    def consumers(self) -> dict[int, list[Op]]:
        users: dict[int, list[Op]] = {}
        for op in self.ops:
            for key in op.inputs:
                users.setdefault(key, []).append(op)
        return users


def _functional(model) -> Functional:
    if isinstance(model, keras.Sequential):
        return model._functional
    return model


def flatten(model: keras.Model) -> Graph:
    """Inlines nested models and returns the flat `Graph` of `model`.

    Every call is its own set of ops: a nested model called twice (a siamese
    encoder) gives two copies of its ops, on their own tensors, whose layers
    are shared (see `Graph.shared`).
    """
    ops: list[Op] = []
    shapes: dict[int, tuple] = {}
    counter = itertools.count()

    def visit(fn: Functional, input_keys: list[int]) -> list[int]:
        scope: dict[int, int] = {}  # id of this call's KerasTensors -> graph key

        def key_of(tensor) -> int:
            key = scope.get(id(tensor))
            if key is None:
                key = scope[id(tensor)] = next(counter)
                shapes[key] = tuple(tensor.shape)
            return key

        for tensor, key in zip(fn.inputs, input_keys, strict=True):
            scope[id(tensor)] = key
        for depth in sorted(fn._nodes_by_depth, reverse=True):
            for node in fn._nodes_by_depth[depth]:
                if node.is_input or node.operation is None:
                    continue
                inputs = [key_of(t) for t in node.input_tensors]
                layer = node.operation
                if isinstance(layer, (keras.Sequential, Functional)):
                    outs = visit(_functional(layer), inputs)
                    for tensor, key in zip(node.outputs, outs, strict=True):
                        scope[id(tensor)] = key
                    continue
                local = {id(t): key_of(t) for t in node.input_tensors}
                outputs = [key_of(t) for t in node.outputs]
                ops.append(Op(layer, node, inputs, outputs, local))
        return [key_of(t) for t in fn.outputs]

    fn = _functional(model)
    input_keys = []
    for tensor in fn.inputs:
        input_keys.append(next(counter))
        shapes[input_keys[-1]] = tuple(tensor.shape)
    output_keys = visit(fn, input_keys)
    return Graph(model, input_keys, output_keys, ops, shapes)


def rebuild(
    graph: Graph,
    emit: Callable[[Op, dict], list],
    name: str,
    live: set[int] | None = None,
) -> keras.Model:
    """Calls `emit(op, values) -> new output tensors` for every op, in order.

    `values` maps tensor keys to the new tensors built so far; `emit` builds
    the op's replacement on them. Ops whose `id` is not in `live` (when
    given) are left out.
    """
    fn = _functional(graph.model)
    inputs = [
        keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t._keras_history.operation.name)
        for t in fn.inputs
    ]
    values = dict(zip(graph.input_keys, inputs, strict=True))
    for op in graph.ops:
        if live is None or id(op) in live:
            values.update(zip(op.outputs, emit(op, values), strict=True))
    outputs = [values[key] for key in graph.output_keys]
    return keras.Model(
        inputs if len(inputs) > 1 else inputs[0],
        outputs if len(outputs) > 1 else outputs[0],
        name=name,
    )


def _example_shapes(model, input_shape) -> list[tuple]:
    """`input_shape` (one shape, a list in input order, or a dict by input
    name; no batch axis) as one full shape per model input."""
    inputs = _functional(model).inputs
    names = [t._keras_history.operation.name for t in inputs]
    if isinstance(input_shape, dict):
        unknown = sorted(set(input_shape) - set(names))
        if unknown:
            raise ValueError(f"input_shape names {unknown}, which are not inputs of model "
                             f"'{model.name}' (its inputs: {names}).")
        given = [input_shape.get(name) for name in names]
    elif input_shape and all(isinstance(d, int) or d is None for d in input_shape):
        given = [tuple(input_shape)] + [None] * (len(inputs) - 1)
    else:
        given = list(input_shape)
    if len(given) != len(inputs):
        raise ValueError(f"input_shape gives {len(given)} shapes for the {len(inputs)} inputs "
                         f"of model '{model.name}'.")
    shapes = []
    for tensor, name, shape in zip(inputs, names, given, strict=True):
        own = tuple(tensor.shape)
        shape = own[1:] if shape is None else tuple(shape)
        if len(shape) != len(own) - 1 or any(
                d is not None and d != e for d, e in zip(own[1:], shape, strict=True)):
            raise ValueError(f"input_shape {shape} does not fit input '{name}' of model "
                             f"'{model.name}', whose shape is {own} (give it without the "
                             "batch axis).")
        if None in shape:
            raise ValueError(f"input_shape leaves a size of input '{name}' of model "
                             f"'{model.name}' open: {shape}. Give every size.")
        shapes.append((own[0], *shape))
    return shapes


def with_input_shape(graph: Graph, input_shape) -> Graph:
    """`graph` as it runs on inputs of `input_shape` (no batch axis): every
    tensor's shape concrete, and every op's call arguments concrete, for
    counting a model built for inputs of variable size (token sequences).

    Args:
        graph: A flat graph.
        input_shape: One shape (one input), a list of shapes in input order,
            or a dict of shapes by input name; None for an input keeps its
            own (fixed) shape.

    Returns:
        A new `Graph` with the same ops (copies holding concrete `arguments`).
    """
    inputs = _functional(graph.model).inputs
    shapes = dict(graph.shapes)
    values = {}
    for key, tensor, shape in zip(graph.input_keys, inputs,
                                  _example_shapes(graph.model, input_shape), strict=True):
        values[key] = keras.KerasTensor(shape, dtype=tensor.dtype)
        shapes[key] = shape
    ops = []
    for op in graph.ops:
        args, kwargs = op.node.arguments.fill_in(
            {tid: values[key] for tid, key in op.local.items()})
        outputs = keras.tree.flatten(op.layer.compute_output_spec(*args, **kwargs))
        if isinstance(op.layer, keras.layers.Layer) and any(
                None in tuple(t.shape)[1:] for t in outputs):  # (EinsumDense's open sizes)
            outputs = keras.tree.flatten(
                keras.src.backend.compute_output_spec(op.layer.call, *args, **kwargs))
        if not any(getattr(t, "sparse", False) for t in keras.tree.flatten((args, kwargs))
                   if isinstance(t, keras.KerasTensor)):
            # Keras marks `x * constant` sparse (it takes a constant for a sparse
            # tensor); dense inputs give a dense output
            outputs = [keras.KerasTensor(t.shape, dtype=t.dtype) if t.sparse else t
                       for t in outputs]
        for key, tensor in zip(op.outputs, outputs, strict=True):
            values[key], shapes[key] = tensor, tuple(tensor.shape)
        ops.append(dataclasses.replace(op, arguments=(args, kwargs)))
    return Graph(graph.model, graph.input_keys, graph.output_keys, ops, shapes)


def not_fixed(layer, shape) -> str:
    """The error of counting a layer whose input size is not fixed."""
    return (f"Cannot count the FLOPs of layer '{layer.name}': its input shape {shape} is not "
            "fixed. Pass the size of one example to count at (count_flops(model, "
            "input_shape=...)), or build the model on a fixed input shape.")


_COUNTED_AT: contextvars.ContextVar = contextvars.ContextVar("keras_psp_counted_at",
                                                            default=None)


@contextlib.contextmanager
def counted_at(input_shape):
    """Inside, FLOPs of models whose inputs have sizes left open (token
    sequences) are counted at `input_shape` (as `count_flops`'s argument),
    by every function and callback that counts; None changes nothing.

    Example:

    ```python
    with keras_psp.flops.counted_at({"token_ids": (128,), "padding_mask": (128,)}):
        keras_psp.prune_to(wrapped_bert, flops=0.5)
    ```
    """
    token = _COUNTED_AT.set(input_shape) if input_shape is not None else None
    try:
        yield
    finally:
        if token is not None:
            _COUNTED_AT.reset(token)


def counted_at_input_shape(method):
    """Runs a method with FLOPs counted at its object's `input_shape`
    (`counted_at`): the hooks of the callbacks that count."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with counted_at(self.input_shape):
            return method(self, *args, **kwargs)
    return run


def counting_graph(model, input_shape=None) -> Graph:
    """The flat graph of `model` with the shapes `count_flops` counts at:
    `input_shape`'s (or `counted_at`'s, for inputs with open sizes), or,
    when the inputs are fixed but a layer leaves a size open (an
    `EinsumDense` with `output_shape=(None, units)`), the sizes a real call
    gives."""
    graph = flatten(model)
    fixed = all(None not in graph.shapes[k][1:] for k in graph.input_keys)
    if input_shape is None and not fixed:
        input_shape = _COUNTED_AT.get()
    if input_shape is not None:
        return with_input_shape(graph, input_shape)
    if fixed and any(None in shape[1:] for shape in graph.shapes.values()):
        return with_input_shape(graph, {})  # every input at its own shape
    return graph
