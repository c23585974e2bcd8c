"""Numerical comparison of two models on the same inputs."""

from __future__ import annotations

import keras
import numpy as np

from keras_psp._modules import callable_module


class NonFiniteOutputError(ValueError):
    """A model produces NaN or inf: there is nothing to compare against."""


def non_finite_weights(model: keras.Model) -> list[str]:
    """Names of the layers of `model` with a NaN or inf weight."""
    names = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        own = layer._trainable_variables + layer._non_trainable_variables
        if any(not np.all(np.isfinite(keras.ops.convert_to_numpy(v))) for v in own
               if keras.backend.is_float_dtype(v.dtype)):
            names.append(layer.name)
    return names


def non_finite_error(model: keras.Model, who: str, what: str = "the check inputs"):
    """The `NonFiniteOutputError` for `model`, naming its non-finite layers."""
    bad = non_finite_weights(model)
    where = (f" Layer(s) with non-finite weights: {', '.join(repr(n) for n in bad)}."
             if bad else " Its weights are finite: check the inputs' range.")
    return NonFiniteOutputError(
        f"{who}: model '{model.name}' produces non-finite values (NaN or inf) on {what}, "
        f"so no result can be verified against it.{where} A diverged training run needs "
        "an earlier checkpoint or a lower learning rate."
    )


def check_inputs_argument(inputs, who: str, name: str = "check_inputs") -> None:
    """Raises a clear ValueError unless `inputs` holds at least one finite example.

    Args:
        inputs: An array, or a list/dict (nested) of arrays, one per model input.
        who: The function, for the message (e.g. "slim").
        name: The argument's name, for the message.
    """
    arrays = keras.tree.flatten(inputs)
    if not arrays:
        raise ValueError(f"{who}: `{name}` is empty; pass at least one example per input.")
    for i, array in enumerate(arrays):
        try:
            array = np.asarray(array)
        except Exception as error:
            raise ValueError(f"{who}: `{name}` must hold arrays, got "
                             f"{type(arrays[i]).__name__} ({error}).") from error
        label = f"`{name}`" + (f" (input {i})" if len(arrays) > 1 else "")
        if array.ndim == 0 or len(array) == 0:
            raise ValueError(f"{who}: {label} has no examples (shape {array.shape}); pass a "
                             "batch of at least one example.")
        if np.issubdtype(array.dtype, np.number) and not np.all(np.isfinite(array)):
            bad = int(array.size - np.isfinite(array).sum())
            raise ValueError(f"{who}: {label} contains {bad} NaN or inf value(s); pass finite "
                             "examples.")


def check_tolerance(value, who: str, name: str = "atol") -> None:
    """Raises a clear ValueError unless `value` is None or a finite number >= 0."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{who}: `{name}` must be a number >= 0 or None, got {value!r}.")
    if not 0 <= float(value) < float("inf"):
        raise ValueError(f"{who}: `{name}` must be a finite number >= 0, got {value!r}.")


#: Up to this many examples, TensorFlow runs the model eagerly instead of
#: through `predict`: tracing a new `predict` function costs more than the few
#: batches it would speed up (measured 5-6x on small models, 2.9x on ResNet50
#: with 8 images). JAX always uses `predict`: its eager ops compile one by one.
EAGER_EXAMPLES = 512


def _examples(inputs) -> int | None:
    """The number of examples all of `inputs`' arrays share, or None."""
    arrays = keras.tree.flatten(inputs)
    if not arrays or not all(isinstance(a, np.ndarray) and a.ndim for a in arrays):
        return None
    counts = {len(a) for a in arrays}
    return counts.pop() if len(counts) == 1 else None


def outputs(model: keras.Model, inputs, batch_size: int = 256) -> list[np.ndarray]:
    """`model`'s outputs on `inputs` (inference mode), flattened, as float64."""
    count = _examples(inputs)
    if keras.backend.backend() != "tensorflow" or count is None or count > EAGER_EXAMPLES:
        predicted = model.predict(inputs, batch_size=batch_size, verbose=0)
        return [np.asarray(y, "float64") for y in keras.tree.flatten(predicted)]
    parts = []
    for start in range(0, count, batch_size):
        batch = keras.tree.map_structure(lambda a, s=start: a[s:s + batch_size], inputs)
        parts.append([np.asarray(keras.ops.convert_to_numpy(y), "float64")
                      for y in keras.tree.flatten(model(batch, training=False))])
    return [np.concatenate(ys) for ys in zip(*parts, strict=True)]


def max_difference(reference: keras.Model, expected: list, candidate: keras.Model,
                   actual: list) -> float:
    """The largest |difference| of two models' outputs (`outputs`); inf where the
    candidate is not finite. The reference's outputs must be finite."""
    if len(expected) != len(actual):
        raise ValueError(
            f"Model '{candidate.name}' has {len(actual)} output(s), but "
            f"'{reference.name}' has {len(expected)}: they are not comparable."
        )
    worst = 0.0
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        if e.shape != a.shape:
            raise ValueError(
                f"Output {i} of model '{candidate.name}' has shape {a.shape}, but "
                f"'{reference.name}' gives {e.shape}: they are not comparable."
            )
        diff = np.abs(e - a)
        if not np.all(np.isfinite(diff)):
            return float("inf")
        worst = max(worst, float(diff.max(initial=0.0)))
    return worst


def verify(reference: keras.Model, candidate: keras.Model, inputs, batch_size: int = 256) -> float:
    """Returns the largest absolute difference between two models' outputs.

    Both models run in inference mode on `inputs`. Use it to check that a
    stripped, slimmed or exported model still computes what the original
    computes. A candidate that produces NaN or inf where the reference does
    not differs by inf.

    Args:
        reference: The model whose outputs are taken as correct.
        candidate: The model to check.
        inputs: What both models accept: an array, or a list/dict of arrays.
        batch_size: Batch size of each model call.

    Raises:
        ValueError: if `inputs` are empty or not finite, or the models'
            outputs differ in structure or shape.
        NonFiniteOutputError: (a ValueError) if the reference itself
            produces NaN or inf: nothing can be verified against it.

    Example:

    ```python
    plain = keras_psp.strip(wrapped)
    assert keras_psp.verify(wrapped, plain, x_test[:256]) < 1e-5
    ```
    """
    check_inputs_argument(inputs, "verify", "inputs")
    expected = outputs(reference, inputs, batch_size)
    if not all(np.all(np.isfinite(e)) for e in expected):
        raise non_finite_error(reference, "verify", "these inputs")
    return max_difference(reference, expected, candidate, outputs(candidate, inputs, batch_size))


def compare_outputs(expected: list, actual: list) -> dict:
    """How far `actual` outputs are from `expected` ones, in several measures.

    Args:
        expected: The reference outputs, a list of arrays.
        actual: The outputs to check, a list of arrays of the same shapes.

    Returns:
        A dict with `max_diff` (largest absolute difference), `relative_error`
        (RMS of the differences over RMS of `expected`), `agreement` (the
        lowest fraction of rows with the same argmax over the
        classifier-like outputs, rank 2 with two or more columns; None if
        there are none) and `scale` (largest |expected|). Non-finite
        differences give infinite errors.

    Raises:
        ValueError: if the outputs differ in number or shape.

    Example:

    ```python
    compare_outputs([model.predict(x)], [other.predict(x)])["agreement"]
    ```
    """
    shapes = ([np.shape(a) for a in actual], [np.shape(e) for e in expected])
    if shapes[0] != shapes[1]:
        raise ValueError(f"returns outputs of shapes {shapes[0]}, but the reference {shapes[1]}.")
    e = np.concatenate([np.ravel(x).astype("float64") for x in expected])
    a = np.concatenate([np.ravel(x).astype("float64") for x in actual])
    diff = np.abs(e - a)
    scale = max(float(np.abs(e).max(initial=0.0)), 1e-12)
    if not np.all(np.isfinite(diff)):
        return dict(max_diff=float("inf"), relative_error=float("inf"), agreement=None, scale=scale)
    rms = float(np.sqrt(np.mean(e**2)))
    agreements = [
        float(np.mean(np.argmax(x, -1) == np.argmax(y, -1)))
        for x, y in zip(expected, actual, strict=True)
        if np.ndim(x) == 2 and np.shape(x)[-1] >= 2
    ]
    worst = float(diff.max(initial=0.0))
    return dict(
        max_diff=worst,
        relative_error=float(np.sqrt(np.mean(diff**2))) / rms if rms > 0 else worst,
        agreement=min(agreements) if agreements else None,
        scale=scale,
    )


callable_module(__name__, verify)
