"""Callbacks for training in several processes: only the chief writes files.

Every process runs the same callbacks (those that change training, like
`FlopsBudget`, must act everywhere alike); those that write files must not
write from every process into the same folder. `ChiefOnly` runs any
callback on the chief alone; `BackupAndRestore` restores in every process
but saves from the chief.
"""

from __future__ import annotations

import functools

import keras
from keras.src import utils

from keras_psp.distributed.cluster import is_chief, process_local

_HOOKS = tuple(
    f"on_{stage}_{event}"
    for stage in ("train", "test", "predict", "epoch", "batch", "train_batch", "test_batch",
                  "predict_batch")
    for event in ("begin", "end")
)


class ChiefOnly(keras.callbacks.Callback):
    """Runs `callback` in the chief process only (see `keras_psp.distributed.is_chief`).

    For callbacks that only write (`ModelCheckpoint`, `TensorBoard`,
    `CSVLogger`, plots): in a multi-process run every process calls its
    callbacks, and several writers of one file race. Do not wrap callbacks
    that change training (`FlopsBudget`, `EarlyStopping`, a learning-rate
    schedule): the processes would train apart.

    Args:
        callback: The Keras callback to run on the chief.

    Example:

    ```python
    callbacks = [keras_psp.SeparationMonitor(log_dir="logs/psp"),
                 keras_psp.distributed.ChiefOnly(keras.callbacks.CSVLogger("log.csv"))]
    model.fit(dataset, epochs=10, callbacks=callbacks)
    ```
    """

    def __init__(self, callback: keras.callbacks.Callback):
        super().__init__()
        if not isinstance(callback, keras.callbacks.Callback):
            raise TypeError(f"ChiefOnly wraps a keras.callbacks.Callback, got "
                            f"{type(callback).__name__}.")
        self.callback = callback
        self.async_safe = getattr(callback, "async_safe", False)
        self._chief = None
        for name in _HOOKS:  # only the hooks it has: batch hooks cost async dispatch
            if not utils.is_default(getattr(callback, name)):
                setattr(self, name, functools.partial(self._forward, name))

    @property
    def chief(self) -> bool:
        if self._chief is None:  # asked late: after the processes are set up
            self._chief = is_chief()
        return self._chief

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)

    def _forward(self, name, *args, **kwargs):
        if self.chief:
            with process_local():  # the chief alone: no cross-process work
                getattr(self.callback, name)(*args, **kwargs)


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` for several processes: all restore, the chief saves.

    On `fit` (or `keras_psp.distributed.train`) start, every process loads
    the backup of `backup_dir` if there is one (weights with α, optimizer
    state with momentum, the epoch), so all resume alike; at epoch ends only
    the chief writes it. `backup_dir` must be readable by every process
    (a shared file system on a real cluster).

    Args:
        backup_dir: Folder of the backup; see `keras.callbacks.BackupAndRestore`
            for the other arguments.

    Example:

    ```python
    backup = keras_psp.distributed.BackupAndRestore("/shared/run1/backup")
    model.fit(dataset, epochs=30, callbacks=[backup])   # rerun after a crash: resumes
    ```
    """

    def _save_model(self):
        if is_chief():
            with process_local():  # the chief alone: no cross-process work
                super()._save_model()

    def on_train_end(self, logs=None):
        if is_chief():
            super().on_train_end(logs)
