"""`prune`: a trained model in, a physically smaller trained model out, in one call."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras.src.utils import io_utils

from keras_psp.budget import FlopsBudget
from keras_psp.callbacks import SeparationMonitor
from keras_psp.cloning import check_graph_model, wrap
from keras_psp.flops import count_flops
from keras_psp.recalibration import _is_arrays
from keras_psp.surgery.slim import slim

#: Examples of array data used to re-estimate BatchNormalization statistics.
RECALIBRATION_EXAMPLES = 4096


def _length(x, batch_size: int) -> int | None:
    """Steps per epoch of `x`, when it can be known up front."""
    if _is_arrays(x):
        return math.ceil(int(np.shape(keras.tree.flatten(x)[0])[0]) / batch_size)
    cardinality = getattr(x, "cardinality", None)
    if cardinality is not None:
        count = int(keras.ops.convert_to_numpy(cardinality()))
        return count if count > 0 else None
    return len(x) if hasattr(x, "__len__") else None


def _compile_args(model, loss, metrics) -> tuple:
    """The loss and metrics to train with: given ones, else the model's compiled ones."""
    if loss is not None:
        return loss, metrics
    if not getattr(model, "compiled", False):
        raise ValueError(
            f"prune: model '{model.name}' is not compiled, so there is no loss to fine-tune "
            "with. Pass loss=... (and metrics=...), or compile the model first."
        )
    config = model.get_compile_config()
    loss = keras.saving.deserialize_keras_object(config["loss"])
    if metrics is None and config.get("metrics") is not None:
        metrics = keras.saving.deserialize_keras_object(config["metrics"])
    return loss, metrics


def prune(model: keras.Model, x, y=None, *, target: float = 0.5, epochs: int = 3,
          structure: str = "channel", batch_size: int = 32, validation_data=None,
          loss=None, metrics=None, optimizer=None, learning_rate: float = 0.03,
          allocation: str = "uniform", callbacks=None, verbose: int | str = "auto",
          input_shape=None, **psp_kwargs) -> keras.Model:
    """Prunes a trained model to `target` of its FLOPs in `epochs` epochs of fine-tuning.

    The counterpart of tfmot's `prune_low_magnitude` + `strip_pruning`, with
    structures instead of zeros: `wrap` gives every structure an α with the
    default scale-invariant penalty; `fit` trains for `epochs` epochs while
    `FlopsBudget` cuts the lowest-ranked structures on a schedule (the target
    is reached half-way, the second half fine-tunes the final network, and
    BatchNormalization statistics are re-estimated before each validation and
    at the end); `slim` then rebuilds the physically smaller model, verified
    against the pruned one, so it has those fresh statistics too.
    The input model is not modified.

    Progress: Keras's progress bar, one line per epoch from `FlopsBudget`
    (FLOPs, goal, structures cut, validation accuracy), and a last line with
    the FLOPs and parameters before → after (and the validation accuracy
    before → after, with `validation_data`).

    Args:
        model: A trained Sequential or functional model.
        x, y: Training data, as `model.fit` takes them.
        target: FLOPs of the result over the model's, in (0, 1].
        epochs: Fine-tuning epochs (the cut is done half-way).
        structure: The structure of every α (see `keras_psp.PSP`).
        batch_size: Batch size for array data.
        validation_data: As `model.fit` takes it (recommended: the logged
            validation accuracy is the pruned model's real one).
        loss, metrics: To fine-tune with; None: the model's compiled ones.
        optimizer: None: SGD with momentum 0.9 and a cosine decay from
            `learning_rate` over the fine-tuning.
        learning_rate: Peak learning rate of the default optimizer.
        allocation: "uniform" or "global" (see `keras_psp.prune_to`).
        callbacks: More Keras callbacks.
        verbose: `fit`'s verbosity; 0 is silent.
        input_shape: For a model whose inputs have sizes left open (token
            sequences): the size of one example to count FLOPs at, as
            `keras_psp.count_flops` takes it.
        **psp_kwargs: Passed on to `wrap` (`regularizer`, `strength`, `layers`,
            `composites`).

    Returns:
        The slim model: plain Keras layers, fine-tuned, BN statistics
        re-estimated; it loads without keras_psp.

    Raises:
        ValueError: for a target that cutting cannot reach (before any
            training), an uncompiled model without `loss`, bad arguments.

    Example:

    ```python
    small = keras_psp.prune(trained, x_train, y_train, target=0.5, epochs=3,
                            validation_data=(x_val, y_val))
    small.save("small.keras")
    ```
    """
    check_graph_model(model, "prune")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"prune: `epochs` must be a positive integer, got {epochs!r}.")
    if not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ValueError(f"prune: `target` must be in (0, 1], got {target!r}.")
    loss, metrics = _compile_args(model, loss, metrics)
    wrapped = wrap(model, structure=structure, **psp_kwargs)
    if optimizer is None:
        steps = _length(x, batch_size)
        rate = (keras.optimizers.schedules.CosineDecay(learning_rate, epochs * steps)
                if steps else learning_rate)
        optimizer = keras.optimizers.SGD(rate, momentum=0.9)
    wrapped.compile(optimizer=optimizer, loss=loss, metrics=metrics)
    if _is_arrays(x):
        calibration = keras.tree.map_structure(lambda a: a[:RECALIBRATION_EXAMPLES], x)
    else:
        calibration = x
    budget = FlopsBudget(target, end=0.5, allocation=allocation, recalibrate=calibration,
                         verbose=0 if verbose == 0 else 1, input_shape=input_shape)
    before = None  # the unpruned model's figures: every α is 1 yet
    if validation_data is not None and verbose != 0:
        before = wrapped.evaluate(*_split(validation_data), verbose=0, return_dict=True)
    wrapped.fit(x, y, batch_size=batch_size if _is_arrays(x) else None, epochs=epochs,
                validation_data=validation_data, verbose=verbose,
                callbacks=[SeparationMonitor(verbose=0, input_shape=input_shape), budget,
                           *(callbacks or [])])
    check = keras.tree.map_structure(lambda a: a[:64], x) if _is_arrays(x) else None
    small = slim(wrapped, check_inputs=check)  # BN statistics: FlopsBudget's, at train end
    small.compile(optimizer=keras.optimizers.SGD(), loss=loss, metrics=metrics)
    if verbose != 0:
        before_flops = count_flops(model, input_shape=input_shape)
        after_flops = count_flops(small, input_shape=input_shape)
        line = (f"prune: FLOPs {before_flops:,} -> {after_flops:,} "
                f"({after_flops / max(before_flops, 1):.3f}), parameters "
                f"{model.count_params():,} -> {small.count_params():,}")
        if before is not None:
            after = small.evaluate(*_split(validation_data), verbose=0, return_dict=True)
            line += "; validation " + ", ".join(
                f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in before if k in after)
        io_utils.print_msg(line)
    return small


def _split(validation_data) -> tuple:
    """`(x, y)` arguments of `evaluate` from `fit`'s `validation_data`."""
    if isinstance(validation_data, tuple):
        return validation_data[:2]
    return (validation_data,)
