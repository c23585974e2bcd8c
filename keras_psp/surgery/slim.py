"""`slim`: rebuild a pruned model physically smaller, exactly."""

from __future__ import annotations

import dataclasses
import warnings

import keras
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from keras_psp.cloning import check_graph_model, psp_layers, strip
from keras_psp.surgery.graph import Graph, flatten, rebuild
from keras_psp.surgery.rules import Rule, rule_for


@dataclasses.dataclass
class ChannelPlan:
    """Which channels of every tensor survive surgery.

    Attributes:
        graph: The flat graph of the (stripped) model.
        rules: The rule of each op, in graph order.
        present: For each tensor key, a bool array over its channels.
        barriers: Names of unknown layers whose channels were all kept.
    """

    graph: Graph
    rules: list[Rule]
    present: dict[int, np.ndarray]
    barriers: list[str]


def plan_channels(graph: Graph) -> ChannelPlan:
    """Finds the channels that can leave the model without changing it.

    Channels coupled by a rule (through BN, merges, concatenation, ...) form
    groups, found as the connected components of the coupling graph. A group
    stays when any of its channels is required: read by a kept output of a
    boundary layer (non-zero weights), a model input or output, or a tensor of
    a fixed layer. Dropping outputs of boundary layers can free their inputs,
    so the search repeats until nothing changes.
    """
    shapes = graph.shapes
    keys = list(shapes)
    offset, total = {}, 0
    for key in keys:
        offset[key] = total
        total += int(shapes[key][-1])

    rules, barriers, rows, cols = [], [], [], []
    required = np.zeros(total, bool)
    for key in graph.input_keys + graph.output_keys:
        required[offset[key] : offset[key] + shapes[key][-1]] = True
    for op in graph.ops:
        rule, known = rule_for(op, shapes)
        rules.append(rule)
        if rule.fixed:
            for key in op.inputs + op.outputs:
                required[offset[key] : offset[key] + shapes[key][-1]] = True
            if not known:
                barriers.append(op.layer.name)
        for i, ch_in, o, ch_out in rule.edges(op, shapes):
            rows.append(offset[op.inputs[i]] + ch_in)
            cols.append(offset[op.outputs[o]] + ch_out)
    rows = np.concatenate(rows) if rows else np.zeros(0, int)
    cols = np.concatenate(cols) if cols else np.zeros(0, int)
    adjacency = coo_matrix((np.ones(len(rows), bool), (rows, cols)), shape=(total, total))
    _, labels = connected_components(adjacency, directed=False)

    boundaries = [
        (op, rule, rule.connectivity(op.layer))
        for op, rule in zip(graph.ops, rules, strict=True)
        if rule.boundary
    ]
    present = np.ones(total, bool)
    while True:
        needed = required.copy()
        for op, _, conn in boundaries:
            start = offset[op.outputs[0]]
            kept_out = present[start : start + conn.shape[1]]
            reads = conn[:, kept_out].any(axis=1)
            if not reads.any():  # keep one channel so the layer still has an input
                reads[0] = True
            start = offset[op.inputs[0]]
            needed[start : start + conn.shape[0]] |= reads
        group_kept = np.zeros(labels.max() + 1, bool)
        group_kept[labels[needed]] = True
        new_present = group_kept[labels]
        for key in keys:  # no tensor may lose every channel
            view = new_present[offset[key] : offset[key] + shapes[key][-1]]
            if not view.any():
                group_kept[labels[offset[key]]] = True
                new_present = group_kept[labels]
        if np.array_equal(new_present, present):
            break
        present = new_present
    per_tensor = {k: present[offset[k] : offset[k] + shapes[k][-1]] for k in keys}
    return ChannelPlan(graph, rules, per_tensor, barriers)


def slim(model: keras.Model, check_inputs=None, atol: float = 1e-4) -> keras.Model:
    """Returns a physically smaller plain Keras model computing the same.

    PSP wrappers are folded first (`strip`); then every channel that no kept
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
        atol: Relative tolerance for `check_inputs`.

    Example:

    ```python
    small = keras_psp.slim(wrapped, check_inputs=x_test[:64])
    small.save("slim.keras")
    ```
    """
    check_graph_model(model, "slim")
    pruned = strip(model) if psp_layers(model) else model
    graph = flatten(pruned)
    plan = plan_channels(graph)
    if plan.barriers:
        warnings.warn(
            "slim: surgery does not know layer(s) "
            f"{', '.join(plan.barriers)}; every channel through them is kept.",
            stacklevel=2,
        )

    rule_of = {id(op): rule for op, rule in zip(graph.ops, plan.rules, strict=True)}

    def make(op):
        rule = rule_of[id(op)]
        present_in = [plan.present[k] for k in op.inputs]
        present_out = [plan.present[k] for k in op.outputs]
        return rule.rebuild(op, present_in, present_out)

    small = rebuild(graph, make, name=f"{model.name}_slim")
    if check_inputs is not None:
        from keras_psp.verify import verify

        reference = np.concatenate(
            [np.ravel(np.asarray(y)) for y in keras.tree.flatten(pruned.predict(check_inputs, verbose=0))]
        )
        scale = max(float(np.abs(reference).max()), 1e-12)
        diff = verify(pruned, small, check_inputs)
        if not diff <= atol * scale:
            raise RuntimeError(
                f"slim: the slim model differs from '{model.name}' by {diff:.3g} "
                f"(allowed {atol * scale:.3g}). Please report this with the model."
            )
    return small
