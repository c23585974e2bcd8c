"""Setting up JAX processes, and one `fit` for every distribution path.

- JAX: `initialize` joins this process to the others (CPU collectives over
  gloo, failure detection by heartbeat); then `keras.distribution.DataParallel`
  and plain `model.fit`.
- TensorFlow, `MultiWorkerMirroredStrategy`: `keras_psp.distributed.train`
  (Keras 3's `fit` fails there, keras-team/keras#20585).
- TensorFlow, any other strategy (`MirroredStrategy`, none): plain `model.fit`.

`fit` picks the right one, so a script runs unchanged on each path.
"""

from __future__ import annotations

import os

import keras
import numpy as np

from keras_psp.distributed.cluster import process_count, process_local
from keras_psp.distributed.loop import lost_worker_error, train

#: Substrings of JAX errors raised when another process died (gloo / coordination service).
_JAX_LOST = ("gloo", "heartbeat", "coordination service", "connection reset",
             "connection refused", "connection closed")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout: int = 30,
               initialization_timeout: int = 300, shutdown_timeout: int = 300,
               cpu_collectives: str | None = "gloo") -> None:
    """Joins this process to a JAX multi-process run (JAX backend).

    Calls `jax.distributed.initialize` with failure detection, and gives all
    processes the same Keras random seed (weights start identical
    everywhere), as `keras.distribution.initialize` does. Then set
    `keras.distribution.DataParallel` and train with `model.fit`. Call it
    first, before anything runs on JAX.

    A process that dies makes the others fail instead of hang: a collective
    in progress fails at once (gloo: "Connection reset by peer"), and JAX's
    coordination service ends every process within `heartbeat_timeout`
    seconds ("Terminating process because the JAX distributed service
    detected fatal errors").

    Args:
        coordinator_address: "host:port" of process 0 (the coordinator), the
            same in every process. None: `KERAS_DISTRIBUTION_JOB_ADDRESSES`
            (its first entry), or JAX's cluster auto-detection.
        num_processes: Number of processes; None:
            `KERAS_DISTRIBUTION_NUM_PROCESSES` or auto-detection.
        process_id: This process's index, 0 being the coordinator; None:
            `KERAS_DISTRIBUTION_PROCESS_ID` or auto-detection.
        heartbeat_timeout: Seconds without a heartbeat before a process
            counts as dead.
        initialization_timeout: Seconds to wait for all processes to join.
        shutdown_timeout: Seconds a finishing process waits for the others.
        cpu_collectives: Collectives for CPU devices ("gloo"; None leaves
            JAX's default, which has no cross-process CPU collectives).

    Example:

    ```python
    keras_psp.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    ```
    """
    if keras.backend.backend() != "jax":
        raise ValueError("keras_psp.distributed.initialize sets up JAX processes; the backend is "
                         f"'{keras.backend.backend()}'. With TensorFlow, set TF_CONFIG and use "
                         "tf.distribute.MultiWorkerMirroredStrategy.")
    import jax

    if jax.distributed.is_initialized():
        raise RuntimeError("keras_psp.distributed.initialize: JAX's distributed system is "
                           "already initialized in this process; call it once.")
    env = os.environ
    if coordinator_address is None and env.get("KERAS_DISTRIBUTION_JOB_ADDRESSES"):
        coordinator_address = env["KERAS_DISTRIBUTION_JOB_ADDRESSES"].split(",")[0]
    if num_processes is None and env.get("KERAS_DISTRIBUTION_NUM_PROCESSES"):
        num_processes = int(env["KERAS_DISTRIBUTION_NUM_PROCESSES"])
    if process_id is None and env.get("KERAS_DISTRIBUTION_PROCESS_ID"):
        process_id = int(env["KERAS_DISTRIBUTION_PROCESS_ID"])
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout, shutdown_timeout_seconds=shutdown_timeout)
    from keras.src.backend.jax.distribution_lib import initialize_rng

    initialize_rng()  # one seed for all processes, unless one was set


def _is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def fit(model: keras.Model, x=None, y=None, *, strategy=None,
        **kwargs) -> keras.callbacks.History:
    """Trains with the right loop for the distribution in use.

    Under `tf.distribute.MultiWorkerMirroredStrategy` (the model's, or
    `strategy`): `keras_psp.distributed.train` (takes `epochs`,
    `steps_per_epoch`, `callbacks`, `verbose`, `initial_epoch`). Otherwise
    `model.fit(x, **kwargs)`: JAX with or without
    `keras.distribution.DataParallel`, TensorFlow without a strategy or with
    `MirroredStrategy`. In a multi-process run, a failure caused by another
    process dying becomes a `WorkerLostError` naming what to do.

    Args:
        model: A compiled Keras model.
        x: The training data (see `model.fit`, or `train` for
            MultiWorkerMirroredStrategy: a `tf.data.Dataset` or
            `dataset_fn(input_context)`).
        y: Targets, for `model.fit` with arrays (`train` takes datasets).
        strategy: A tf.distribute strategy; default: the model's.
        **kwargs: Passed to `model.fit` or `train`.

    Example:

    ```python
    history = keras_psp.distributed.fit(model, dataset, epochs=10, callbacks=callbacks)
    ```
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        chosen = strategy or getattr(model, "_distribute_strategy", None) or (
            tf.distribute.get_strategy())
        if _is_multi_worker(chosen):
            if y is not None:
                raise ValueError("keras_psp.distributed.fit under MultiWorkerMirroredStrategy "
                                 "takes a tf.data.Dataset of (x, y), not arrays x and y: "
                                 "tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch).")
            return train(model, x, strategy=chosen, **kwargs)
        if strategy is not None and strategy is not chosen:
            raise ValueError("keras_psp.distributed.fit: build and compile the model inside "
                             "`strategy.scope()` of the strategy you train with.")
        return model.fit(x, y, **kwargs)
    try:
        return model.fit(x, y, **kwargs)
    except Exception as error:
        text = str(error).lower()
        if process_count() > 1 and any(s in text for s in _JAX_LOST):
            raise lost_worker_error(error, "during fit") from error
        raise


def local_copy(model: keras.Model) -> keras.Model:
    """A copy of `model` whose weights live in this process alone (not compiled).

    After multi-process JAX training under `keras.distribution.DataParallel`,
    the weights are global arrays spanning every process, and running the
    model on local data fails ("Fetching value for `jax.Array` that spans
    non-addressable (non process local) devices is not possible"), so does
    `keras_psp.slim(model, check_inputs=...)`. The copy, built without a
    distribution, slims, verifies, evaluates and exports like any model once
    the distribution is unset (`keras.distribution.set_distribution(None)`:
    else `predict` splits its inputs over the processes again). On
    TensorFlow it is a plain copy outside any strategy. Weights must be
    replicated (DataParallel), not sharded.

    Args:
        model: A functional or Sequential model (PSP-wrapped or not).

    Example:

    ```python
    model.fit(x, y, epochs=10)                  # under DataParallel, in every process
    keras.distribution.set_distribution(None)   # training done
    small = keras_psp.slim(keras_psp.distributed.local_copy(model), check_inputs=x[:256])
    ```
    """
    try:
        weights = [np.asarray(w) for w in model.get_weights()]
    except RuntimeError as error:
        raise ValueError(
            f"local_copy: the weights of model '{model.name}' are sharded across processes "
            f"({error}); only replicated weights (keras.distribution.DataParallel) can be "
            "copied into one process.") from error
    with process_local():
        copy = keras.models.clone_model(model)
        copy.set_weights(weights)
    return copy
