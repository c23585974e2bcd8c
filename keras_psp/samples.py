"""Example inputs for `keras_psp.export`, from whatever form the user has.

Calibration and verification data may come as a numpy array, a list or dict
of arrays (models with several inputs), a `tf.data.Dataset`, a generator, or
a callable returning an iterable (the form `TFLiteConverter` takes). This
module turns any of them into one array per model input, examples stacked
along the batch axis, in the order of `keras_psp.runtimes.input_specs`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np


def _rank_error(name: str, shape: tuple, got: tuple, what: str) -> ValueError:
    return ValueError(
        f"{what}: input '{name}' expects examples of shape {shape[1:]} (or batches "
        f"of them), got an array of shape {got}."
    )


def _per_input(element, specs, what: str) -> list[np.ndarray]:
    """One element of the user's data as a list of batched arrays, one per input.

    A dict is matched by input name. For a single-input model, a tuple or
    list holds the features first, so `(x, y)` pairs from a training pipeline
    and the `[x]` lists of TFLite's representative datasets both work. For
    several inputs, a tuple/list of that many arrays is the inputs in order,
    and otherwise its first item is.
    """
    names = [name for name, _, _ in specs]
    if isinstance(element, dict):
        missing = [n for n in names if n not in element]
        if missing:
            raise ValueError(
                f"{what}: a dict element has keys {sorted(element)}, but the model's "
                f"inputs are named {names} (missing {missing})."
            )
        arrays = [element[n] for n in names]
    elif isinstance(element, (tuple, list)):
        if not element:
            raise ValueError(f"{what}: got an empty tuple/list where inputs were expected.")
        if len(specs) == 1:
            return _per_input(element[0], specs, what)
        if len(element) == len(specs) and not any(
            isinstance(e, (tuple, list, dict)) for e in element
        ):
            arrays = list(element)
        else:
            return _per_input(element[0], specs, what)
    else:
        if len(specs) != 1:
            raise ValueError(
                f"{what}: the model has {len(specs)} inputs {names}; give each "
                "element as a list or dict of arrays."
            )
        arrays = [element]
    batched = []
    for (name, shape, dtype), a in zip(specs, arrays, strict=True):
        a = original = np.asarray(a)
        if a.ndim == len(shape) - 1:
            a = a[None]  # a single example
        if a.ndim != len(shape) or any(
            s is not None and s != g for s, g in zip(shape[1:], a.shape[1:], strict=True)
        ):
            raise _rank_error(name, shape, original.shape, what)
        batched.append(a.astype(dtype, copy=False))
    return batched


def _elements(data, n_inputs: int) -> Iterable:
    """The elements of `data`: one batch for an array (a list or dict of
    arrays with several inputs), else what iterating yields."""
    arrays = isinstance(data, (tuple, list)) and data and isinstance(data[0], np.ndarray)
    if isinstance(data, (np.ndarray, dict)) or (arrays and n_inputs > 1):
        return [data]
    if hasattr(data, "as_numpy_iterator"):  # tf.data.Dataset
        return data.as_numpy_iterator()
    if callable(data):
        return data()
    if isinstance(data, Iterable):
        return data
    return [data]


def collect(data, specs, limit: int | None = None, what: str = "data") -> list[np.ndarray]:
    """Stacks the examples of `data` into one array per input.

    Args:
        data: An array (a batch of examples), a list/dict of arrays (one per
            input; for a single input, a list of arrays is a list of
            batches), a `tf.data.Dataset` (batched or not; `(x, y)` elements
            are fine), a generator or iterable of such elements, or a
            callable returning one.
        specs: `(name, shape, dtype)` of each input, shape with the batch
            dimension first (`keras_psp.runtimes.input_specs(model)`).
        limit: Stop after this many examples (None: all of them).
        what: How error messages name the data (e.g. "representative_data").

    Returns:
        A list with one array per input, all with the same first dimension.

    Raises:
        ValueError: if the data holds no example or does not fit the inputs.

    Example:

    ```python
    [x] = collect(dataset.map(lambda x, y: x), input_specs(model), limit=256)
    ```
    """
    chunks: list[list[np.ndarray]] = []
    count = 0
    for element in _elements(data, len(specs)):
        arrays = _per_input(element, specs, what)
        lengths = {len(a) for a in arrays}
        if len(lengths) != 1:
            raise ValueError(f"{what}: the inputs of one element differ in batch size {lengths}.")
        chunks.append(arrays)
        count += lengths.pop()
        if limit is not None and count >= limit:
            break
    if not count:
        raise ValueError(f"{what} holds no example: give at least one input example.")
    stacked = [np.concatenate(parts) for parts in zip(*chunks, strict=True)]
    return [a[:limit] for a in stacked] if limit is not None else stacked


def examples(arrays: list[np.ndarray], names: list[str]) -> Callable[[], Iterable[dict]]:
    """A TFLite representative dataset: each example alone, as a batch of 1,
    in a dict keyed by the signature's input names."""

    def generate():
        for i in range(len(arrays[0])):
            yield {name: a[i : i + 1] for name, a in zip(names, arrays, strict=True)}

    return generate
