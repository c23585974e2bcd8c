"""Layer families: how keras_psp wraps, cuts and counts each type of layer.

Each family is one module here, registered with `register_layer` (README,
"Extending keras_psp"): a `LayerHandler` (α), a `Rule` (surgery) and a MAC
function (FLOPs), looked up by class hierarchy.
"""

from keras_psp.copying import copy_layer
from keras_psp.layers import (  # noqa: F401  (each registers its family)
    attention,
    conv_transpose,
    convolution,
    dense,
    depthwise,
    einsum_dense,
    elementwise,
    known,
    merging,
    operations,
    reshaping,
    separable,
)
from keras_psp.layers.base import (
    KERNEL_STRUCTURES,
    STRUCTURES,
    Boundary,
    Fixed,
    LayerHandler,
    MacFunction,
    Passthrough,
    Plan,
    Rule,
    attribute,
    axis_plan,
    kept,
    op_weights,
)
from keras_psp.layers.registry import (
    LayerFamily,
    family,
    handler_of,
    is_registered,
    register_layer,
    wrappable_types,
)

__all__ = [
    "KERNEL_STRUCTURES", "STRUCTURES", "Boundary", "Fixed", "copy_layer", "LayerFamily", "LayerHandler", "MacFunction",
    "Passthrough", "Plan", "Rule", "attribute", "axis_plan", "family", "handler_of", "is_registered",
    "kept", "op_weights", "register_layer", "wrappable_types",
]
