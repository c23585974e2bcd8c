"""Which surgery rule applies to a layer call (`keras_psp.layers` holds the rules).

Every layer family registers one `Rule` (`keras_psp.layers.register_layer`):

- `Passthrough` layers (BN, activations, pooling, padding, ...) carry channel
  `c` of their input to channel `c` of their output;
- `Merge` layers (Add, Multiply, ...) force one channel set on all inputs and
  the output; `Concatenate` maps channels by offset; `Flatten` maps channel
  `c` to the strided positions `c, c + C, c + 2C, ...`;
- `Boundary` layers (Conv, Dense, ...) decouple their input channels from
  their output channels and say, through a connectivity matrix, which input
  channels their kept outputs still read;
- `Fixed` layers keep every channel of their inputs and outputs.
"""

from __future__ import annotations

import keras

from keras_psp.graph import width
from keras_psp.layers import Fixed, Rule, family


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _spans_channels_constant(op) -> bool:
    """The call takes a constant tensor (not a graph tensor) with a channel
    axis, `x * weights` say: its channels would not shrink with `x`'s."""
    def spans(value) -> bool:
        shape = getattr(value, "shape", None)
        return (not isinstance(value, keras.KerasTensor) and shape is not None
                and len(shape) >= 1 and shape[-1] not in (None, 1))

    arguments = op.node.arguments
    return any(spans(v) for v in keras.tree.flatten((arguments.args, arguments.kwargs)))


def rule_for(op, shapes) -> tuple[Rule, str | None]:
    """The rule of `op`, and why it keeps every channel when the user should
    know (None when there is nothing to say).

    Configurations a rule does not cover (`Rule.applies`: grouped
    convolution, BN on another axis, Concatenate on another axis,
    broadcasting merges, reshapes that move the channel axis), calls with a
    constant tensor argument across the channels, channels of unknown
    number and `keras.ops` operations without a rule fall back to `Fixed`
    silently; a layer without a rule and `data_format="channels_first"` fall
    back with a reason, which `slim` reports.
    """
    layer = op.layer
    rule = family(layer).rule
    if rule is None:
        if not isinstance(layer, keras.layers.Layer):
            return Fixed(), None  # a keras.ops operation: no weights, nothing to report
        return Fixed(), f"unknown type {type(layer).__name__}"
    if _spans_channels_constant(op):
        return Fixed(), None
    if not _channels_last(layer):
        return Fixed(), "data_format='channels_first'"
    if rule.fixed:  # keeps every channel; its own rebuild may still shrink the layer inside
        return rule, None
    in_shapes = [shapes[k] for k in op.inputs]
    out_shapes = [shapes[k] for k in op.outputs]
    if not all(width(s) for s in in_shapes + out_shapes):
        return Fixed(), None  # channels of unknown number (token ids): nothing to cut
    if not rule.applies(layer, in_shapes, out_shapes):
        return Fixed(), None
    return rule, None
