"""What a layer family says about its layers: the base classes.

A family of layers takes part in keras_psp through up to three objects
(`keras_psp.layers.register_layer` ties them to the family's classes):

- a `LayerHandler`: where α lives in the layer's kernels for each
  structure (`plan`), and how to run the layer on given kernels
  (`forward`), so that `PSP` can wrap it;
- a `Rule`: how channels flow through the layer and how the layer shrinks,
  so that `slim` can cut through it;
- a MAC function `(layer, input_shape, output_shape) -> int`, so that
  `count_flops` counts it.

A *structure* is a group of kernel weights that shares one trainable scale:

- ``"channel"``: one input channel (for `Dense`: one input feature);
- ``"filter"``: one output channel;
- ``"column"``: one kernel position × one input channel (for `Dense`, which
  has no kernel positions, a column is an input feature, as in the im2col view
  of a fully connected layer);
- ``"shape"``: one kernel position, across all channels;
- ``"layer"``: the whole layer;
- ``"head"``: one attention head (`MultiHeadAttention`: its slices of the
  query, key, value and output projections);
- ``"value"``, ``"key"``: one dimension of every attention head's values,
  or of its queries and keys (`value_dim`, `key_dim`);
- ``"block"``: a composite block's heads and MLP neurons, one α vector
  (`keras_psp.layers.hub_gemma`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import keras
import numpy as np
from keras import ops

from keras_psp.copying import copy_layer, read_values
from keras_psp.graph import width

#: The structures of a kernel: what convolutions and `Dense` support.
KERNEL_STRUCTURES = ("channel", "filter", "column", "shape", "layer")
STRUCTURES = (*KERNEL_STRUCTURES, "head", "value", "key", "block")

#: `fn(layer, input_shape, output_shape) -> MACs` for one call, batch first.
MacFunction = Callable[[keras.layers.Layer, tuple, tuple], int]


# -- α: where it lives in the kernels ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where the α of one wrapped layer lives.

    Attributes:
        kernel: Name of the layer attribute holding the kernel that α scales.
        shape: Shape of α: one entry per structure.
        expand: Maps α (of `shape`) to a tensor that broadcasts against the
            kernel, so that `kernel * expand(alpha)` is the effective kernel.
        reduce: The adjoint of `expand`, in numpy: sums a kernel-shaped array
            over each structure's entries, giving an array of `shape` (e.g.
            the squared norm of each structure's weights).
    """

    kernel: str
    shape: tuple[int, ...]
    expand: Callable
    reduce: Callable

    def scales(self, alpha) -> dict:
        """`{kernel name: scale}`: each kernel times its scale is the effective
        kernel (one kernel here; several for a `JointPlan`)."""
        return {self.kernel: self.expand(alpha)}

    def squared_norms(self, layer) -> np.ndarray:
        """Sum of squared kernel entries of each structure of `layer`, shaped as α."""
        kernel = np.asarray(keras.ops.convert_to_numpy(attribute(layer, self.kernel)), "float64")
        return self.reduce(kernel**2)


@dataclasses.dataclass(frozen=True)
class JointPlan(Plan):
    """One flat α over the structures of several plans, in order: a composite
    layer's attention heads and MLP neurons (`joint_plan`)."""

    parts: tuple = ()

    def _pieces(self, alpha):
        start = 0
        for part in self.parts:
            size = math.prod(part.shape)
            yield part, alpha[start:start + size]
            start += size

    def scales(self, alpha) -> dict:
        return {part.kernel: part.expand(piece) for part, piece in self._pieces(alpha)}

    def squared_norms(self, layer) -> np.ndarray:
        return np.concatenate([np.ravel(part.squared_norms(layer)) for part in self.parts])


def joint_plan(*parts: Plan) -> JointPlan:
    """A plan whose flat α is the α of each of `parts` (1-D each), concatenated.

    Example:

    ```python
    plan = joint_plan(axis_plan("attention.output_dense.kernel", shape_a, (0,)),
                      axis_plan("ffw_linear.kernel", shape_b, (0,)))
    ```
    """
    if not parts or any(len(part.shape) != 1 for part in parts):
        raise ValueError("joint_plan: give one or more plans with one axis of α each.")
    return JointPlan(parts[0].kernel, (sum(part.shape[0] for part in parts),),
                     parts[0].expand, parts[0].reduce, parts=tuple(parts))


def axis_plan(kernel: str, kernel_shape, axes, flat: bool = False) -> Plan:
    """A plan whose α spans the given kernel axes (in kernel order).

    Args:
        kernel: Kernel attribute name.
        kernel_shape: The kernel's shape.
        axes: Kernel axes α spans; `()` gives a single, layer-wide α.
        flat: Store α as one flat vector over the spanned axes (row-major),
            e.g. the `in × depth_multiplier` outputs of a depthwise kernel.

    Example:

    ```python
    # one α per input channel of a (k, k, in, out) kernel
    plan = axis_plan("kernel", layer.kernel.shape, (2,))
    ```
    """
    kernel_shape = tuple(int(d) for d in kernel_shape)
    dims = tuple(kernel_shape[a] for a in axes)
    if not axes:
        shape = (1,)
    elif flat:
        shape = (int(np.prod(dims, dtype="int64")),)
    else:
        shape = dims
    target = tuple(d if i in axes else 1 for i, d in enumerate(kernel_shape))
    others = tuple(i for i in range(len(kernel_shape)) if i not in axes)

    def reduce(values):
        return np.reshape(np.sum(values, axis=others), shape)

    def expand(alpha):  # numpy in, numpy out (offline folding); else keras.ops
        if isinstance(alpha, np.ndarray):
            return np.reshape(alpha, target)
        return ops.reshape(alpha, target)

    return Plan(kernel, shape, expand, reduce)


class LayerHandler:
    """How `PSP` scales the kernels of one family of layers.

    Attributes:
        kernels: Attribute names of the layer's kernels, in weight order; a
            dotted name reaches into a sublayer (`"_output_dense.kernel"`).
        structures: The structures this family supports.
        missing: Why a structure is not supported, by structure name.
        call_arguments: `forward` takes the call's other arguments (after the
            first) and `training`, as the layer's own `call` does.
    """

    kernels: tuple[str, ...] = ("kernel",)
    structures: tuple[str, ...] = KERNEL_STRUCTURES
    missing: dict[str, str] = {}
    call_arguments: bool = False

    def fits(self, layer: keras.layers.Layer) -> str | None:
        """Why `PSP` cannot wrap this layer of the family (a configuration the
        handler does not cover), or None when it can."""
        return None

    def plan(self, layer: keras.layers.Layer, structure: str) -> Plan:
        """Returns the `Plan` of `structure` for a built `layer`."""
        raise NotImplementedError

    def build(self, layer: keras.layers.Layer, input_shape) -> None:
        """Builds an unbuilt `layer` for inputs of `input_shape` (the first argument's)."""
        layer.build(input_shape)

    def forward(self, layer, inputs, kernels: dict):
        """Runs `layer` on `inputs` with `kernels`, before bias/activation."""
        raise NotImplementedError

    def finish(self, layer, outputs):
        """Adds the layer's bias and applies its activation."""
        bias = getattr(layer, "bias", None)
        if bias is not None:
            bias = ops.cast(bias, outputs.dtype)
            if getattr(layer, "data_format", "channels_last") == "channels_first":
                ndim = len(outputs.shape)
                bias = ops.reshape(bias, (1, -1) + (1,) * (ndim - 2))
            outputs = ops.add(outputs, bias)
        if layer.activation is not None:
            outputs = layer.activation(outputs)
        return outputs


def attribute(layer, path: str):
    """`layer.<path>`, following dots into sublayers."""
    for name in path.split("."):
        layer = getattr(layer, name)
    return layer


# -- surgery: how channels flow, and how a layer shrinks ---------------------------


def kept(array: np.ndarray, keep: np.ndarray, axis: int = -1) -> np.ndarray:
    """The entries of `array` along `axis` where the bool mask `keep` is True.

    `np.compress` (3x faster than boolean indexing on a kernel's last axes),
    but, as boolean indexing does, it refuses a mask of another length.

    Example:

    ```python
    kernel = kept(kept(kernel, keep_in, axis=-2), keep_out, axis=-1)
    ```
    """
    keep = np.asarray(keep)
    if keep.dtype != bool or keep.shape != (array.shape[axis],):
        raise ValueError(f"keras_psp: a keep mask of shape {keep.shape} ({keep.dtype}; a bool "
                         f"mask is needed) for axis {axis} of "
                         f"an array of shape {array.shape}; this is a bug in a surgery rule.")
    return np.compress(keep, array, axis=axis)


def op_weights(op) -> list[np.ndarray]:
    """The weights of a call's layer as numpy arrays (a PSP layer's with α folded in).

    A new list of shared, read-only arrays: rules slice them into new ones
    and never write into them. A plain layer's are read once per op.
    """
    if op.arrays is None:
        if op.plain_weights is None:
            op.plain_weights = read_values(op.layer.weights)
        return list(op.plain_weights)
    return list(op.arrays)


class Rule:
    """How one family of layers couples channels and shrinks.

    A rule's `edges` list coupled channel pairs as `(input index, input
    channels, output index, output channels)`; its `constant` says which
    output channels are constant whatever the input (a cut filter emits act(β)
    after BN and bias), given which input channels are.

    Attributes:
        boundary: The layer mixes channels (see `Boundary`).
        fixed: The layer keeps every channel of its inputs and outputs.
        width_in_config: The rebuilt layer's config names its channel count
            (`Reshape`), so all calls of a shared layer keep one width.
    """

    boundary = False
    fixed = False
    width_in_config = False

    def applies(self, layer, in_shapes: list[tuple], out_shapes: list[tuple]) -> bool:
        """False for configurations the rule does not cover (they keep every
        channel, silently): BN on another axis, a softmax activation, ..."""
        return True

    def edges(self, op, shapes) -> list[tuple]:
        return []

    def shrunk(self, op) -> dict:
        """Attributes the rebuilt layer changes besides its channel widths
        (`num_heads` of an attention layer with heads cut), so that
        `count_flops` can count the slim layer before it is built."""
        return {}

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
            return copy_layer(op.layer), op_weights(op)
        return copy_layer(op.layer), op.layer


class Fixed(Rule):
    """Keeps every channel flowing in and out (exact for any layer)."""

    fixed = True


class Passthrough(Rule):
    """Channel `c` in is channel `c` out; per-channel weights are sliced.

    Example: a per-channel scale layer.

    ```python
    keras_psp.register_layer(ChannelScale, rule=Passthrough())
    ```
    """

    def edges(self, op, shapes):
        channels = np.arange(shapes[op.inputs[0]][-1])
        return [(0, channels, 0, channels)]

    def constant(self, op, const_in, shapes):
        return [const_in[0].copy()]

    def rebuild(self, op, present_in, present_out):
        if not isinstance(op.layer, keras.layers.Layer):  # a keras.ops operation
            return op.layer, None
        keep = present_in[0]
        weights = [kept(w, keep) for w in op_weights(op)]
        return copy_layer(op.layer), weights or None


class Boundary(Rule):
    """Layers that mix channels: outputs and inputs shrink independently.

    A boundary layer may drop input channels that are constant: exactly when
    their value is 0 (the same as zero padding), and for any value when the
    layer `folds` constants, i.e. every output position sees the whole kernel
    (Dense, 1×1 and `valid` convolutions), so that `fold` moves their
    contribution into the bias. Subclasses give `connectivity` and `rebuild`
    (and `folds`/`fold` where they can).
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
    def with_bias(op, weights, keep_out, bias, **updates):
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
