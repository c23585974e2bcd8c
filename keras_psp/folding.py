"""α folded into plain layers, on a model's flat graph, for the offline tools.

`strip`, `slim`, the FLOPs and latency plans read a PSP-wrapped model as if
it were the plain model that `strip` returns, without building it.
"""

from __future__ import annotations

from keras_psp.graph import Graph
from keras_psp.groups import fold_groups
from keras_psp.wrapper import PSP


def unwrap(graph: Graph, alphas: dict | None = None) -> Graph:
    """Makes each PSP op look like its plain layer with α folded in.

    Surgery then reads and copies plain layers without first cloning the
    whole model (`strip`), which halves its cost.

    Args:
        graph: The flat graph (changed in place and returned).
        alphas: α values to fold instead of the layers' own, by `id` of the
            α variable (of a PSP layer or a channel group; candidate cuts);
            the others fold their own α.
    """
    folded = {}
    for op in graph.ops:
        if isinstance(op.layer, PSP):
            wrapper = op.layer
            if id(wrapper) not in folded:  # a shared layer folds once
                folded[id(wrapper)] = wrapper.folded_weights(
                    (alphas or {}).get(id(wrapper.alpha)))
            op.arrays = folded[id(wrapper)]
            op.layer = wrapper.layer
    fold_groups(graph, alphas)
    return graph
