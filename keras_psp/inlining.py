"""Composite layers opened up: each call replaced by the calls of its sublayers.

Most Keras 3 models people train are not made of stock layers alone:
keras_hub's backbones call custom *composite* layers (`TransformerEncoder`,
`MBConvBlock`, MobileNet's blocks, ...), which hold stock sublayers (`Dense`,
`MultiHeadAttention`, `Conv2D`, ...) and combine them in their `call`.
keras_psp cannot see into such a layer, so its structures cannot be pruned.

`inline_composites` returns a copy of a model in which every composite call
is replaced by what its `call` does, traced on the model's symbolic tensors:
the calls of (copies of) its sublayers and the `keras.ops` operations between
them, with the same weights. The copy computes exactly what the model
computes, it is a plain functional model that saves and loads without
keras_psp, and everything inside the composites becomes visible to `wrap`,
`slim` and `count_flops`. No composite needs a handler of its own: any
layer whose state lives in its sublayers opens up the same way.

A composite stays whole (and surgery keeps every channel through it, as
before) when its call cannot be traced into a graph: it uses its own
variables or a sublayer's variables directly (not through the sublayer's
call), returns something that is not a tensor, or needs concrete sizes that
a symbolic tensor does not have. `inline_composites` says which and why.
"""

from __future__ import annotations

import contextlib

import keras

from keras_psp.copying import call_copy, copy_layer, copy_state
from keras_psp.counting import own_weights
from keras_psp.graph import Graph, flatten, rebuild
from keras_psp.layers import family

_Layer = keras.layers.Layer


def is_inlinable(layer) -> bool:
    """A layer keras_psp does not know whose state all lives in sublayers.

    Registered layers (`keras_psp.register_layer`) are never opened: their
    family says how to wrap, cut and count them whole.
    """
    if not isinstance(layer, _Layer) or isinstance(layer, keras.Model):
        return False
    if family(layer).registered is not None:
        return False
    if own_weights(layer):
        return False
    return any(True for _ in layer._flatten_layers(include_self=False, recursive=False))


def has_composites(model: keras.Model) -> bool:
    """True if some layer of `model`'s flat graph is an inlinable composite."""
    return any(is_inlinable(op.layer) for op in flatten(model).ops)


class _Untraceable(Exception):
    """A composite's call does not become a graph of its sublayers."""


@contextlib.contextmanager
def _calls_inlined(ids: set[int]):
    """While tracing, the composites among `ids` run their `call` directly:
    nested composites open up too, and a nested call that returns `None`
    beside its tensors (no attention scores) is not a graph node."""
    original = _Layer.__call__

    def call(self, *args, **kwargs):
        if id(self) in ids:
            return self.call(*args, **kwargs)
        return original(self, *args, **kwargs)

    _Layer.__call__ = call
    try:
        yield
    finally:
        _Layer.__call__ = original


def _build_like(source, twin) -> None:
    """Builds every (sub)layer of `twin` that is built in `source`, with the
    same build config: a layer built in `source` but never called by its
    composite's `call` still has the state to copy."""
    sources = list(source._flatten_layers(include_self=True, recursive=True))
    twins = list(twin._flatten_layers(include_self=True, recursive=True))
    if len(sources) != len(twins):
        raise _Untraceable("its copy has other sublayers than the layer itself")
    for src, dst in zip(sources, twins, strict=True):
        if src.built and not dst.built:
            config = src.get_build_config()
            if not config:
                raise _Untraceable(f"its sublayer '{src.name}' has no build config")
            dst.build_from_config(config)


def _rename(twin, taken: set[str]) -> None:
    """Names every sublayer of `twin` after its path in it (`block_0_ffn`),
    unique among `taken` (a functional model's names must be)."""

    def visit(layer, prefix: str) -> None:
        for sub in layer._flatten_layers(include_self=False, recursive=False):
            stem = prefix.rstrip("_")  # a name that already says its place keeps it
            base = sub.name if sub.name.startswith(stem) else f"{stem}_{sub.name}"
            name = base
            count = 1
            while name in taken:
                name, count = f"{base}_{count}", count + 1
            taken.add(name)
            sub.name = name
            visit(sub, name)

    visit(twin, twin.name)


def _trace(layer, args, kwargs, taken: set[str]) -> list:
    """The output tensors of `layer`'s call on symbolic `args`, traced as
    calls of copies of its sublayers (a constant it returns stays a constant);
    raises `_Untraceable`."""
    twin = copy_layer(layer)
    try:
        if not twin.built and layer.built:
            twin.build_from_config(layer.get_build_config())
        _build_like(layer, twin)
        copy_state(layer, twin)
    except _Untraceable:
        raise
    except Exception as error:  # a build config that does not rebuild it
        raise _Untraceable(f"its copy does not build ({type(error).__name__}: {error})") from error
    _rename(twin, taken)
    subs = list(twin._flatten_layers(include_self=False, recursive=True))
    nested = {id(s) for s in subs if is_inlinable(s)}
    try:
        with _calls_inlined(nested):
            outputs = keras.tree.flatten(twin.call(*args, **kwargs))
    except Exception as error:
        raise _Untraceable(f"its call does not trace ({type(error).__name__}: "
                           f"{str(error).splitlines()[0][:200]})") from error
    if not outputs or not all(keras.ops.is_tensor(t) or isinstance(t, keras.KerasTensor)
                              for t in outputs):
        raise _Untraceable("its call returns something that is not a tensor")
    called = [s for s in subs if id(s) not in nested and s._inbound_nodes]
    reached = {id(v) for s in called for v in s.weights}
    missed = [v.path for v in twin.weights if id(v) not in reached]
    if missed:
        raise _Untraceable(f"its call uses variable(s) {', '.join(missed[:3])} outside "
                           "a sublayer call")
    return outputs


def inline_composites(model: keras.Model) -> tuple[keras.Model, list[tuple[str, str]]]:
    """A copy of `model` with every composite layer call replaced by its
    sublayers' calls (see the module docstring).

    The copy is flat (nested models are inlined too), shares no variable
    with `model`, and computes what `model` computes; `model` is not
    modified. Layers that are not composites are copied as they are.

    Args:
        model: A built Sequential or functional model.

    Returns:
        `(copy, kept)`: the new model, and `(layer name, reason)` of each
        composite that stays whole.

    Example:

    ```python
    backbone = keras_hub.models.BertBackbone(vocabulary_size=100, num_layers=2,
        num_heads=2, hidden_dim=32, intermediate_dim=64)
    flat, kept = keras_psp.inlining.inline_composites(backbone)
    # flat calls Dense, MultiHeadAttention, LayerNormalization, ... directly
    ```
    """
    graph: Graph = flatten(model)
    taken = {op.layer.name for op in graph.ops if isinstance(op.layer, _Layer)}
    copies: dict[int, _Layer] = {}
    kept: dict[str, str] = {}
    shared = graph.shared()  # a layer called twice stays whole: its copies would differ

    def emit(op, values):
        layer = op.layer
        args, kwargs = op.node.arguments.fill_in(
            {tid: values[key] for tid, key in op.local.items()})
        if is_inlinable(layer) and id(layer) in shared:
            kept[layer.name] = "it is called more than once, and its copies would not share weights"
        elif is_inlinable(layer):
            try:
                outputs = _trace(layer, args, kwargs, taken)
                symbolic = [isinstance(t, keras.KerasTensor) or key not in graph.output_keys
                            for t, key in zip(outputs, op.outputs, strict=False)]
                if len(outputs) == len(op.outputs) and all(symbolic):
                    return outputs  # constants (an empty placeholder) only feed other calls
                kept[layer.name] = "its call returns other tensors when traced"
            except _Untraceable as why:
                kept[layer.name] = str(why)
        return call_copy(layer, copies, args, kwargs)

    return rebuild(graph, emit, name=model.name), list(kept.items())
