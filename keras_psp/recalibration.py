"""`recalibrate`: re-estimate BatchNormalization statistics from data.

A BatchNormalization layer normalizes with the statistics of each batch in
training, and with its moving averages at inference. Pruning changes what
flows into it (cut channels, α that shrink), and the moving averages follow
only slowly (momentum 0.99: hundreds of steps), so a freshly pruned model can
be far worse in inference mode than in training. Re-estimating the averages
on some training data fixes that exactly and cheaply: forward passes only,
no gradient, no weight changes.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np

from keras_psp.cloning import iter_layers


def _is_arrays(data) -> bool:
    """An array, or a list/dict/tuple of them (not a dataset or generator)."""
    if isinstance(data, (list, tuple, dict)):
        return all(_is_arrays(item) for item in keras.tree.flatten(data))
    return isinstance(data, np.ndarray) or keras.ops.is_tensor(data)


def _batches(data, batch_size: int, steps: int | None, inputs: int = 1):
    """Input batches of `data`: arrays (an `(x, y)` tuple: its x) are sliced;
    a `tf.data.Dataset` or other iterable gives its elements (`(x, y, ...)`
    elements: their x). For a model with one input (`inputs`), a list is a
    list of batches: it cannot be that model's inputs."""
    if isinstance(data, list) and inputs == 1:
        pass
    elif _is_arrays(data):
        x = data[0] if isinstance(data, tuple) else data
        count = int(np.shape(keras.tree.flatten(x)[0])[0])
        starts = range(0, count, batch_size)
        for n, start in enumerate(starts):
            if steps is not None and n >= steps:
                return
            yield keras.tree.map_structure(lambda a, s=start: a[s : s + batch_size], x)
        return
    for n, element in enumerate(data):
        if steps is not None and n >= steps:
            return
        yield element[0] if isinstance(element, tuple) else element


def _input_count(model) -> int:
    """How many inputs `model` takes (1 when it is not built yet)."""
    try:
        return len(model.inputs or [None])
    except (AttributeError, ValueError):
        return 1


def batchnorm_layers(model: keras.Model) -> list:
    """The `BatchNormalization` layers of `model`, nested models included."""
    return [layer for layer in iter_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization)]


def recalibrate(model: keras.Model, data, steps: int | None = None, batch_size: int = 256,
                verbose: int = 0) -> int:
    """Re-estimates every BatchNormalization's moving statistics on `data`, in place.

    The model runs forward in training mode (each BN normalizes with its
    batch's statistics, as in training) on up to `steps` batches; every BN's
    moving mean and variance are then set to the mean and variance of its
    inputs over all those examples: with one batch, exactly that batch's
    statistics; with several, the statistics of their union (each batch's
    mean and variance, weighted by its size). Nothing else changes: no
    gradient, no weight update, no optimizer step.

    Args:
        model: A Keras model (PSP-wrapped, stripped or slim).
        data: Training inputs: an array (a list or dict of arrays for a
            model with several inputs), an `(x, y)` tuple of them, a
            `tf.data.Dataset`, or an iterable of batches such as a list of
            arrays for a one-input model (labels are ignored).
        steps: Largest number of batches to use; None: all of `data`.
        batch_size: Batch size when `data` is arrays (larger batches give
            the training-mode statistics more examples each).
        verbose: 1 prints one line when done.

    Returns:
        The number of examples used.

    Raises:
        ValueError: if `data` holds no examples.

    Example:

    ```python
    small = keras_psp.slim(wrapped)
    keras_psp.recalibrate(small, x_train[:4096])
    small.evaluate(x_test, y_test)
    ```
    """
    layers = batchnorm_layers(model)
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"recalibrate: `steps` must be a positive integer or None, got {steps!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"recalibrate: `batch_size` must be a positive integer, got {batch_size!r}.")
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    sums = [[0.0, 0.0] for _ in layers]  # Σ n·mean, Σ n·(variance + mean²)
    count = 0
    forward = _training_forward(model)
    try:
        for layer in layers:
            layer.momentum = 0.0  # the moving statistics become each batch's
        for batch in _batches(data, batch_size, steps, _input_count(model)):
            n = int(np.shape(keras.tree.flatten(batch)[0])[0])
            if n == 0:
                continue
            forward(batch)
            for layer, acc in zip(layers, sums, strict=True):
                mean = np.asarray(keras.ops.convert_to_numpy(layer.moving_mean), "float64")
                var = np.asarray(keras.ops.convert_to_numpy(layer.moving_variance), "float64")
                acc[0] = acc[0] + n * mean
                acc[1] = acc[1] + n * (var + mean**2)
            count += n
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    if count == 0:
        raise ValueError("recalibrate: `data` holds no examples; pass training inputs.")
    for layer, (first, second) in zip(layers, sums, strict=True):
        mean = first / count
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        variance = np.maximum(second / count - mean**2, 0.0)
        layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
    if verbose:
        print(f"recalibrate: {len(layers)} BatchNormalization layer(s) of '{model.name}' "
              f"re-estimated on {count} examples", flush=True)
    return count


_TRACED = weakref.WeakKeyDictionary()


def _training_forward(model):
    """`model(x, training=True)` for its side effects on BN statistics; traced
    once per model on TensorFlow (the trace bakes in momentum 0, which
    `recalibrate` always sets before calling it)."""
    if keras.backend.backend() != "tensorflow":
        return lambda x: model(x, training=True)
    if model not in _TRACED:
        import tensorflow as tf

        fn = tf.function(lambda x: model(x, training=True), autograph=False,
                         reduce_retracing=True)
        _TRACED[model] = lambda x: fn(keras.tree.map_structure(tf.convert_to_tensor, x))
    return _TRACED[model]
