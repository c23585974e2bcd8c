"""Whole-model operations: `wrap` a model in PSP layers, `strip` them off.

Both return a new model built with `keras.models.clone_model` (recursively,
so nested Sequential and functional models are handled) and copy each
layer's state into its copy (`keras_psp.copying`); the input model is never
modified.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator

import keras

from keras_psp.copying import call_copy, copy_layer, copy_state
from keras_psp.folding import unwrap
from keras_psp.graph import flatten, rebuild
from keras_psp.groups import GROUP, group_layers, group_views, wrap_groups
from keras_psp.inlining import has_composites, inline_composites
from keras_psp.layers import STRUCTURES, handler_of
from keras_psp.wrapper import PSP

LayerSelector = str | type | Callable | Iterable | None


def check_graph_model(model, action: str) -> None:
    """Raises a clear error unless `model` is a built Sequential/functional model."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{action} expects a keras.Model, got {type(model).__name__}."
        )
    functional = keras.src.models.functional.Functional
    if not isinstance(model, (keras.Sequential, functional)):
        raise ValueError(
            f"Cannot {action.lower()} model '{model.name}': it is a subclassed "
            f"model ({type(model).__name__}) with no functional graph. Rebuild "
            "it with the functional API or as a keras.Sequential, or wrap its "
            "layers one by one with keras_psp.PSP inside the model's code."
        )
    if not model.built or not model.inputs:
        raise ValueError(
            f"Cannot {action.lower()} model '{model.name}': it has no defined "
            "inputs yet. Give it an Input (or call `model.build(input_shape)`) "
            "first."
        )


def iter_layers(model) -> Iterator[keras.layers.Layer]:
    """All layers of `model`, descending into nested models (not wrappers)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer)
        else:
            yield layer


def psp_layers(model) -> list:
    """The PSP layers of `model`, nested models included, then its channel
    groups (`keras_psp.groups.Group`: each one reads like a PSP layer)."""
    return [layer for layer in iter_layers(model) if isinstance(layer, PSP)] + group_views(model)


def _copy_pairs(source_model, clone_function) -> tuple[keras.Model, list]:
    """`clone_model(source_model)` with `clone_function`, and the (old, new)
    layer pairs it made, matched by object (names may change: a layer can
    rename itself in `__init__`)."""
    pairs = []

    def clone(layer):
        new = clone_function(layer)
        pairs.append((layer, new))
        return new

    new_model = keras.models.clone_model(source_model, clone_function=clone, recursive=True)
    return new_model, pairs


def _selector(layers: LayerSelector, model) -> tuple[Callable, bool]:
    """Returns (predicate, explicit): explicit selections must all be wrappable."""
    if layers is None:
        return (lambda layer: True), False
    if callable(layers) and not isinstance(layers, type):
        return layers, False
    items = [layers] if isinstance(layers, (str, type)) else list(layers)
    names = {x for x in items if isinstance(x, str)}
    types = tuple(x for x in items if isinstance(x, type))
    if len(names) + len(types) != len(items):
        raise TypeError(
            "`layers` must be layer names, layer classes, a predicate or None; "
            f"got {layers!r}."
        )
    unknown = names - {layer.name for layer in iter_layers(model)}
    if unknown:
        raise ValueError(
            f"`layers` names {sorted(unknown)} that are not in model "
            f"'{model.name}'. Check the names with `model.summary()`."
        )
    for cls in types:
        if handler_of(cls) is None:
            raise TypeError(
                f"`layers` selects type {cls.__name__}, which PSP cannot wrap."
            )
    return (lambda layer: layer.name in names or type(layer) in types), True


def _structures(structure) -> Callable:
    """`fn(layer) -> structure name or None` from wrap's `structure` argument:
    one name for every layer, or a dict by layer class (or class name; the
    closest base class listed wins, None: not wrapped)."""
    def check(name):
        if name not in STRUCTURES:
            raise ValueError(f"Unknown structure {name!r}. Choose one of "
                             f"{', '.join(map(repr, (*STRUCTURES, GROUP)))}.")

    if not isinstance(structure, dict):
        check(structure)
        return lambda layer: structure
    for key, name in structure.items():
        if not isinstance(key, (str, type)):
            raise TypeError(f"wrap: the keys of `structure` must be layer classes or class "
                            f"names, got {key!r}.")
        check(name)

    def structure_of(layer):
        for cls in type(layer).__mro__:
            for key in (cls, cls.__name__):
                if key in structure:
                    return structure[key]
        return None

    return structure_of


def wrap(
    model: keras.Model,
    structure: str = "channel",
    layers: LayerSelector = None,
    composites: str = "inline",
    **psp_kwargs,
) -> keras.Model:
    """Returns a copy of `model` with its supported layers wrapped in `PSP`.

    Weights are copied and every α starts at 1, so the new model predicts
    exactly what `model` predicts. `model` itself is not modified. Layers that
    are already `PSP` wrappers are copied as they are.

    Args:
        model: A built Sequential or functional model (nested models are
            handled).
        structure: The structure of every new wrapper (see `PSP`); a dict
            of structures by layer class or class name (the closest base
            listed wins; other layers stay unwrapped), e.g.
            `{"MultiHeadAttention": "head", "Dense": "channel"}` for a
            transformer's heads and MLP neurons; or
            `"group"`: one α per channel of every coupled channel group,
            shared by all the layers that read it (`keras_psp.groups`); cut
            channels then leave every producer and reader together, so
            `slim` needs no gather. The model is rebuilt flat (nested models
            inlined).
        layers: Which layers to wrap: None (every supported layer the
            structure fits), a layer name or class, a list of names and/or
            classes (each must be wrappable), or a predicate
            `fn(layer) -> bool` (unsupported matches are skipped).
        composites: `"inline"` (the default): layers keras_psp does not
            know that are built from sublayers (keras_hub's transformer and
            MBConv blocks, your own blocks) are replaced by their sublayers'
            calls first (`keras_psp.inlining.inline_composites`), so that the
            layers inside are wrapped, cut and counted like any other; the
            new model is flat, and its layers are named after their place
            in the composite (`transformer_layer_0_self_attention_layer`).
            `"keep"`: composites stay whole, and nothing inside them is
            pruned.
        **psp_kwargs: Passed on to `PSP` (`threshold`, `regularizer`,
            `strength`).

    Example:

    ```python
    base = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3))
    model = keras_psp.wrap(base, structure="channel", strength=2e-2)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    ```
    """
    check_graph_model(model, "wrap")
    if composites not in ("inline", "keep"):
        raise ValueError(f"wrap: `composites` must be 'inline' or 'keep', got {composites!r}.")
    if composites == "inline" and has_composites(model):
        model, kept = inline_composites(model)
        if kept:
            listed = "; ".join(f"'{name}': {why}" for name, why in kept)
            warnings.warn(f"wrap: {len(kept)} composite layer(s) stay whole, so nothing inside "
                          f"them is pruned ({listed}).", stacklevel=2)
    if structure == GROUP:
        if layers is not None:
            raise ValueError("wrap: structure='group' gives every removable channel group an "
                             "α; it takes no `layers` selection.")
        return wrap_groups(model, **psp_kwargs)
    structure_of = _structures(structure)
    wanted, explicit = _selector(layers, model)
    skipped = []

    def clone(layer):
        if isinstance(layer, PSP):
            if explicit and wanted(layer):
                raise ValueError(
                    f"Layer '{layer.name}' is already wrapped in PSP; leave it "
                    "out of `layers`."
                )
            return copy_layer(layer)
        structure = structure_of(layer)
        if not wanted(layer) or structure is None:
            return copy_layer(layer)
        handler = handler_of(layer)
        if handler is not None and handler.fits(layer) is not None:
            handler = None  # a configuration its family does not cover
        if handler is None or structure not in handler.structures:
            if explicit:
                PSP(copy_layer(layer), structure=structure, **psp_kwargs)  # raises
            if handler is not None:
                skipped.append(layer.name)
            return copy_layer(layer)
        copy = copy_layer(layer)
        if handler.call_arguments and layer.built:  # several inputs: build it as the original
            copy.build_from_config(layer.get_build_config())
        return PSP(copy, structure=structure, **psp_kwargs)

    new_model, pairs = _copy_pairs(model, clone)
    for src, dst in pairs:
        if isinstance(dst, PSP) and not isinstance(src, PSP):
            copy_state(src, dst.layer)
        elif isinstance(src, keras.layers.Layer):
            copy_state(src, dst)
    if skipped:
        warnings.warn(
            f"wrap: structure {structure!r} does not fit {len(skipped)} "
            f"layer(s), left unwrapped: {', '.join(skipped)}.",
            stacklevel=2,
        )
    if not psp_layers(new_model):
        warnings.warn(
            f"wrap: no layer of model '{model.name}' was wrapped.", stacklevel=2
        )
    first = [layer.name for layer in psp_layers(new_model)
             if getattr(layer.layer, "data_format", "channels_last") == "channels_first"]
    if first:
        warnings.warn(
            f"wrap: {len(first)} layer(s) ({', '.join(first)}) use data_format="
            "'channels_first'. PSP trains and cuts their structures, but slim keeps every "
            "channel of channels_first layers (cut structures stay as zero weights), so they "
            "do not get smaller. Build the model channels_last to slim them.",
            stacklevel=2,
        )
    cancelled = _cancelled_by_batchnorm(new_model)
    if cancelled:
        warnings.warn(
            f"wrap: the α of {len(cancelled)} layer(s) ({', '.join(cancelled)}) "
            "scale(s) outputs that a BatchNormalization normalizes right away, so "
            "training cannot tell important from unimportant structures there. "
            "Use structure='channel' for these layers (BN does not cancel "
            "input-channel scales).",
            stacklevel=2,
        )
    return new_model


def _cancelled_by_batchnorm(model) -> list[str]:
    """PSP layers with output-side α (filter, layer) read only by BN layers."""
    graph = flatten(model)
    readers = graph.consumers()
    names = []
    for op in graph.ops:
        layer = op.layer
        if not isinstance(layer, PSP) or layer.structure not in ("filter", "layer"):
            continue
        users = readers.get(op.outputs[0], [])
        if users and all(isinstance(u.layer, keras.layers.BatchNormalization) for u in users):
            names.append(layer.name)
    return names


def strip(model: keras.Model) -> keras.Model:
    """Returns `model` rebuilt from plain Keras layers, with α folded in.

    Each `PSP` wrapper becomes its plain layer with kernel `kernel * α`, cut
    structures set exactly to zero; every other layer is copied. The result
    computes what `model` computes in inference mode and saves and loads
    without keras_psp. `model` is not modified.

    Args:
        model: A built Sequential or functional model containing PSP layers.

    Raises:
        ValueError: if an α is not finite (naming the layer).

    Example:

    ```python
    plain = keras_psp.strip(wrapped)
    plain.save("pruned_dense.keras")
    ```
    """
    check_graph_model(model, "strip")
    for layer in psp_layers(model):
        layer.check_finite("strip the model")
    if group_layers(model):
        return _strip_groups(model)

    def clone(layer):
        if not isinstance(layer, PSP):
            return copy_layer(layer)
        return copy_layer(layer.layer, name=layer.name)  # the graph's name pairs weights

    new_model, pairs = _copy_pairs(model, clone)
    for src, dst in pairs:
        if isinstance(src, PSP):
            dst.set_weights(src.folded_weights())
        elif isinstance(src, keras.layers.Layer):
            copy_state(src, dst)
    return new_model


def _strip_groups(model) -> keras.Model:
    """`strip` for a model with channel groups: α folds into the kernels of
    the layers that read them, and the `ChannelGroups` calls leave the graph
    (rebuilt flat: nested models are inlined)."""
    graph = unwrap(flatten(model))
    built = {}

    def emit(op, values):
        args, kwargs = op.node.arguments.fill_in(
            {tid: values[key] for tid, key in op.local.items()})
        return call_copy(op.layer, built, args, kwargs, op.arrays)

    return rebuild(graph, emit, name=model.name)
