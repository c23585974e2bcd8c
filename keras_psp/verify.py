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
