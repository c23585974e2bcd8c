"""Numerical comparison of two models on the same inputs."""

from __future__ import annotations

import keras
import numpy as np


def verify(reference: keras.Model, candidate: keras.Model, inputs, batch_size: int = 256) -> float:
    """Returns the largest absolute difference between two models' outputs.

    Both models run in inference mode on `inputs`. Use it to check that a
    stripped, slimmed or exported model still computes what the original
    computes.

    Args:
        reference: The model whose outputs are taken as correct.
        candidate: The model to check.
        inputs: What both models accept: an array, or a list/dict of arrays.
        batch_size: Batch size for `predict`.

    Raises:
        ValueError: if the models' outputs differ in structure or shape.

    Example:

    ```python
    plain = keras_psp.strip(wrapped)
    assert keras_psp.verify(wrapped, plain, x_test[:256]) < 1e-5
    ```
    """
    expected = keras.tree.flatten(reference.predict(inputs, batch_size=batch_size, verbose=0))
    actual = keras.tree.flatten(candidate.predict(inputs, batch_size=batch_size, verbose=0))
    if len(expected) != len(actual):
        raise ValueError(
            f"Model '{candidate.name}' has {len(actual)} output(s), but "
            f"'{reference.name}' has {len(expected)}: they are not comparable."
        )
    worst = 0.0
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        e, a = np.asarray(e, "float64"), np.asarray(a, "float64")
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
