"""Per-layer surgery rules: how channels couple, and how a layer shrinks.

Every layer type maps to one `Rule` in a registry:

- `Passthrough` layers (BN, activations, pooling, padding, ...) carry channel
  `c` of their input to channel `c` of their output;
- `Merge` layers (Add, Multiply, ...) force one channel set on all inputs and
  the output; `Concatenate` maps channels by offset; `Flatten` maps channel
  `c` to the strided positions `c, c + C, c + 2C, ...`;
- `Boundary` layers (Conv, Dense, ...) decouple their input channels from
  their output channels and say, through a connectivity matrix, which input
  channels their kept outputs still read;
- `Fixed` layers keep every channel of their inputs and outputs.

A rule's `edges` list coupled channel pairs as
`(input index, input channels, output index, output channels)`; its
`constant` says which output channels are constant whatever the input (a cut
filter emits act(β) after BN and bias), given which input channels are.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers as L

from keras_psp.copying import copy_layer
from keras_psp.groups import ChannelGroups
from keras_psp.surgery.graph import width


def _weights(op) -> list[np.ndarray]:
    """The op's weights as numpy arrays (a PSP layer's with α folded in).

    A new list of shared, read-only arrays: rules slice them into new ones
    and never write into them. A plain layer's are read once per op.
    """
    if op.arrays is None:
        if op.plain_weights is None:
            op.plain_weights = [np.asarray(w) for w in op.layer.get_weights()]
        return list(op.plain_weights)
    return list(op.arrays)


class Rule:
    """How one layer type couples channels and shrinks."""

    boundary = False
    fixed = False

    def edges(self, op, shapes) -> list[tuple]:
        return []

    def constant(self, op, const_in: list[np.ndarray], shapes) -> list[np.ndarray]:
        """Bool per output channel: True where it cannot depend on the input."""
        return [np.zeros(width(shapes[key]), bool) for key in op.outputs]

    def rebuild(self, op, present_in, present_out):
        """Returns `(new_layer, state)` for the kept channels.

        `state` is a list of weight arrays for the new layer, a layer whose
        whole state the new one takes (`keras_psp.copying.copy_state`: an
        adapted `Normalization`, a lookup vocabulary), or None.
        """
        if not isinstance(op.layer, keras.layers.Layer):
            return op.layer, None
        if op.arrays is not None:  # a PSP layer's, α folded in
            return copy_layer(op.layer), _weights(op)
        return copy_layer(op.layer), op.layer


class Fixed(Rule):
    """Keeps every channel flowing in and out (the safe default)."""

    fixed = True


class Passthrough(Rule):
    """Channel `c` in is channel `c` out; per-channel weights are sliced."""

    def edges(self, op, shapes):
        channels = np.arange(shapes[op.inputs[0]][-1])
        return [(0, channels, 0, channels)]

    def constant(self, op, const_in, shapes):
        return [const_in[0].copy()]

    def rebuild(self, op, present_in, present_out):
        keep = present_in[0]
        weights = [w[..., keep] for w in _weights(op)]
        return copy_layer(op.layer), weights or None


class Padding(Passthrough):
    """Zero padding: a constant channel gets a zero border, so is not constant."""

    def constant(self, op, const_in, shapes):
        return Rule.constant(self, op, const_in, shapes)


class Merge(Rule):
    """Element-wise merges: one channel set for every input and the output."""

    def edges(self, op, shapes):
        channels = np.arange(shapes[op.outputs[0]][-1])
        return [(i, channels, 0, channels) for i in range(len(op.inputs))]

    def constant(self, op, const_in, shapes):
        return [np.logical_and.reduce(const_in)]

    def constant_inputs(self, op, const_in, shapes) -> list[int]:
        """Inputs constant everywhere that `without_constants` can drop.

        `x + c`, `x - c`, `c - x`, `mean(x, c)` and `x * c` are `x * scale +
        offset`; dropping the constant input removes the branch behind it (a
        residual branch whose layer was cut). Maximum and Minimum keep theirs.
        """
        drop = [i for i, const in enumerate(const_in) if const.all()]
        rest = [key for i, key in enumerate(op.inputs) if i not in drop]
        if type(op.layer).__name__ not in _AFFINE_MERGES or not drop or not rest:
            return []
        if any(shapes[key] != shapes[op.outputs[0]] for key in rest):
            return []  # the kept inputs must not rely on broadcasting
        return drop

    def without_constants(self, op, tensors, drop, values):
        """Rebuilds the merge on `tensors`, folding constant inputs `values`.

        Args:
            op: The merge's `Op`.
            tensors: The new tensors of the inputs that stay.
            drop: Indices of the dropped inputs.
            values: Their per-channel values, over the kept output channels.
        """
        kind, n, k = type(op.layer).__name__, len(op.inputs), len(tensors)
        x = tensors[0] if k == 1 else copy_layer(op.layer)(tensors)
        scale, offset = np.float64(1.0), np.sum(values, axis=0)
        if kind == "Subtract" and drop == [0]:
            scale = np.float64(-1.0)
        elif kind == "Subtract":
            offset = -offset
        elif kind == "Average":
            scale, offset = np.float64(k / n), offset / n
        elif kind == "Multiply":
            scale, offset = np.prod(values, axis=0), np.zeros_like(offset)
        if np.all(scale == 1) and not np.any(offset):
            return x
        as_config = lambda v: float(v) if np.ndim(v) == 0 else v.astype("float32")  # noqa: E731
        return L.Rescaling(
            scale=as_config(scale), offset=as_config(offset), name=f"{op.layer.name}_const"
        )(x)


_AFFINE_MERGES = {"Add", "Subtract", "Average", "Multiply"}


class Concat(Rule):
    def edges(self, op, shapes):
        out, offset = [], 0
        for i, key in enumerate(op.inputs):
            size = shapes[key][-1]
            out.append((i, np.arange(size), 0, np.arange(offset, offset + size)))
            offset += size
        return out

    def constant(self, op, const_in, shapes):
        return [np.concatenate(const_in)]


class FlattenRule(Rule):
    """Channels-last Flatten: input channel `c` → outputs `p * C + c`."""

    def edges(self, op, shapes):
        channels = shapes[op.inputs[0]][-1]
        total = shapes[op.outputs[0]][-1]
        outputs = np.arange(total)
        return [(0, outputs % channels, 0, outputs)]

    def constant(self, op, const_in, shapes):
        return [np.tile(const_in[0], shapes[op.outputs[0]][-1] // len(const_in[0]))]


class ReshapeRule(Passthrough):
    """`Reshape` that keeps the channel axis last, as `Reshape((1, 1, C))`."""

    def rebuild(self, op, present_in, present_out):
        target = tuple(op.layer.target_shape[:-1]) + (int(present_out[0].sum()),)
        return copy_layer(op.layer, target_shape=target), None


class DepthwiseRule(Rule):
    """Input channel `c` feeds outputs `c * m ... c * m + m - 1`."""

    def edges(self, op, shapes):
        channels = shapes[op.inputs[0]][-1]
        m = op.layer.depth_multiplier
        return [(0, np.repeat(np.arange(channels), m), 0, np.arange(channels * m))]

    def rebuild(self, op, present_in, present_out):
        keep = present_in[0]
        weights = _weights(op)
        weights[0] = weights[0][..., keep, :]
        if op.layer.use_bias:
            m = op.layer.depth_multiplier
            weights[1] = weights[1].reshape(-1, m)[keep].ravel()
        return copy_layer(op.layer), weights


class Boundary(Rule):
    """Layers that mix channels: outputs and inputs shrink independently.

    A boundary layer may drop input channels that are constant: exactly when
    their value is 0 (the same as zero padding), and for any value when the
    layer `folds` constants, i.e. every output position sees the whole kernel
    (Dense, 1×1 and `valid` convolutions), so that `fold` moves their
    contribution into the bias.
    """

    boundary = True

    def connectivity(self, op) -> np.ndarray:
        """Bool `(C_in, C_out)`: True where output `o` reads input `i`."""
        raise NotImplementedError

    def folds(self, layer) -> bool:
        return False

    def fold(self, op, values: np.ndarray) -> np.ndarray:
        """Output-channel bias that constant inputs `values` contribute."""
        raise NotImplementedError

    def constant(self, op, const_in, shapes, conn=None):
        conn = self.connectivity(op) if conn is None else conn
        if self.folds(op.layer):
            conn = conn & ~const_in[0][:, None]
        return [~conn.any(axis=0)]

    @staticmethod
    def _with_bias(op, weights, keep_out, bias, **updates):
        """Adds `bias[keep_out]` to the layer's bias, creating one if needed."""
        layer = op.layer
        if bias is not None and np.any(bias[keep_out]):
            extra = bias[keep_out].astype(weights[0].dtype)
            if layer.use_bias:
                weights[1] = weights[1] + extra
            else:
                updates["use_bias"] = True
                weights.append(extra)
        return copy_layer(layer, **updates), weights


class ConvRule(Boundary):
    def connectivity(self, op):
        kernel = _weights(op)[0]
        return np.any(kernel != 0, axis=tuple(range(kernel.ndim - 2)))

    def folds(self, layer):
        return layer.padding == "valid" or all(k == 1 for k in layer.kernel_size)

    def fold(self, op, values):
        kernel = _weights(op)[0].astype("float64")
        return values @ kernel.sum(axis=tuple(range(kernel.ndim - 2)))

    def rebuild(self, op, present_in, present_out, bias=None):
        keep_in, keep_out = present_in[0], present_out[0]
        weights = _weights(op)
        weights[0] = weights[0][..., keep_in, :][..., keep_out]
        if op.layer.use_bias:
            weights[1] = weights[1][keep_out]
        return self._with_bias(op, weights, keep_out, bias, filters=int(keep_out.sum()))


class ConvTransposeRule(Boundary):
    def connectivity(self, op):
        kernel = _weights(op)[0]  # (*k, out, in)
        return np.any(kernel != 0, axis=tuple(range(kernel.ndim - 2))).T

    def rebuild(self, op, present_in, present_out, bias=None):
        keep_in, keep_out = present_in[0], present_out[0]
        weights = _weights(op)
        weights[0] = weights[0][..., keep_out, :][..., keep_in]
        if op.layer.use_bias:
            weights[1] = weights[1][keep_out]
        return copy_layer(op.layer, filters=int(keep_out.sum())), weights


class DenseRule(Boundary):
    def connectivity(self, op):
        return _weights(op)[0] != 0

    def folds(self, layer):
        return True

    def fold(self, op, values):
        return values @ _weights(op)[0].astype("float64")

    def rebuild(self, op, present_in, present_out, bias=None):
        keep_in, keep_out = present_in[0], present_out[0]
        weights = _weights(op)
        weights[0] = weights[0][keep_in][:, keep_out]
        if op.layer.use_bias:
            weights[1] = weights[1][keep_out]
        return self._with_bias(op, weights, keep_out, bias, units=int(keep_out.sum()))


class SeparableRule(Boundary):
    def connectivity(self, op):
        depthwise, pointwise = _weights(op)[:2]  # (*k, in, m), (*1, in*m, out)
        reads = np.any(depthwise != 0, axis=tuple(range(depthwise.ndim - 2)))
        mixes = pointwise.reshape(pointwise.shape[-2:]) != 0
        c_in, m = reads.shape
        return np.any(reads.reshape(c_in, m, 1) & mixes.reshape(c_in, m, -1), axis=1)

    def rebuild(self, op, present_in, present_out, bias=None):
        keep_in, keep_out = present_in[0], present_out[0]
        m = op.layer.depth_multiplier
        weights = _weights(op)
        weights[0] = weights[0][..., keep_in, :]
        weights[1] = weights[1][..., np.repeat(keep_in, m), :][..., keep_out]
        if op.layer.use_bias:
            weights[2] = weights[2][keep_out]
        return copy_layer(op.layer, filters=int(keep_out.sum())), weights


PASSTHROUGH = (
    L.ReLU, L.LeakyReLU, L.ELU, L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D,
    L.SpatialDropout3D, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout,
    L.BatchNormalization, L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
    L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
    L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
    L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
    L.Cropping1D, L.Cropping2D,
    L.Cropping3D, L.UpSampling1D, L.UpSampling2D, L.UpSampling3D, L.Identity,
    L.Activation,
)
MERGES = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)
#: Layers that are exact when every channel is kept; no warning for them.
KNOWN_FIXED = (
    L.LayerNormalization, L.Softmax, L.Normalization, L.Rescaling, L.InputLayer, L.Embedding,
)

_RULES: dict[type, Rule] = {}


def register_rule(rule: Rule, *layer_types: type) -> None:
    """Registers a surgery `rule` for the exact classes in `layer_types`."""
    for layer_type in layer_types:
        _RULES[layer_type] = rule


register_rule(Passthrough(), *PASSTHROUGH)
register_rule(Padding(), L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D)
register_rule(Merge(), *MERGES)
register_rule(Concat(), L.Concatenate)
register_rule(FlattenRule(), L.Flatten)
register_rule(ReshapeRule(), L.Reshape)
register_rule(DepthwiseRule(), L.DepthwiseConv1D, L.DepthwiseConv2D)
register_rule(ConvRule(), L.Conv1D, L.Conv2D, L.Conv3D)
register_rule(ConvTransposeRule(), L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
register_rule(DenseRule(), L.Dense)
register_rule(SeparableRule(), L.SeparableConv1D, L.SeparableConv2D)
register_rule(Fixed(), *KNOWN_FIXED)
register_rule(Passthrough(), ChannelGroups)  # per-channel; `unwrap` folds it into its reader


def _register_optional() -> None:
    """Rules for classes outside the public API, when this Keras has them."""
    try:  # `x + y` on KerasTensors records keras.ops operations
        from keras.src.ops import numpy as knp

        register_rule(Merge(), knp.Add, knp.Subtract, knp.Multiply, knp.Maximum, knp.Minimum)
    except (ImportError, AttributeError):
        pass
    try:  # InceptionResNetV2's residual `x + scale * branch`
        from keras.src.applications.inception_resnet_v2 import CustomScaleLayer

        register_rule(Merge(), CustomScaleLayer)
    except ImportError:
        pass
    try:  # ConvNeXt's per-channel scale; its channels are pinned by LayerNorm
        from keras.src.applications.convnext import LayerScale

        register_rule(Fixed(), LayerScale)
    except ImportError:
        pass


_register_optional()

_ELEMENTWISE_ACTIVATIONS_EXCLUDED = {"softmax", "log_softmax"}


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def rule_for(op, shapes) -> tuple[Rule, str | None]:
    """The rule of `op`, and why it keeps every channel when the user should
    know (None when there is nothing to say).

    Configurations a rule does not cover (grouped convolution, BN on another
    axis, Concatenate on another axis, broadcasting merges, reshapes that move
    the channel axis, channels of unknown number) fall back to `Fixed`
    silently; an unknown layer type and `data_format="channels_first"` fall
    back with a reason, which `slim` reports.
    """
    layer = op.layer
    rule = _RULES.get(type(layer))
    if rule is None:
        return Fixed(), f"unknown type {type(layer).__name__}"
    if not _channels_last(layer):
        return Fixed(), "data_format='channels_first'"
    if rule.fixed:
        return Fixed(), None
    in_shapes = [shapes[k] for k in op.inputs]
    out_shapes = [shapes[k] for k in op.outputs]
    if not all(width(s) for s in in_shapes + out_shapes):
        return Fixed(), None  # channels of unknown number (token ids): nothing to cut
    rank = len(in_shapes[0])
    axis_last = (-1, rank - 1)
    fixed = Fixed(), None
    if isinstance(layer, L.BatchNormalization) and layer.axis not in axis_last:
        return fixed
    if isinstance(layer, L.Concatenate) and layer.axis not in axis_last:
        return fixed
    if isinstance(layer, L.Activation):
        name = getattr(layer.activation, "__name__", "")
        if name in _ELEMENTWISE_ACTIVATIONS_EXCLUDED:
            return fixed
    if isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)) and layer.groups != 1:
        return fixed
    if isinstance(layer, MERGES) and any(s[-1] != out_shapes[0][-1] for s in in_shapes):
        return fixed
    if isinstance(layer, L.Reshape) and (
        in_shapes[0][-1] != out_shapes[0][-1] or layer.target_shape[-1] != in_shapes[0][-1]
    ):
        return fixed
    if isinstance(layer, L.Flatten) and len(in_shapes[0]) < 2:
        return fixed
    return rule, None
