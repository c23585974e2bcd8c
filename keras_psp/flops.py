"""Cost of a model: multiply-accumulates (`count_flops`) and parameters.

Like the pruning literature, "FLOPs" here are the multiply-accumulates (MACs)
of convolution and dense layers for one example; batch normalization,
activations, pooling, merges and biases count zero. TensorFlow's profiler
counts 2 FLOPs per MAC, so its conv/matmul total is twice `count_flops`.

Each layer family's MAC function (`keras_psp.register_layer(..., macs=...)`) is
applied to every call in the model's flat functional graph (nested models inlined).
"""

from __future__ import annotations

import math
import warnings

import keras
from keras.src.models.functional import Functional

from keras_psp.cloning import check_graph_model
from keras_psp.counting import call_macs, invisible_weights, is_composite
from keras_psp.graph import counted_at, counting_graph, flatten, not_fixed  # noqa: F401 (public)
from keras_psp.layers import family
from keras_psp.surgery.cost import slim_flops
from keras_psp.surgery.slim import slim
from keras_psp.wrapper import PSP


def _check(model, action: str) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(f"Cannot {action} {model!r}: expected a keras.Model.")
    if not isinstance(model, (keras.Sequential, Functional)):
        raise TypeError(
            f"Cannot {action} model '{model.name}': a subclassed model ({type(model).__name__}) "
            "has no functional graph. Rebuild it with the functional API or keras.Sequential."
        )
    check_graph_model(model, action)


def count_flops(model: keras.Model, pruned: bool = False, input_shape=None) -> int:
    """Multiply-accumulates of one example through `model` ("FLOPs").

    Counts the MACs of convolutions (all kinds, grouped included) and `Dense`
    layers, per call, on the shapes of the model's functional graph; other
    layers count zero (the pruning literature's convention). A PSP wrapper
    counts as the layer it wraps. Layers with weights of an unregistered type
    count zero, with one warning naming them (see `keras_psp.register_layer`).

    Args:
        model: A built Sequential or functional model with fixed input shape
            (batch dimension excepted); nested models are counted inline.
        pruned: If True, count the model that `keras_psp.slim(model)` returns.
        input_shape: For a model built for inputs of variable size (token
            sequences): the size of one example to count at, without the
            batch axis; a list of shapes in input order or a dict by input
            name for several inputs (None for an input of fixed shape).
            None: the model's own shapes, which must be fixed.

    Returns:
        The number of multiply-accumulates per example, an int.

    Example:

    ```python
    model = keras_psp.models.cifar_resnet(56)
    keras_psp.count_flops(model)                # 125_747_840
    keras_psp.count_flops(wrapped, pruned=True)  # after slim
    keras_psp.count_flops(bert, input_shape={"token_ids": (128,), "segment_ids": (128,),
                                             "padding_mask": (128,)})
    ```
    """
    _check(model, "count the FLOPs of")
    if pruned:  # from surgery's channel plan: no model is built
        return slim_flops(model, input_shape=input_shape)
    per_layer, unknown, share = _walk(model, input_shape)
    _warn_unknown(unknown, share)
    return sum(per_layer.values())


def layer_flops(model: keras.Model, input_shape=None) -> dict[str, int]:
    """Multiply-accumulates per example of each layer of `model`, by name.

    The same count as `count_flops`, before summing: one entry per layer with
    a MAC function (see `keras_psp.register_layer`), in graph order, its calls summed
    (a shared layer, a nested model called twice). A PSP wrapper counts as
    the layer it wraps, under the wrapper's name. Layers without a MAC
    function are left out.

    Args:
        model: A built Sequential or functional model with fixed input shape.
        input_shape: As in `count_flops`.

    Returns:
        A dict `{layer name: MACs}`; its values sum to `count_flops(model)`.

    Example:

    ```python
    keras_psp.flops.layer_flops(model)   # {"conv0": 4608, "conv1": 73728, ...}
    ```
    """
    _check(model, "count the FLOPs of")
    per_layer, unknown, share = _walk(model, input_shape)
    _warn_unknown(unknown, share)
    return per_layer


def _inner(op):
    return op.layer.layer if isinstance(op.layer, PSP) else op.layer


def _hidden(model, graph) -> tuple[list[str], float]:
    """(the layers with weights whose cost nothing counts, the share of the
    model's weights they hold). No MAC is counted: nothing is traced."""
    unknown, hidden, seen = [], 0, set()
    for op in graph.ops:
        layer = _inner(op)
        if not isinstance(layer, keras.layers.Layer) or id(layer) in seen:
            continue
        seen.add(id(layer))
        invisible = invisible_weights(layer)
        if invisible:
            unknown.append(f"'{layer.name}' ({type(layer).__name__})")
            hidden += invisible
    total = sum(math.prod(v.shape) for v in {id(v): v for v in model.weights}.values())
    return unknown, hidden / total if total else 0.0


def _walk(model, input_shape=None) -> tuple[dict[str, int], list[str], float]:
    """(MACs by layer name, unknown layers with weights, the share of the
    model's weights in them) of the flat graph, at `input_shape` if given."""
    graph = counting_graph(model, input_shape)
    per_layer: dict[str, int] = {}
    for op in graph.ops:
        layer = _inner(op)  # a layer, or a keras.ops operation (einsum, matmul)
        if family(layer).macs is None and not is_composite(layer):
            continue
        shapes = [graph.shapes[k] for k in op.inputs]
        output_shape = graph.shapes[op.outputs[0]]
        if any(None in s[1:] for s in shapes):  # (an EinsumDense may leave output sizes open)
            raise ValueError(not_fixed(layer, shapes[0]))
        name = op.layer.name
        per_layer[name] = per_layer.get(name, 0) + int(call_macs(layer, op, shapes, output_shape))
    return per_layer, *_hidden(model, graph)


def invisible_share(model: keras.Model) -> float:
    """The share of `model`'s weights in layers whose cost `count_flops` cannot see.

    0.0 when every layer with weights is counted (its family has a MAC
    function, or it is a composite of such layers) or known to cost nothing
    (BatchNormalization, Embedding, ...). Above 0, FLOPs ratios are over the
    visible part of the model only. Cheap: no MAC is counted.

    Example:

    ```python
    if keras_psp.flops.invisible_share(model) > 0:
        print("count_flops misses part of this model")
    ```
    """
    _check(model, "count the FLOPs of")
    return _hidden(model, flatten(model))[1]


def _warn_unknown(unknown: list[str], share: float) -> None:
    if unknown:
        names = ", ".join(dict.fromkeys(unknown))
        warnings.warn(
            f"count_flops counted 0 MACs for layers of unknown type with weights: "
            f"{names}, holding {share:.1%} of the model's weights; FLOPs and their ratios "
            "cover the rest of the model only. Register their cost with "
            "keras_psp.register_layer(..., macs=...) (README, 'Extending keras_psp').",
            stacklevel=3,
        )


def count_params(model: keras.Model, pruned: bool = False) -> int:
    """Number of parameters of `model` (`model.count_params()`).

    Args:
        model: A built Sequential or functional model. For a PSP-wrapped model
            the α scales and their strength variables (one per PSP layer) count too.
        pruned: If True, count the model that `keras_psp.slim(model)` returns.

    Returns:
        The number of parameters, an int.

    Example:

    ```python
    keras_psp.count_params(wrapped, pruned=True)   # parameters after slim
    ```
    """
    _check(model, "count the parameters of")
    if pruned:
        return int(slim(model).count_params())
    return int(model.count_params())
