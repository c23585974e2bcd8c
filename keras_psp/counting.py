"""The multiply-accumulates of one layer call, for `count_flops` and the slim plan.

A layer whose family has a MAC function (`keras_psp.register_layer(...,
macs=...)`) counts with it. A *composite* layer (a custom layer built from
sublayers, as keras_hub's transformer blocks are) has no function of its
own: its call is traced symbolically (no numbers are computed, and the
model's layers gain no nodes), every sublayer call with a MAC function is
counted at the shapes it really sees, and so is every `keras.ops.einsum` or
`keras.ops.matmul` it calls (its attention matmuls); the sum is the
composite's cost.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref

import keras

from keras_psp.layers import family, registry

_Layer = keras.layers.Layer


def own_weights(layer) -> list:
    """The variables a layer created itself (not its sublayers')."""
    return list(getattr(layer, "_trainable_variables", [])) + list(
        getattr(layer, "_non_trainable_variables", []))


def _size(variables) -> int:
    return sum(math.prod(v.shape) for v in variables)


def _sublayers(layer) -> list:
    return list(layer._flatten_layers(include_self=False, recursive=True))


def is_composite(layer) -> bool:
    """A layer without a MAC function of its own whose sublayers have some."""
    return (isinstance(layer, _Layer) and family(layer).macs is None
            and any(family(s).macs is not None for s in _sublayers(layer)))


def invisible_weights(layer) -> int:
    """Weights of `layer` whose cost nothing counts: its own, when its family
    is unknown, and those of its unknown sublayers (a composite)."""
    if family(layer).registered is not None:
        return 0
    hidden = _size(own_weights(layer))
    for sub in layer._flatten_layers(include_self=False, recursive=False):
        hidden += invisible_weights(sub)
    return hidden


def _shapes(values) -> list[tuple]:
    return [tuple(v.shape) for v in keras.tree.flatten(values) if hasattr(v, "shape")
            and hasattr(v, "dtype")]


def _by_name(layer, args, kwargs) -> dict[str, tuple]:
    """The shapes of a call's tensor arguments, by parameter name."""
    bound = inspect.signature(layer.call).bind_partial(*args, **kwargs).arguments
    return {name: tuple(v.shape) for name, v in bound.items()
            if hasattr(v, "shape") and hasattr(v, "dtype")}


class _Shrunk:
    """`layer` as its MAC function sees it, with some attributes changed."""

    def __init__(self, layer, updates: dict):
        self._layer, self._updates = layer, updates

    def __getattr__(self, name):
        if name in self._updates:
            return self._updates[name]
        return getattr(self._layer, name)


def family_macs(layer, input_shapes: list[tuple], output_shape: tuple,
                arguments: tuple = ((), {}), updates: dict | None = None) -> int | None:
    """The family's MAC function on one call's shapes (batch first), or None.

    `arguments` (the call's args and kwargs) serve MAC functions that take
    shapes by parameter name (`keras_psp.layers.attention.by_name`);
    `updates` are attributes the MAC function reads changed (`Rule.shrunk`).
    """
    fn = family(layer).macs
    if fn is None:
        return None
    seen = _Shrunk(layer, updates) if updates else layer
    if getattr(fn, "by_name", False):
        return int(fn(seen, _by_name(layer, *arguments), output_shape))
    if getattr(fn, "all_inputs", False):
        return int(fn(seen, _shapes(arguments), output_shape))
    return int(fn(seen, input_shapes[0], output_shape))


@contextlib.contextmanager
def _recording(layers: set[int], records: list):
    """Records `family_macs` of calls of `layers`, and the MACs of
    `keras.ops.einsum` / `keras.ops.matmul` calls (not inside a counted call)."""
    from keras_psp.layers.operations import einsum_shape_macs, matmul_shape_macs

    original = _Layer.__call__
    depth = [0]

    def call(self, *args, **kwargs):
        if depth[0] or id(self) not in layers or family(self).macs is None:
            return original(self, *args, **kwargs)
        depth[0] += 1
        try:
            outputs = original(self, *args, **kwargs)
        finally:
            depth[0] -= 1
        records.append(family_macs(self, _shapes((args, kwargs)), _shapes(outputs)[0],
                                   (args, kwargs)))
        return outputs

    def counted(name, macs):
        function = getattr(keras.ops, name)

        def run(*args, **kwargs):
            if not depth[0]:
                records.append(macs(args, _shapes((args, kwargs))))
            return function(*args, **kwargs)
        return function, run

    functions = {"einsum": counted("einsum", lambda a, s: einsum_shape_macs(a[0], s)),
                 "matmul": counted("matmul", lambda a, s: matmul_shape_macs(*s[:2]))}
    _Layer.__call__ = call
    for name, (_, run) in functions.items():
        setattr(keras.ops, name, run)
    try:
        yield
    finally:
        _Layer.__call__ = original
        for name, (function, _) in functions.items():
            setattr(keras.ops, name, function)


#: Traced MACs by call node: surgery keeps every channel through a composite,
#: so its cost at its own shapes never changes, while budget searches count
#: the same model many times.
_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def traced_macs(layer, node, arguments: tuple | None = None) -> int:
    """MACs of one call of a composite `layer`, its call `node` traced again
    (once per node, argument shapes and registry generation).

    Args:
        layer: The composite.
        node: Its call.
        arguments: `(args, kwargs)` to trace instead of the node's own
            (tensors of concrete shape); None: the node's.
    """
    args, kwargs = arguments or (node.arguments.args, node.arguments.kwargs)
    key = (registry.generation, tuple(_shapes((args, kwargs))))
    cached = _TRACED.get(node)
    if cached is None or cached[0] != key:  # a family registered since, other shapes
        records: list = []
        with _recording({id(s) for s in _sublayers(layer)}, records):
            keras.src.backend.compute_output_spec(layer.call, *args, **kwargs)
        cached = _TRACED[node] = (key, sum(records))
    return cached[1]


def call_macs(layer, op, input_shapes: list[tuple], output_shape: tuple,
              updates: dict | None = None) -> int | None:
    """MACs per example of one call (`keras_psp.graph.Op`), or None if unknown.

    Args:
        layer: The layer to count (a PSP wrapper's inner layer).
        op: The call.
        input_shapes, output_shape: The shapes of its tensors (all inputs in
            call order), at the widths to count (the slim plan's). A composite
            counts at the shapes of its own call: surgery keeps every channel
            through it.
        updates: Attributes of the slim layer that differ (`Rule.shrunk`).
    """
    if family(layer).macs is not None:
        return family_macs(layer, input_shapes, output_shape, op.call_arguments(), updates)
    if is_composite(layer):
        return traced_macs(layer, op.node, op.arguments)
    return None
