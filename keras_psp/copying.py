"""Copies of single layers: a new layer object, then the old one's state.

`wrap`, `strip` and `slim` build new models, so they need copies of layers
that compute exactly what the originals compute, without sharing variables
with the user's model (training the copy must not change the original).

- `copy_layer` makes the new, unbuilt object: from the layer's config, as
  `keras.models.clone_model` does; when the config cannot re-create the layer
  (a bug in that layer's `get_config`), a deep copy without its graph
  connections instead.
- `copy_state` moves everything Keras would save of a built layer into its
  copy: each (sub)layer's own variables through `save_own_variables` /
  `load_own_variables`, and its assets (a lookup vocabulary) through
  `save_assets` / `load_assets`. Layers that keep derived state outside their
  variables (an adapted `Normalization`'s mean and variance) refresh it in
  `load_own_variables`, exactly as when a `.keras` file loads.
"""

from __future__ import annotations

import copy
import tempfile
import warnings

import keras
import numpy as np
from keras.src.saving.serialization_lib import SafeModeScope
from keras.src.utils.tracking import DotNotTrackScope


class LayerCopyError(ValueError):
    """A layer cannot be copied; the message names it and says why."""


def _describe(layer) -> str:
    return f"'{layer.name}' ({type(layer).__module__}.{type(layer).__name__})"


def copy_layer(layer, **updates):
    """A new layer of the same class, config and `updates`, unbuilt if possible.

    The layer is an object the user handed us in memory, not a file, so a
    `Lambda` holding a Python lambda is copied too (safe mode is for files).
    A stateless `keras.ops` operation is returned as it is.

    When `from_config(get_config())` fails (the layer's config cannot
    re-create it) and no `updates` are asked for, the layer is deep-copied
    instead, variables included but without the nodes that tie it to the
    original model's graph; the copy is then already built, and a warning
    (once per class) says that a `.keras` file holding it will not load.

    Raises:
        LayerCopyError: if neither works, naming the layer and the error of
            its config.
    """
    if not isinstance(layer, keras.layers.Layer):
        return layer
    try:
        with SafeModeScope(False):
            return layer.__class__.from_config({**layer.get_config(), **updates})
    except Exception as error:  # a broken get_config/from_config pair
        if updates:
            raise LayerCopyError(
                f"Cannot rebuild layer {_describe(layer)} with {sorted(updates)} changed: "
                f"`{type(layer).__name__}.from_config(layer.get_config())` fails with "
                f"{type(error).__name__}: {error}. This is a bug in that layer's config; "
                "fix its get_config, or leave the layer unwrapped."
            ) from error
        config_error = error
    try:
        twin = _deep_copy(layer)
    except Exception as error:
        raise LayerCopyError(
            f"Cannot copy layer {_describe(layer)}: its config does not re-create it "
            f"(`from_config(get_config())` fails with {type(config_error).__name__}: "
            f"{config_error}), and a deep copy fails too ({type(error).__name__}: {error}). "
            "This is a bug in that layer's get_config; fix it (or report it to the "
            "layer's authors) so that the layer can be re-created from its config."
        ) from error
    _warn_broken_config(layer, config_error)
    return twin


_WARNED: set[type] = set()


def _warn_broken_config(layer, error) -> None:
    """Once per class: the layer was deep-copied because its config is broken."""
    if type(layer) in _WARNED:
        return
    _WARNED.add(type(layer))
    warnings.warn(
        f"Layer {_describe(layer)} cannot be re-created from its own config "
        f"(`from_config(get_config())` fails with {type(error).__name__}: {error}); keras_psp "
        "deep-copied it instead, so the new model computes the same. A `.keras` file of a "
        "model holding this layer will not load until its get_config is fixed: this is a bug "
        f"in {type(layer).__module__.split('.')[0]}, not in your model.",
        stacklevel=4,
    )


def _deep_copy(layer):
    """A deep copy of `layer` and its sublayers that never goes through their
    configs, minus the nodes that tie them to the original model's graph.

    `copy.deepcopy` of a Keras layer pickles it through its config
    (`KerasSaveable.__reduce__`), which is what fails here; so each (sub)layer
    is re-made with `__new__` and given a deep copy of its attributes, with
    the variables copied by their own `__deepcopy__`.
    """
    subs = list(layer._flatten_layers(include_self=True, recursive=True))
    memo = {}
    for sub in subs:
        memo[id(sub)] = object.__new__(type(sub))
        for attribute in ("_inbound_nodes", "_outbound_nodes"):
            nodes = getattr(sub, attribute, None)
            if nodes is not None:
                memo[id(nodes)] = []
    with DotNotTrackScope():  # the copied trackers and their stores arrive together
        for sub in subs:
            memo[id(sub)].__dict__.update(copy.deepcopy(sub.__dict__, memo))
    twin = memo[id(layer)]
    originals = {id(v) for v in layer.weights}
    if any(id(v) in originals for v in twin.weights):
        raise TypeError("the copy shares variables with the original")
    return twin


def _overrides(layer, method: str) -> bool:
    own = getattr(type(layer), method, None)
    return own is not None and own is not getattr(keras.layers.Layer, method, None)


def _detached(value):
    """A copy of a variable's or tensor's value that shares no buffer with it.

    `save_own_variables` stores the variables themselves; assigning one to
    the copy would share the original's buffer on JAX, and training the copy
    (which donates its buffers to the jitted step) would delete the
    original's weights.
    """
    if isinstance(value, keras.Variable) or keras.ops.is_tensor(value):
        return np.array(keras.ops.convert_to_numpy(value))
    return value


def read_values(variables) -> list[np.ndarray]:
    """The current values of Keras `variables` as read-only numpy arrays.

    On TensorFlow each value is read with one `ReadVariableOp` and viewed
    without a copy (six times faster than `keras.ops.convert_to_numpy` per
    variable, which matters for the hundreds of small variables of a
    BatchNormalization-heavy model); later assignments to the variable do not
    change the array (TensorFlow copies on write while a read is alive). Other
    backends, and variables that are not plain resource variables (a
    distributed one), are read with `keras.ops.convert_to_numpy`.

    Example:

    ```python
    kernel, bias = read_values(layer.weights)
    ```
    """
    out = []
    on_tf = keras.backend.backend() == "tensorflow"
    for variable in variables:
        array = _read_tf(variable) if on_tf else None
        if array is None:
            array = np.asarray(keras.ops.convert_to_numpy(variable))
        array.flags.writeable = False
        out.append(array)
    return out


def _read_tf(variable) -> np.ndarray | None:
    """One `ReadVariableOp`, viewed as numpy; None where that does not apply."""
    import tensorflow as tf

    value = getattr(variable, "_value", None)
    if type(value).__name__ != "ResourceVariable" or not tf.executing_eagerly():
        return None
    read = tf.raw_ops.ReadVariableOp(resource=value.handle, dtype=value.dtype)
    to_numpy = getattr(read, "_numpy", None)  # a view; `numpy()` copies
    return np.asarray(to_numpy() if to_numpy is not None else read.numpy())  # 0-d: an array


def copy_state(source: keras.layers.Layer, target: keras.layers.Layer) -> None:
    """Copies all the state Keras saves of built `source` into built `target`.

    `target` must have the structure of `source` (a copy by `copy_layer`):
    the same sublayers in the same order, each with the same variables.

    Raises:
        LayerCopyError: if the structures differ, naming the layer.
    """
    if source is target:
        return
    sources = list(source._flatten_layers(include_self=True, recursive=True))
    targets = list(target._flatten_layers(include_self=True, recursive=True))
    if len(sources) != len(targets):
        raise LayerCopyError(
            f"Cannot copy the state of layer {_describe(source)}: its copy has "
            f"{len(targets)} (sub)layers, the original {len(sources)}. The layer's config "
            "does not re-create the same layer."
        )
    for src, dst in zip(sources, targets, strict=True):
        store = {}
        src.save_own_variables(store)
        store = {key: _detached(value) for key, value in store.items()}
        try:
            dst.load_own_variables(store)
        except ValueError as error:
            raise LayerCopyError(
                f"Cannot copy the state of layer {_describe(src)} into its copy: {error}"
            ) from error
        if _overrides(src, "save_assets"):
            with tempfile.TemporaryDirectory(prefix="keras_psp_assets_") as folder:
                src.save_assets(folder)
                dst.load_assets(folder)


def call_copy(layer, copies: dict, args, kwargs, weights: list | None = None) -> list:
    """Calls the copy of `layer` in `copies` (by `id`; made on the first call,
    then its state copied, or `weights` set) on `args`, when rebuilding a
    graph; a `keras.ops` operation is called as it is. Returns the flat outputs.
    """
    if not isinstance(layer, keras.layers.Layer):
        return keras.tree.flatten(layer(*args, **kwargs))
    first = id(layer) not in copies
    if first:
        copies[id(layer)] = copy_layer(layer)
    outputs = keras.tree.flatten(copies[id(layer)](*args, **kwargs))
    if first and weights is not None:
        copies[id(layer)].set_weights(weights)
    elif first:
        copy_state(layer, copies[id(layer)])
    return outputs
