"""A training loop for `tf.distribute.MultiWorkerMirroredStrategy`.

Keras 3's `Model.fit` fails under `MultiWorkerMirroredStrategy` (upstream
keras-team/keras#20585: "ValueError: Attempt to convert a value
(PerReplica:{...}) with an unsupported type (<class
'tensorflow.python.distribute.values.PerReplica'>) to a Tensor"), while a
custom loop with `strategy.run` works. `train` is that loop, doing what `fit`
does for a PSP model: a distributed dataset, the loss averaged over the
*global* batch, the α regularization (and every other `model.losses`) added
once per step, the compiled optimizer, and Keras callbacks with `logs`.
"""

from __future__ import annotations

import keras
from keras.src.utils import io_utils

from keras_psp.distributed.cluster import is_chief, process_count, process_index

#: TensorFlow errors that mean another worker is gone or the collectives broke down.
_LOST_WORKER_ERRORS = ("UnavailableError", "DeadlineExceededError", "CancelledError",
                       "AbortedError")
#: Words of the line that says what happened, in TensorFlow's and JAX's messages.
_TELLING = ("unhealthy", "aborted", "heartbeat", "connection reset", "timed out", "deadline")


class WorkerLostError(RuntimeError):
    """Another training process died or stopped answering; this one cannot go on.

    Restart every process. With `keras_psp.distributed.BackupAndRestore` in
    the callbacks, training resumes after the last finished epoch.
    """


def lost_worker_error(error: Exception, where: str) -> WorkerLostError:
    """A `WorkerLostError` explaining `error` (raised `where`), for `raise ... from error`."""
    lines = [line.strip() for line in str(getattr(error, "message", error)).splitlines()]
    lines = [line for line in lines if line] or [""]
    telling = [line for line in lines if any(k in line.lower() for k in _TELLING)]
    first = (telling or lines)[0][:300]
    return WorkerLostError(
        f"Process {process_index()} of {process_count()} lost contact with another training "
        f"process {where} ({type(error).__name__}: {first}). A worker was killed, crashed or "
        "is unreachable; this process cannot continue. Restart all processes: with "
        "keras_psp.distributed.BackupAndRestore(backup_dir) among the callbacks, training "
        "resumes after the last finished epoch with the saved α and optimizer state.")


def _per_example_loss(model: keras.Model):
    """The compiled loss with `reduction=None`: one value per example."""
    loss = getattr(model, "loss", None)
    if loss is None or isinstance(loss, (list, tuple, dict)):
        raise ValueError(
            f"keras_psp.distributed.train: model '{model.name}' needs one compiled loss for "
            f"its single output (got {loss!r}). Compile with e.g. "
            "loss='sparse_categorical_crossentropy'.")
    loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        config = {**loss.get_config(), "reduction": None}
        return loss.__class__.from_config(config)
    from keras.src.losses.losses import LossFunctionWrapper

    return LossFunctionWrapper(loss, reduction=None)


def _strategy_of(model: keras.Model, strategy):
    import tensorflow as tf

    owner = getattr(model, "_distribute_strategy", None)
    strategy = strategy or owner or tf.distribute.get_strategy()
    if owner is not None and owner is not strategy:
        raise ValueError(
            f"keras_psp.distributed.train: model '{model.name}' was built under another "
            "tf.distribute strategy than the one given. Build and compile the model inside "
            "`strategy.scope()` of the strategy you train with.")
    return strategy


def _distribute(strategy, data):
    """A distributed dataset from a `tf.data.Dataset` (global batches), a
    `dataset_fn(input_context)` (per-replica batches) or a distributed dataset."""
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        return strategy.experimental_distribute_dataset(data)
    if callable(data):
        return strategy.distribute_datasets_from_function(data)
    if isinstance(data, tf.distribute.DistributedDataset):
        return data
    raise TypeError(
        "keras_psp.distributed.train: `x` must be a tf.data.Dataset batched with the global "
        "batch size, a function `dataset_fn(input_context)` returning per-replica batches, "
        f"or a tf.distribute.DistributedDataset; got {type(data).__name__}. Wrap arrays with "
        "tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch_size).")


class _StepFunction:
    """The traced distributed training step; `model.make_train_function(force=True)`
    (which `FlopsBudget` calls after changing the α strength or a threshold)
    is routed here during `train`, so the next step traces it again."""

    def __init__(self, model: keras.Model, strategy):
        self.model, self.strategy = model, strategy
        self.loss_fn = _per_example_loss(model)
        self.traces, self.function = 0, None

    def replica_step(self, data):
        import tensorflow as tf

        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            per_example = tf.cast(self.loss_fn(y, y_pred, sample_weight), tf.float32)
            if per_example.shape.rank and per_example.shape.rank > 1:  # Keras: mean of the rest
                per_example = tf.reduce_mean(per_example, axis=list(range(1, per_example.shape.rank)))
            loss = tf.nn.compute_average_loss(per_example)  # sum / global batch size
            if model.losses:  # α (and kernel) regularizers: once per step in all
                extra = tf.add_n([tf.reduce_sum(tf.cast(v, tf.float32)) for v in model.losses])
                loss += tf.nn.scale_regularization_loss(extra)  # / replicas
            scaled = model.optimizer.scale_loss(loss)  # a LossScaleOptimizer's scale
        variables = model.trainable_variables
        gradients = tape.gradient(scaled, variables)
        model.optimizer.apply_gradients(zip(gradients, variables, strict=True))  # all-reduce
        return loss

    def build(self, force: bool = False):
        import tensorflow as tf

        if self.function is not None and not force:
            return self.function
        strategy = self.strategy

        def step(data):
            per_replica = strategy.run(self.replica_step, args=(data,))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        self.function = tf.function(step, reduce_retracing=True)
        self.traces += 1
        return self.function

    def __call__(self, force: bool = False):  # stands in for model.make_train_function
        return self.build(force)


def train(model: keras.Model, x, *, epochs: int = 1, steps_per_epoch: int | None = None,
          callbacks=None, verbose="auto", initial_epoch: int = 0,
          strategy=None) -> keras.callbacks.History:
    """Trains a compiled model with a custom `strategy.run` loop (TensorFlow backend).

    Meant for `tf.distribute.MultiWorkerMirroredStrategy`, where Keras 3's
    `fit` fails; it works under any strategy (and without one). Per step and
    replica: the compiled loss per example, summed and divided by the global
    batch (`tf.nn.compute_average_loss`), plus the sum of `model.losses` (the
    α regularizers) divided by the number of replicas
    (`tf.nn.scale_regularization_loss`); the optimizer all-reduces (sums) the
    gradients. So one step equals one `fit` step on the global batch (up to
    BatchNormalization, which normalizes per replica unless
    `synchronized=True`).

    Callbacks run in every process, with `logs` holding `loss` (the mean over
    the epoch so far): callbacks that change training (`FlopsBudget`,
    `SeparationMonitor`'s early stop) must decide the same everywhere, and
    they do, since every process holds the same α. Writing is left to the
    chief: `SeparationMonitor` writes its event file only there; wrap other
    writers in `keras_psp.distributed.ChiefOnly` and use
    `keras_psp.distributed.BackupAndRestore` for resumable runs. The progress
    bar shows on the chief only. `model.make_train_function(force=True)`
    (`FlopsBudget` calls it after changing the α strength) retraces the step.
    Compiled metrics are not computed (only `loss`); evaluate afterwards.

    Args:
        model: A compiled Keras model (one output, one loss), built and
            compiled inside `strategy.scope()`.
        x: A `tf.data.Dataset` of `(inputs, targets[, sample_weights])`
            batched with the global batch size (the strategy shards it), a
            function `dataset_fn(input_context)` returning this process's
            per-replica batches (`strategy.distribute_datasets_from_function`),
            or a distributed dataset.
        epochs: Index of the epoch to stop before.
        steps_per_epoch: Steps per epoch, drawn from one iterator over `x`
            kept across epochs (`x` should repeat); None: one pass over `x`
            per epoch. Every process must run the same number of steps.
        callbacks: Keras callbacks.
        verbose: 0 silent, 1 progress bar, 2 one line per epoch; "auto": 1
            on the chief and 0 elsewhere.
        initial_epoch: Epoch to start at (a `BackupAndRestore` overrides it).
        strategy: The strategy; default: the one the model was built under.

    Returns:
        The `keras.callbacks.History`.

    Raises:
        WorkerLostError: another process died or became unreachable.

    Example:

    ```python
    strategy = tf.distribute.MultiWorkerMirroredStrategy()   # reads TF_CONFIG
    with strategy.scope():
        model = keras_psp.wrap(base)
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    keras_psp.distributed.train(model, dataset.repeat(), epochs=30, steps_per_epoch=500,
                                callbacks=[keras_psp.SeparationMonitor(),
                                           keras_psp.distributed.BackupAndRestore("backup")])
    ```
    """
    if keras.backend.backend() != "tensorflow":
        raise ValueError("keras_psp.distributed.train needs the TensorFlow backend; on JAX use "
                         "model.fit under keras.distribution.DataParallel.")
    if getattr(model, "optimizer", None) is None:
        raise ValueError(f"keras_psp.distributed.train: model '{model.name}' is not compiled; "
                         "call model.compile(optimizer, loss) inside strategy.scope() first.")
    strategy = _strategy_of(model, strategy)
    data = _distribute(strategy, x)
    if verbose == "auto":
        verbose = 1 if is_chief() else 0
    steps = _StepFunction(model, strategy)
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    callbacks = keras.callbacks.CallbackList(
        callbacks, add_history=True, add_progbar=bool(verbose) and is_chief(), model=model,
        verbose=verbose, epochs=epochs, steps=steps_per_epoch)
    object.__setattr__(model, "make_train_function", steps)  # FlopsBudget's retrace hook
    try:
        return _run(model, data, steps, callbacks, epochs, steps_per_epoch, initial_epoch)
    finally:
        model.__dict__.pop("make_train_function", None)
        model._initial_epoch = None


def _run(model, data, steps, callbacks, epochs, steps_per_epoch, initial_epoch):
    import tensorflow as tf

    lost = tuple(getattr(tf.errors, name) for name in _LOST_WORKER_ERRORS)
    model.stop_training = False
    model._initial_epoch = None
    callbacks.on_train_begin()
    initial_epoch = model._initial_epoch or initial_epoch  # set by BackupAndRestore
    iterator = iter(data) if steps_per_epoch else None
    epoch_logs, epoch, step = None, initial_epoch, 0
    try:
        for epoch in range(initial_epoch, epochs):
            callbacks.on_epoch_begin(epoch)
            batches = iterator if iterator is not None else iter(data)
            total, logs, step = 0.0, {}, 0
            while steps_per_epoch is None or step < steps_per_epoch:
                try:
                    batch = next(batches)
                except StopIteration:
                    if steps_per_epoch is not None:
                        io_utils.print_msg(
                            f"keras_psp.distributed.train: the data ran out after {step} of "
                            f"{steps_per_epoch} steps in epoch {epoch + 1}; make it repeat "
                            "(dataset.repeat()). Stopping.")
                        model.stop_training = True
                    break
                callbacks.on_train_batch_begin(step)
                total += float(steps.build()(batch))
                logs = {"loss": total / (step + 1)}
                callbacks.on_train_batch_end(step, logs)
                step += 1
                if model.stop_training:
                    break
            epoch_logs = dict(logs)
            callbacks.on_epoch_end(epoch, epoch_logs)
            if model.stop_training:
                break
    except lost as error:
        raise lost_worker_error(error, f"in epoch {epoch + 1}, step {step + 1}") from error
    if epochs > initial_epoch:
        model.optimizer.finalize_variable_values(model.trainable_weights)
    callbacks.on_train_end(logs=epoch_logs)
    return model.history
