"""`slim`: rebuild a pruned model physically smaller, exactly."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import warnings

import keras
import numpy as np

from keras_psp.cloning import check_graph_model, iter_layers, psp_layers
from keras_psp.copying import copy_state
from keras_psp.folding import unwrap
from keras_psp.graph import Graph, flatten, rebuild, width
from keras_psp.layers import Rule
from keras_psp.layers.merging import Merge
from keras_psp.recalibration import recalibrate as _recalibrate
from keras_psp.surgery.constants import check_cut_layers, find_constants, probe_values
from keras_psp.surgery.coupling import couple, live_ops
from keras_psp.surgery.rules import rule_for
from keras_psp.verify import (
    check_inputs_argument,
    check_tolerance,
    max_difference,
    non_finite_error,
    outputs,
)


@dataclasses.dataclass
class ChannelPlan:
    """Which channels of every tensor survive surgery, and how ops change.

    Attributes:
        graph: The flat graph of the model, PSP layers unwrapped.
        rules: The rule of each op, in graph order.
        present: For each tensor key, a bool array over its channels.
        barriers: `(name, reason)` of the layers whose channels were all
            kept for a reason the user should know (an unknown type,
            channels_first).
        live: `id`s of the ops the outputs still depend on.
        own: For each boundary op, the input channels it still reads (a subset
            of the present ones when other consumers keep the rest).
        folded: For each boundary op, the constant values of the input
            channels it drops (0 elsewhere), to fold into its bias.
        dropped: For each merge, the constant inputs it drops.
        values: Per-channel values of the constant tensors surgery folds.
    """

    graph: Graph
    rules: list[Rule]
    present: dict[int, np.ndarray]
    barriers: list[tuple[str, str]]
    live: set[int]
    own: dict[int, np.ndarray]
    folded: dict[int, np.ndarray]
    dropped: dict[int, list[int]]
    values: dict[int, np.ndarray]


def plan_channels(
    graph: Graph, gather: bool = True, multiple_of: int | None = None
) -> ChannelPlan:
    """Finds the channels that can leave the model without changing it.

    Channels coupled by a rule (through BN, merges, concatenation, ...) form
    groups, found as the connected components of the coupling graph. A group
    stays when any of its channels is required: read by a kept output of a
    boundary layer (non-zero weights) unless it is a constant the layer can
    fold, a model input or output, or a tensor of a fixed layer. Dropping
    outputs of boundary layers can free their inputs, so the search repeats
    until nothing changes. Merges drop inputs that are constant everywhere
    (a cut residual branch), and ops nothing depends on any more disappear.
    `gather` and `multiple_of` are as in `slim`.
    """
    shapes = graph.shapes
    rules, barriers, conn = [], [], {}
    for op in graph.ops:
        rule, why = rule_for(op, shapes)
        rules.append(rule)
        if why is not None and op.layer.name not in dict(barriers):
            barriers.append((op.layer.name, why))
        if rule.boundary:
            conn[id(op)] = rule.connectivity(op)
    check_cut_layers(graph, conn)
    const = find_constants(graph, rules, conn)
    const_in = {id(op): [const[k] for k in op.inputs] for op in graph.ops}
    shared = graph.shared()  # layers called more than once: rebuilt once, shared again
    shared_ops = {id(op) for calls in shared.values() for op in calls}
    dropped = {}
    for op, rule in zip(graph.ops, rules, strict=True):
        if isinstance(rule, Merge) and id(op) not in shared_ops:
            drop = rule.constant_inputs(op, const_in[id(op)], shapes)
            if drop:
                dropped[id(op)] = drop
    live = live_ops(graph, dropped)
    ops = [(op, rule) for op, rule in zip(graph.ops, rules, strict=True) if id(op) in live]

    wanted = [op.inputs[i] for op, _ in ops for i in dropped.get(id(op), ())]
    wanted += [op.inputs[0] for op, rule in ops if rule.boundary and const[op.inputs[0]].any()]
    values = probe_values(graph, wanted)
    droppable = {}
    for op, rule in ops:
        if rule.boundary:
            key = op.inputs[0]
            can = const[key].copy()
            if can.any() and (not rule.folds(op.layer) or id(op) in shared_ops):
                can &= values[key] == 0  # a zero channel reads like zero padding
            droppable[id(op)] = can

    rule_of = {id(op): rule for op, rule in zip(graph.ops, rules, strict=True)}
    coupling = couple(graph, ops, rule_of, dropped, shared)
    keys, offset, total = coupling.keys, coupling.offset, coupling.total
    required, labels, span = coupling.required, coupling.labels, coupling.span

    # connectivity as 0/1 floats: which inputs the kept outputs read is one BLAS product
    boundaries = [(op, conn[id(op)].astype(np.float32), droppable[id(op)])
                  for op, rule in ops if rule.boundary]

    def reads(op, matrix, can, present):
        used = (matrix @ present[span(op.outputs[0])].astype(np.float32) > 0) & ~can
        if not used.any():  # keep one channel so the layer still has an input
            used[0] = True
        return used

    def settle(required):
        present = np.ones(total, bool)
        while True:
            needed = required.copy()
            for op, matrix, can in boundaries:
                needed[span(op.inputs[0])] |= reads(op, matrix, can, present)
            group_kept = np.zeros(labels.max(initial=-1) + 1, bool)
            group_kept[labels[needed]] = True
            new_present = group_kept[labels]
            for key in keys:  # no tensor may lose every channel
                if width(shapes[key]) and not new_present[span(key)].any():
                    group_kept[labels[offset[key]]] = True
                    new_present = group_kept[labels]
            if np.array_equal(new_present, present):
                return present
            present = new_present

    present = settle(required)
    while multiple_of:  # keep some cut channels so that widths are multiples
        extra = np.zeros(total, bool)
        for op, _, _ in boundaries:
            where = span(op.outputs[0])
            absent = np.flatnonzero(~present[where])
            extra[where.start + absent[: -int(present[where].sum()) % multiple_of]] = True
        if not extra.any():
            break
        required = required | extra
        present = settle(required)

    own, folded = {}, {}
    for op, matrix, can in boundaries:
        key = op.inputs[0]
        own[id(op)] = present[span(key)].copy()
        if gather:
            own[id(op)] &= reads(op, matrix, can, present)
            if multiple_of:
                spare = np.flatnonzero(present[span(key)] & ~own[id(op)])
                own[id(op)][spare[: -int(own[id(op)].sum()) % multiple_of]] = True
    for calls in shared.values():  # a shared layer reads the same channels in every call
        if all(id(op) in own for op in calls):
            union = np.logical_or.reduce([own[id(op)] for op in calls])
            own.update({id(op): union.copy() for op in calls})
    for op, _, _ in boundaries:
        key = op.inputs[0]
        dropped_const = const[key] & ~own[id(op)]
        if dropped_const.any():
            folded[id(op)] = np.where(dropped_const, values[key], 0.0)
    per_tensor = {k: present[span(k)] for k in keys}
    return ChannelPlan(graph, rules, per_tensor, barriers, live, own, folded, dropped, values)


def _emit(plan: ChannelPlan, rule: Rule, op, values: dict, built: dict) -> list:
    """Builds the slim version of `op` on the new tensors in `values`.

    `built` maps `id` of a layer called more than once to its rebuilt layer:
    later calls reuse it, so the slim model shares it the same way.
    """
    present_in = [plan.present[k] for k in op.inputs]
    present_out = [plan.present[k] for k in op.outputs]
    if id(op) in plan.dropped:
        drop = plan.dropped[id(op)]
        keep_out = present_out[0]
        tensors = [values[k] for i, k in enumerate(op.inputs) if i not in drop]
        consts = [plan.values[op.inputs[i]][keep_out] for i in drop]
        return [rule.without_constants(op, tensors, drop, consts)]
    mapping = {tid: values[key] for tid, key in op.local.items()}
    if rule.boundary:
        own = plan.own[id(op)]
        if not np.array_equal(own, present_in[0]):
            index = np.flatnonzero(own[present_in[0]]).astype("int32")
            source = values[op.inputs[0]]
            gathered = keras.ops.take(source, index, axis=-1)
            mapping = {tid: gathered if v is source else v for tid, v in mapping.items()}
        bias = None
        if id(op) in plan.folded and rule.folds(op.layer):
            bias = rule.fold(op, plan.folded[id(op)])
        if id(op.layer) not in built:
            layer, weights = rule.rebuild(op, [own], present_out, bias=bias)
    elif id(op.layer) not in built:
        layer, weights = rule.rebuild(op, present_in, present_out)
    args, kwargs = op.node.arguments.fill_in(mapping)
    if id(op.layer) in built:
        return keras.tree.flatten(built[id(op.layer)](*args, **kwargs))
    if isinstance(op.layer, keras.layers.Layer):
        built[id(op.layer)] = layer
    if weights is None:
        return keras.tree.flatten(layer(*args, **kwargs))
    values = None if isinstance(weights, keras.layers.Layer) else weights
    with _zero_initializers(layer), _initial_values(layer, values) as created:
        outputs = keras.tree.flatten(layer(*args, **kwargs))
    if isinstance(weights, keras.layers.Layer):
        copy_state(weights, layer)
    elif [id(v) for v in created] != [id(v) for v in layer.weights]:
        layer.set_weights(weights)  # not all built from `weights`, or in another order
    return outputs


def _check_against(model, small, expected, check_inputs, atol) -> None:
    """Raises if `small` differs from `model` on `check_inputs` beyond `atol`
    (relative to the largest |output|; None: from the dtype policy)."""
    scale = max(max(float(np.abs(e).max(initial=0.0)) for e in expected), 1e-12)
    diff = max_difference(model, expected, small, outputs(small, check_inputs))
    if atol is None:
        low = any(keras.backend.standardize_dtype(layer.compute_dtype)
                  in ("float16", "bfloat16") for layer in iter_layers(model))
        atol = 2e-2 if low else 1e-4
    if not diff <= atol * scale:
        raise RuntimeError(
            f"slim: the slim model differs from '{model.name}' by {diff:.3g} "
            f"(allowed {atol * scale:.3g}: atol {atol:g} × max |output| {scale:.3g}). "
            "This is a bug in keras_psp's surgery: please report it with the model."
        )


@contextlib.contextmanager
def _zero_initializers(layer):
    """Zeros for `layer`'s initializers while it builds; its own ones after.

    The weights are set right after the build, so random initial values are
    wasted work, and on JAX each new kernel shape compiles the random
    initializer (about 0.7 s a layer on a CPU). The layer's config is unchanged.
    """
    saved = {name: value for name, value in vars(layer).items()
             if name.endswith("_initializer") and isinstance(value, keras.initializers.Initializer)}
    try:
        for name in saved:
            setattr(layer, name, keras.initializers.Zeros())
        yield
    finally:
        for name, value in saved.items():
            setattr(layer, name, value)


class _Value(keras.initializers.Initializer):
    """Initializes a variable with a given array."""

    def __init__(self, value: np.ndarray):
        self.value = value

    def __call__(self, shape, dtype=None):
        return np.asarray(self.value, dtype=keras.backend.standardize_dtype(dtype))


@contextlib.contextmanager
def _initial_values(layer, weights: list | None):
    """While `layer` builds, its k-th `add_weight` starts from `weights[k]`.

    Yields the variables created, in order, with None for each that did not
    take its value that way (its shape differed); the caller compares them
    with the layer's `weights` and, unless all match in order, sets the
    weights after the build. Creating each variable from its final value
    saves an initializer and an assignment per variable on TensorFlow.
    """
    created: list = []
    if not weights:
        yield created
        return
    original = layer.add_weight

    def add_weight(*args, **kwargs):
        k = len(created)
        shape = kwargs.get("shape", args[0] if args else None)
        matches = k < len(weights) and shape is not None and tuple(shape) == weights[k].shape
        if matches and len(args) > 1:
            args = (args[0], _Value(weights[k]), *args[2:])
        elif matches:
            kwargs["initializer"] = _Value(weights[k])
        variable = original(*args, **kwargs)
        created.append(variable if matches else None)
        return variable

    object.__setattr__(layer, "add_weight", add_weight)
    try:
        yield created
    finally:
        vars(layer).pop("add_weight", None)


def slim_graph(graph: Graph, plan: ChannelPlan, name: str) -> keras.Model:
    """The slim model of an unwrapped `graph` as `plan` says (no checks)."""
    rule_of = {id(op): rule for op, rule in zip(graph.ops, plan.rules, strict=True)}
    built = {}
    with _cyclic_gc_paused(), _one_tf_variable_name():
        return rebuild(
            graph,
            lambda op, values: _emit(plan, rule_of[id(op)], op, values, built),
            name=name,
            live=plan.live,
        )


@contextlib.contextmanager
def _one_tf_variable_name():
    """On TensorFlow, the slim model's variables share one TensorFlow-level name.

    TensorFlow compiles an eager kernel for each new variable handle whose
    (shape, name) it has not seen, about 1.5 ms each; a slim model's
    hundreds of variables have new shapes, and without this each of a
    BatchNormalization's four same-shaped variables (and the bias of the
    convolution before it) would be a new name too. Keras's own variable names
    and paths, which saving, export and users see, are unchanged.
    """
    if keras.backend.backend() != "tensorflow":
        yield
        return
    import tensorflow as tf

    def creator(next_creator, **kwargs):
        with tf.name_scope(""):  # no layer scope in the handle's name
            return next_creator(**{**kwargs, "name": "slim"})

    with tf.variable_creator_scope(creator):
        yield


@contextlib.contextmanager
def _cyclic_gc_paused():
    """No cyclic garbage collection while the slim model is built.

    Building a layer allocates many small objects, and every few hundred of
    them Python scans the whole heap of TensorFlow and Keras objects for
    cycles (a tenth of the build on DenseNet121). Nothing built here is
    garbage; the collector resumes, as it was, afterwards.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def slim(
    model: keras.Model,
    check_inputs=None,
    atol: float | None = None,
    gather: bool = True,
    multiple_of: int | None = None,
    recalibrate=None,
    recalibration_steps: int | None = None,
) -> keras.Model:
    """Returns a physically smaller plain Keras model computing the same.

    PSP wrappers are folded first (as `strip` does); then every channel no kept
    structure reads any more is removed from its producer and all consumers:
    smaller kernels, fewer BatchNormalization channels, fewer Dense units.
    Channels coupled through residual merges, concatenations or depthwise
    convolutions leave together, and only when nothing still needs them.
    Layers surgery does not know keep all their channels (one warning names
    them). The input model is not modified.

    Args:
        model: A PSP-wrapped model, or a plain one with zeroed structures.
        check_inputs: Optional inputs; when given, `slim` compares the slim
            model with the pruned one on them and raises if the largest
            difference exceeds `atol` times the largest output magnitude.
        atol: Relative tolerance for `check_inputs`; None: 1e-4, or 2e-2
            when the model computes in float16/bfloat16 (mixed precision
            rounds the pruned and the slim model differently).
        gather: When a consumer's own inputs are cut but other consumers
            keep those channels of a shared tensor (a residual stream, a
            DenseNet concatenation), take just its channels before it
            (`keras.ops.take`) so that its kernel shrinks too: fewer FLOPs.
            On CPU runtimes the gather's copy can cost more than it saves
            (see benchmarks/slim_speed.py); `False` keeps zero weights instead.
        multiple_of: Round every layer's output width (and, with `gather`,
            every gathered width) up to a multiple of this, keeping some cut
            channels: vectorized kernels (XLA, XNNPACK) run channel counts
            that are multiples of 8 much faster. `None`: exact minimum.
        recalibrate: Optional training inputs (as `keras_psp.recalibrate`
            takes them): after the check, the slim model's BatchNormalization
            statistics are re-estimated on them, which a model whose
            structures were cut without it needs (its moving statistics
            predate the cut). The slim model then differs from the pruned
            one by exactly that update. None: statistics as they were.
        recalibration_steps: Batches of `recalibrate` to use; None: all.

    Example:

    ```python
    small = keras_psp.slim(wrapped, check_inputs=x_test[:64])
    small.save("slim.keras")
    small = keras_psp.slim(wrapped, recalibrate=x_train[:4096])  # fresh BN statistics
    ```
    """
    check_graph_model(model, "slim")
    for layer in psp_layers(model):
        layer.check_finite("slim the model")
    check_tolerance(atol, "slim")
    expected = None
    if check_inputs is not None:  # up front: refuse bad arguments before the work
        check_inputs_argument(check_inputs, "slim")
        expected = outputs(model, check_inputs)
        if not all(np.all(np.isfinite(e)) for e in expected):
            raise non_finite_error(model, "slim")
    graph = unwrap(flatten(model))
    if multiple_of is not None and (not isinstance(multiple_of, int) or multiple_of < 1):
        raise ValueError(f"slim: multiple_of must be a positive integer, got {multiple_of!r}.")
    plan = plan_channels(graph, gather, multiple_of)
    if plan.barriers:
        listed = ", ".join(f"'{name}' ({why})" for name, why in plan.barriers)
        warnings.warn(
            f"slim: surgery keeps every channel through layer(s) {listed}; structures cut "
            "in or next to them stay as zero weights. Surgery handles channels_last layers "
            "of the types it knows; to teach it a layer of your own, register it with "
            "keras_psp.register_layer(..., rule=...) (README, 'Extending keras_psp').",
            stacklevel=2,
        )

    small = slim_graph(graph, plan, name=f"{model.name}_slim")
    if check_inputs is not None:
        _check_against(model, small, expected, check_inputs, atol)
    if recalibrate is not None:
        _recalibrate(small, recalibrate, steps=recalibration_steps)
    return small
