"""The `PSP` layer wrapper: one trainable scale α per weight structure."""

from __future__ import annotations

import inspect

import keras
import numpy as np
from keras import ops

from keras_psp.copying import read_values
from keras_psp.layers import STRUCTURES, attribute, handler_of, registry, wrappable_types
from keras_psp.penalties import (
    DEFAULT_PENALTY,
    VariableStrength,
    get_penalty,
    is_relative,
    strength_attribute,
)
from keras_psp.penalties import DEFAULT_STRENGTH as DEFAULT_STRENGTHS

#: Default strength of the default α penalty ("relative_l1").
DEFAULT_STRENGTH = DEFAULT_STRENGTHS[DEFAULT_PENALTY]
#: Default pruning threshold, relative to the layer's largest |α|.
DEFAULT_THRESHOLD = 1e-2


class _NumpyOps:
    """The few `keras.ops` names the pruning rule uses, on numpy arrays.

    Offline work (folding α for `strip` and `slim`, masks) then runs the very
    same rule without a backend op per step (an eager TF reduction costs
    about as much as folding a whole layer in numpy).
    """

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def cast(x, dtype):
        return np.asarray(x).astype(dtype)

    @staticmethod
    def convert_to_tensor(x, dtype=None):
        if not isinstance(x, np.ndarray):
            x = keras.ops.convert_to_numpy(x)
        return np.asarray(x, dtype=dtype)

    @staticmethod
    def rsqrt(x):
        return np.float32(1.0) / np.sqrt(x)


_NUMPY_OPS = _NumpyOps()


def keep_mask(alpha, threshold: float, structure: str, multiple_of: int | None = None):
    """The pruning rule, in `keras.ops`: True where a structure is kept.

    A structure is cut when its |α| is zero or smaller than `threshold` times
    the largest |α| of the same layer. The rule only looks at the *direction*
    of the α vector, not its length, because a BatchNormalization after the
    layer cancels a uniform rescaling of α (and weight decay then shrinks the
    whole vector freely): with or without BN the same α pattern cuts the same
    structures. A layer-wise α (`structure="layer"`) has nothing to compare
    with, so it is cut when |α| falls below `threshold` times its initial
    value 1.

    With `multiple_of`, the number kept is rounded up to a multiple of it
    (or to all of them): the largest |α| below the threshold are kept too,
    and ties go to keeping. α that are exactly 0 always stay cut, so a cut
    made in blocks (`keras_psp.prune_to`) keeps its multiples.

    Args:
        alpha: α values (any shape).
        threshold: Relative threshold in [0, 1); 0 cuts only α that are exactly 0.
        structure: The structure name.
        multiple_of: Keep a multiple of this many structures; None: any count.

    Returns:
        A bool tensor of α's shape; a numpy array when `alpha` is one.
    """
    ops = _NUMPY_OPS if isinstance(alpha, np.ndarray) else keras.ops
    magnitude = ops.abs(ops.cast(alpha, "float32"))
    if structure == "layer":
        reference = ops.ones_like(ops.max(magnitude))
    else:
        reference = ops.max(magnitude)
    keep = ops.logical_and(magnitude > 0, magnitude >= threshold * reference)
    if not multiple_of or multiple_of <= 1:
        return keep
    flat = ops.reshape(magnitude, (-1,))
    size = int(flat.shape[0])
    kept = ops.sum(ops.cast(keep, "int32"))
    rounded = ops.minimum(((kept + multiple_of - 1) // multiple_of) * multiple_of, size)
    descending = ops.flip(ops.sort(flat), axis=0)
    floor = ops.take(descending, ops.maximum(rounded - 1, 0))  # the smallest |α| kept
    return ops.logical_or(keep, ops.logical_and(magnitude > 0, magnitude >= floor))


def effective_alpha(alpha, threshold: float, structure: str, multiple_of: int | None,
                    relative: bool, numpy: bool = False):
    """α as the forward pass uses it: cut structures (`keep_mask`) zero and,
    with `relative`, divided by the RMS of the kept α. float32; a numpy array
    when `numpy` (the same rule, without backend ops)."""
    ops = _NUMPY_OPS if numpy else keras.ops
    alpha = ops.convert_to_tensor(alpha, "float32")
    keep = ops.cast(keep_mask(alpha, threshold, structure, multiple_of), "float32")
    alpha = alpha * keep
    if relative:  # α relative to the RMS of the kept α
        mean_square = ops.sum(ops.square(alpha)) / ops.maximum(ops.sum(keep), 1.0)
        alpha = alpha * ops.rsqrt(ops.maximum(mean_square, 1e-30))
    return alpha


def check_multiple_of(value, who: str) -> None:
    """Raises a clear ValueError unless `value` is None or a positive integer."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise ValueError(f"{who}: `multiple_of` must be a positive integer or None, got "
                         f"{value!r}.")


@keras.saving.register_keras_serializable(package="keras_psp")
class PSP(keras.layers.Wrapper):
    """Parameterized structured pruning of one Keras layer.

    Every structure of the wrapped layer's kernel (input channel, output
    filter, column, kernel position or the whole layer) gets one trainable
    scale α, initialised to 1 so that the wrapped layer first computes exactly
    what the plain layer computed. The effective kernel is `kernel * α`; α
    carries a weight-decay regularizer, so training drives the α of
    unimportant structures towards zero. Structures whose α falls below the
    threshold (see `keep_mask`) are zero in the forward pass, so training sees
    the pruned network.

    α is always a float32 variable, also under mixed precision policies.

    Args:
        layer: The layer to wrap: `Conv1D/2D/3D`, `Conv1D/2D/3DTranspose`,
            `DepthwiseConv1D/2D`, `SeparableConv1D/2D` or `Dense`.
        structure: `"channel"`, `"filter"`, `"column"`, `"shape"` or `"layer"`.
        threshold: Relative pruning threshold (see `keep_mask`).
        regularizer: The penalty on α: `"relative_l1"` (the default: L1 of α
            relative to its RMS over the layer's kept structures, with the
            layer computing with that relative α, so that a uniform scale of
            α means nothing and BN cannot cancel it; see
            `keras_psp.penalties`), `"l2"` (weight decay on the raw α, the
            paper's method), `"l1"`, any Keras regularizer (object, name or
            config), or None.
        strength: Strength of the `"relative_l1"`/`"l2"`/`"l1"` penalty.
            Defaults to `keras_psp.penalties.DEFAULT_STRENGTH` (5e-3 for
            "relative_l1", 2e-2 for "l2" and "l1").
        multiple_of: Keep a multiple of this many structures (see
            `keep_mask`); `keras_psp.prune_to` and `FlopsBudget` then cut in
            blocks of it. None (the default): any count.
        **kwargs: Base layer arguments (`name`, `dtype`...). The name defaults
            to the wrapped layer's name.

    Example:

    ```python
    conv = keras_psp.PSP(keras.layers.Conv2D(32, 3), structure="channel")
    y = conv(np.ones((1, 8, 8, 16)))
    conv.alpha.shape   # (16,): one α per input channel
    conv.mask()        # array of 16 True
    ```
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        structure: str = "channel",
        threshold: float = DEFAULT_THRESHOLD,
        regularizer=DEFAULT_PENALTY,
        strength: float | None = None,
        multiple_of: int | None = None,
        **kwargs,
    ):
        name = getattr(layer, "name", repr(layer))
        if isinstance(layer, PSP):
            raise ValueError(
                f"Layer '{name}' is already wrapped in PSP; wrap the plain layer "
                "once, or use `layer.layer` to reach the wrapped layer."
            )
        self._handler = handler_of(layer)
        if self._handler is None:
            names = ", ".join(sorted(t.__name__ for t in wrappable_types()))
            family = registry.family(layer)
            why = ""
            if family.registered is not None and family.registered is not type(layer):
                why = (f" It subclasses {family.registered.__name__} but has its own `call`, "
                       "whose math keras_psp cannot know.")
            raise TypeError(
                f"PSP cannot wrap layer '{name}' of type {type(layer).__name__}.{why} "
                f"Supported layer types: {names}. Leave this layer unwrapped, or "
                "register its family with keras_psp.register_layer(handler=...) (README, "
                "'Extending keras_psp')."
            )
        why = self._handler.fits(layer)
        if why is not None:
            raise TypeError(f"PSP cannot wrap layer '{name}' ({type(layer).__name__}): {why}. "
                            "Leave it unwrapped.")
        if structure not in STRUCTURES:
            raise ValueError(
                f"Unknown structure {structure!r} for layer '{name}'. Choose one "
                f"of {', '.join(map(repr, STRUCTURES))}."
            )
        if structure not in self._handler.structures:
            raise ValueError(
                f"Structure {structure!r} does not fit layer '{name}' "
                f"({type(layer).__name__}): "
                + self._handler.missing.get(
                    structure, "its family supports "
                    + ", ".join(map(repr, self._handler.structures))) + "."
            )
        if getattr(layer, "lora_enabled", False) or getattr(
            layer, "quantization_mode", None
        ):
            raise ValueError(
                f"Layer '{name}' uses LoRA or quantization, which PSP does not "
                "support. Wrap the layer before enabling LoRA or quantizing."
            )
        if not 0.0 <= float(threshold) < 1.0:
            raise ValueError(
                f"`threshold` must be in [0, 1), got {threshold} for layer '{name}'."
            )
        check_multiple_of(multiple_of, f"PSP layer '{name}'")
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", layer.dtype_policy)
        if self._handler.call_arguments:  # Keras reads the call's arguments by these names
            object.__setattr__(self, "call", self._call_as(layer))
        super().__init__(layer, **kwargs)
        self.structure = structure
        self.threshold = float(threshold)
        self.multiple_of = multiple_of
        self.alpha_regularizer = get_penalty(regularizer, strength)
        self.alpha_strength = None
        self.plan = None

    def build(self, input_shape=None):
        if not self.layer.built:
            self._handler.build(self.layer, input_shape)
        self.plan = self._handler.plan(self.layer, self.structure)
        named = strength_attribute(self.alpha_regularizer)
        self.alpha = self.add_weight(
            name="alpha",
            shape=self.plan.shape,
            initializer="ones",
            regularizer=None if named else self.alpha_regularizer,
            dtype="float32",
            autocast=False,
        )
        self.alpha_strength = None
        if named:  # a variable strength: `keras_psp.budget.set_strength` needs no retrace
            self.alpha_strength = self.add_weight(
                name="alpha_strength",
                shape=(),
                initializer=keras.initializers.Constant(getattr(self.alpha_regularizer, named)),
                trainable=False,
                dtype="float32",
                autocast=False,
            )
            self.alpha.regularizer = VariableStrength(
                self.alpha_regularizer, self.alpha_strength,
                self.effective_alpha if self.relative else None)
        self.built = True

    @property
    def relative(self) -> bool:
        """Whether the layer computes with α relative to its RMS ("relative_l1";
        a layer-wise α has nothing to be relative to and stays raw)."""
        return is_relative(self.alpha_regularizer) and self.structure != "layer"

    def set_strength(self, strength: float) -> None:
        """Sets the L2/L1 strength on α; the next training step uses it.

        Args:
            strength: The new strength (>= 0).
        """
        named = strength_attribute(self.alpha_regularizer)
        if named is None:
            raise ValueError(
                f"PSP layer '{self.name}' has α regularizer "
                f"{type(self.alpha_regularizer).__name__ if self.alpha_regularizer else None}; "
                "only the strengths of the named penalties can be set. Wrap with "
                "regularizer='l2', 'l1' or 'relative_l1'."
            )
        if not float(strength) >= 0:
            raise ValueError(f"`strength` must be >= 0, got {strength} for layer '{self.name}'.")
        setattr(self.alpha_regularizer, named, float(strength))
        if self.alpha_strength is not None:
            self.alpha_strength.assign(float(strength))

    def effective_alpha(self, alpha=None, numpy: bool = False):
        """The scales the layer computes with: α, cut structures zero, and with
        `relative` divided by the RMS of the kept α (a float32 tensor).

        Args:
            alpha: Values to use instead of the layer's α (same shape), e.g. a
                candidate cut; None: the layer's own.
            numpy: Compute in numpy and return a numpy array (offline work:
                folding, masks), with the same rule as the forward pass.
        """
        return effective_alpha(self.alpha if alpha is None else alpha, self.threshold,
                               self.structure, self.multiple_of, self.relative, numpy)

    def effective_kernels(self, dtype=None, alpha=None) -> dict:
        """The wrapped layer's kernels with α folded in, by attribute name."""
        dtype = dtype or self.compute_dtype
        kernels = {  # a kernel the layer does not have (a bias it does not use) is None
            name: None if attribute(self.layer, name) is None
            else ops.cast(attribute(self.layer, name), dtype)
            for name in self._handler.kernels
        }
        for name, scale in self.plan.scales(self.effective_alpha(alpha)).items():
            if kernels[name] is not None:
                kernels[name] = kernels[name] * ops.cast(scale, dtype)
        return kernels

    def _call_as(self, layer):
        """`call` with `layer.call`'s signature: Keras then passes the wrapper
        the wrapped layer's arguments (`query`, `value`, masks, `training`) by
        their own names, as it would pass them to the layer."""

        signature = inspect.signature(layer.call)
        first = next(iter(signature.parameters))

        def call(*args, **kwargs):
            arguments = dict(signature.bind(*args, **kwargs).arguments)
            return PSP.call(self, arguments.pop(first), **arguments)

        call.__signature__ = signature
        return call

    def call(self, inputs, *args, training=None, **kwargs):
        kernels = self.effective_kernels(self.compute_dtype)
        if self._handler.call_arguments:  # e.g. attention: (query, value, key, masks...)
            outputs = self._handler.forward(self.layer, inputs, kernels, *args,
                                            training=training, **kwargs)
        elif args or kwargs:
            raise TypeError(
                f"PSP layer '{self.name}' ({type(self.layer).__name__}) takes one input; "
                f"got further arguments {[*map(type, args), *kwargs]}.")
        else:
            outputs = self._handler.forward(self.layer, inputs, kernels)
        return self._handler.finish(self.layer, outputs)

    def compute_output_spec(self, *args, training=None, **kwargs):
        if self._handler.call_arguments:  # the wrapped layer's arguments, by position or name
            return self.layer.compute_output_spec(*args, **kwargs)
        return super().compute_output_spec(*args, **kwargs)

    def compute_output_shape(self, input_shape):
        try:
            return self.layer.compute_output_shape(input_shape)
        except NotImplementedError:  # a custom layer without one: trace its own call
            spec = keras.KerasTensor(tuple(input_shape), dtype=self.layer.compute_dtype)
            return tuple(self.layer.compute_output_spec(spec).shape)

    def mask(self) -> np.ndarray:
        """Numpy bool array of α's shape, True where a structure is kept."""
        alpha = np.asarray(ops.convert_to_numpy(self.alpha))
        return keep_mask(alpha, self.threshold, self.structure, self.multiple_of)

    def norms(self) -> np.ndarray:
        """ℓ2 norm of each structure's kernel entries (α not applied), shaped as α."""
        return np.sqrt(self.plan.squared_norms(self.layer))

    def own_param_count(self) -> int:
        """Entries of the variables PSP adds (α and its strength): what `strip` drops."""
        own = [v for v in (self.alpha, self.alpha_strength) if v is not None]
        return int(sum(np.prod(v.shape) for v in own))

    def check_finite(self, action: str, alpha: np.ndarray | None = None) -> None:
        """Raises ValueError naming this layer if α (or `alpha`, its values
        read already) is not finite."""
        alpha = read_values([self.alpha])[0] if alpha is None else alpha
        if not np.all(np.isfinite(alpha)):
            bad = int(np.size(alpha) - np.isfinite(alpha).sum())
            raise ValueError(
                f"Cannot {action}: PSP layer '{self.name}' has {bad} non-finite "
                "α value(s); training has diverged. Restore an earlier "
                "checkpoint and train with a lower learning rate or α strength."
            )

    def folded_weights(self, alpha=None) -> list[np.ndarray]:
        """The wrapped layer's weights with α folded into the kernel.

        The list matches `self.layer.get_weights()`, so a plain copy of the
        layer takes it with `set_weights`. Cut structures are exactly zero.
        Weights that α does not scale are read-only views of the variables'
        values, not copies: copy one before changing it in place.

        Args:
            alpha: α values to fold instead of the layer's own (a candidate
                cut); None: the layer's α.
        """
        if alpha is None:
            alpha = read_values([self.alpha])[0]
            self.check_finite("fold α into the kernel", alpha)
        scales = {name: np.asarray(ops.convert_to_numpy(scale), "float32") for name, scale
                  in self.plan.scales(self.effective_alpha(alpha, numpy=True)).items()}
        kernels = {id(attribute(self.layer, n)): n for n in self._handler.kernels}
        out = []
        for variable, value in zip(self.layer.weights, read_values(self.layer.weights),
                                   strict=True):
            name = kernels.get(id(variable))
            if name is not None:  # kernels in float32, the α-scaled ones times α
                value = value.astype("float32", copy=False)
                if name in scales:
                    value = value * scales[name]
            out.append(value)
        return out

    def save_own_variables(self, store):
        self.check_finite("save the model")
        super().save_own_variables(store)

    def get_config(self):
        if self.alpha_strength is not None:  # the strength in use, e.g. set by FlopsBudget
            value = float(ops.convert_to_numpy(self.alpha_strength))
            setattr(self.alpha_regularizer, strength_attribute(self.alpha_regularizer), value)
        config = super().get_config()
        config.update(
            {
                "structure": self.structure,
                "threshold": self.threshold,
                "multiple_of": self.multiple_of,
                "regularizer": keras.regularizers.serialize(self.alpha_regularizer)
                if self.alpha_regularizer is not None
                else None,
            }
        )
        return config
