"""Penalties on α: the paper's weight decay, L1, and a scale-invariant L1.

- `"l2"` (the paper's method) and `"l1"` are Keras's own `L2`/`L1` on the
  raw α. Behind a BatchNormalization they only shrink a layer's α vector as
  a whole (BN cancels a uniform scale), which changes nothing the loss sees
  but lets BN's moving statistics go stale.
- `"relative_l1"` (`RelativeL1`) takes α relative to the root mean square of
  the layer's kept α: the layer computes with `α / rms(α)`, so a uniform
  scale of α means nothing, with or without BN, and the penalty is the L1
  norm of that relative α (√n times Hoyer's ‖α‖₁/‖α‖₂). It can only change
  the *pattern* of α: small α are pushed to zero at a constant rate while
  the others grow to keep the RMS at 1.

A penalty's strength lives in a non-trainable variable of the layer
(`VariableStrength`), so that `FlopsBudget` or `set_strength` can change it
without a new trace of the train step.
"""

from __future__ import annotations

import keras
from keras import ops

#: Default strengths, measured on Fashion-MNIST (README, "How pruning decides"):
#: 2e-2 for the paper's weight decay and L1; 5e-3 for "relative_l1" (2e-2 cost 1.9
#: points when training from scratch at learning rate 0.1; 5e-3 and 0 were within noise).
DEFAULT_STRENGTH = {"l2": 2e-2, "l1": 2e-2, "relative_l1": 5e-3}
#: The penalty `PSP` and `wrap` use unless told otherwise.
DEFAULT_PENALTY = "relative_l1"
#: The names `PSP(regularizer=...)` accepts besides Keras regularizers.
NAMES = tuple(DEFAULT_STRENGTH)


@keras.saving.register_keras_serializable(package="keras_psp")
class RelativeL1(keras.regularizers.Regularizer):
    """L1 of α relative to its layer's root mean square (scale-invariant).

    Only meaningful on a `keras_psp.PSP` layer's α, which it also makes the
    layer normalize (the layer computes with `α / rms(α)`). Called on its
    own, it gives the penalty of a raw vector: `strength * Σ|x| / rms(x)`.

    Args:
        strength: The penalty's strength (>= 0).

    Example:

    ```python
    conv = keras_psp.PSP(keras.layers.Conv2D(32, 3), regularizer="relative_l1")
    ```
    """

    def __init__(self, strength: float = 5e-3):
        if not float(strength) >= 0:
            raise ValueError(f"RelativeL1: `strength` must be >= 0, got {strength}.")
        self.strength = float(strength)

    def __call__(self, x):
        x = ops.abs(ops.cast(x, "float32"))
        rms = ops.sqrt(ops.mean(ops.square(x)))
        return self.strength * ops.sum(x) / ops.maximum(rms, 1e-12)

    def get_config(self):
        return {"strength": self.strength}


#: The attribute that holds the strength, by regularizer class.
_STRENGTH_ATTRIBUTE = {keras.regularizers.L2: "l2", keras.regularizers.L1: "l1",
                       RelativeL1: "strength"}


def get_penalty(regularizer, strength: float | None):
    """The regularizer object for `PSP(regularizer=..., strength=...)`.

    Args:
        regularizer: "l2", "l1", "relative_l1", a Keras regularizer (object,
            name or config) or None.
        strength: Strength of the named penalties; None: `DEFAULT_STRENGTH`.
    """
    if isinstance(regularizer, str) and regularizer in NAMES:
        strength = DEFAULT_STRENGTH[regularizer] if strength is None else float(strength)
        if not strength >= 0:
            raise ValueError(f"`strength` must be >= 0, got {strength}.")
        if regularizer == "relative_l1":
            return RelativeL1(strength)
        cls = keras.regularizers.L2 if regularizer == "l2" else keras.regularizers.L1
        return cls(strength)
    if strength is not None:
        raise ValueError(
            f"`strength` only applies to regularizer={' or '.join(map(repr, NAMES))}; got "
            f"regularizer={regularizer!r} and strength={strength}. Put the strength into "
            "the regularizer object instead."
        )
    return keras.regularizers.get(regularizer)


def strength_attribute(regularizer) -> str | None:
    """The attribute holding the strength of a named penalty's object, else None."""
    return _STRENGTH_ATTRIBUTE.get(type(regularizer))


def is_relative(regularizer) -> bool:
    """Whether the penalty makes the layer compute with α relative to its RMS."""
    return type(regularizer) is RelativeL1


class VariableStrength:
    """A named penalty on α whose strength is read from a variable.

    Keras bakes a regularizer's float strength into the traced train function
    (TF graph, XLA, JAX jit): changing it would need a new trace. Read from a
    (non-trainable) variable of the layer, a new strength applies at the next
    step without one. Only attached to α; the layer's config keeps the plain
    regularizer object.

    Args:
        regularizer: The `L2`, `L1` or `RelativeL1` object (its kind).
        strength: The variable holding the strength.
        relative: For `RelativeL1`, maps α to the relative α the layer
            computes with (cut structures 0); None: the raw α.
    """

    def __init__(self, regularizer, strength: keras.Variable, relative=None):
        self.kind = type(regularizer)
        self.strength, self.relative = strength, relative

    def __call__(self, x):
        if self.kind is RelativeL1 and self.relative is not None:
            term = ops.sum(ops.abs(self.relative(x)))
        else:
            x = ops.cast(x, "float32")
            term = ops.sum(ops.square(x)) if self.kind is keras.regularizers.L2 else ops.sum(
                ops.abs(x))
        return ops.cast(self.strength, "float32") * term
