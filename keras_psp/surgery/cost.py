"""What `slim` would give, from its channel plan alone: no model is rebuilt.

`plan_channels` decides every width of the slim model; the MAC functions of
`keras_psp.flops` count a layer from its input and output shapes. Counting
each live op at its planned widths gives `count_flops(slim(model))` at a
fraction of the cost of building the slim model, which is what ranking and
budget searches need (they evaluate many candidate cuts).
"""

from __future__ import annotations

import numpy as np

from keras_psp.counting import call_macs, is_composite
from keras_psp.folding import unwrap
from keras_psp.graph import counting_graph, not_fixed, width
from keras_psp.layers import family
from keras_psp.surgery.slim import plan_channels


def planned_macs(plan) -> int:
    """Multiply-accumulates per example of the model `plan` describes.

    Args:
        plan: A `keras_psp.surgery.slim.ChannelPlan`.

    Returns:
        The MACs `count_flops` would count on the slim model, an int.
    """
    graph, total = plan.graph, 0
    for op, rule in zip(graph.ops, plan.rules, strict=True):
        if id(op) not in plan.live:
            continue
        if family(op.layer).macs is None and not is_composite(op.layer):
            continue
        shapes = []
        for key, kept in ((op.inputs[0], plan.own.get(id(op))), (op.outputs[0], None)):
            shape = list(graph.shapes[key])
            if width(shape):
                shape[-1] = int(np.sum(plan.present[key] if kept is None else kept))
            shapes.append(tuple(shape))
        others = [graph.shapes[k] for k in op.inputs[1:]]
        if any(None in s[1:] for s in [shapes[0], *others]):
            raise ValueError(not_fixed(op.layer, graph.shapes[op.inputs[0]]))
        total += int(call_macs(op.layer, op, [shapes[0], *others], shapes[1], rule.shrunk(op)))
    return total


def slim_flops(model, alphas: dict | None = None, gather: bool = True,
               multiple_of: int | None = None, input_shape=None) -> int:
    """`count_flops(slim(model, gather=..., multiple_of=...))`, without building it.

    Args:
        model: A PSP-wrapped model, or a plain one with zeroed structures.
        alphas: α values to use instead of the PSP layers' own, by `id` of
            the layer (a candidate cut); None: their α.
        gather, multiple_of: As in `slim`.
        input_shape: As in `count_flops`.
    """
    graph = unwrap(counting_graph(model, input_shape), alphas)
    return planned_macs(plan_channels(graph, gather, multiple_of))
