"""Which process am I? Process index and chief for JAX processes and TF_CONFIG.

Two multi-process engines are supported, and the answer comes from whichever
is in use:

- JAX (`jax.distributed.initialize`, e.g. via `keras_psp.distributed.initialize`):
  `jax.process_index()` / `jax.process_count()` once initialized.
- TensorFlow (`tf.distribute.MultiWorkerMirroredStrategy`): the `TF_CONFIG`
  environment variable. The chief is the task of type `"chief"` or, without
  one, `"worker"` 0; an `"evaluator"` is never the chief.

A single process is index 0 of 1 and the chief. Nothing here initializes a
backend: asking before `jax.distributed.initialize` does not spoil it.
"""

from __future__ import annotations

import contextlib
import json
import os

import keras

#: Environment variable of Keras's own multi-process setup (`keras.distribution.initialize`).
KERAS_PROCESS_ID = "KERAS_DISTRIBUTION_PROCESS_ID"
KERAS_NUM_PROCESSES = "KERAS_DISTRIBUTION_NUM_PROCESSES"


def _jax_state() -> tuple[int, int] | None:
    """(index, count) of an initialized JAX multi-process run, else None."""
    if keras.backend.backend() != "jax":
        return None
    import jax

    if not jax.distributed.is_initialized():
        return None
    return jax.process_index(), jax.process_count()


def _tf_config() -> dict:
    text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {text[:200]!r}. Set it as "
                         'json.dumps({"cluster": {"worker": [...]}, "task": {"type": '
                         '"worker", "index": 0}}).') from None
    return config if isinstance(config, dict) else {}


def _tf_state() -> tuple[int, int] | None:
    """(index, count) from TF_CONFIG: chief first, then the workers."""
    config = _tf_config()
    cluster, task = config.get("cluster") or {}, config.get("task") or {}
    if not cluster or not task:
        return None
    chiefs, workers = len(cluster.get("chief", [])), len(cluster.get("worker", []))
    kind, index = task.get("type"), int(task.get("index", 0))
    if kind == "chief":
        position = index
    elif kind == "worker":
        position = chiefs + index
    else:  # evaluator, ps: outside the training processes
        position = -1
    return position, chiefs + workers


def _process() -> tuple[int, int]:
    """(index, count) from JAX, else TF_CONFIG, else the Keras environment variables."""
    for state in (_jax_state(), _tf_state()):
        if state is not None:
            return state
    return int(os.environ.get(KERAS_PROCESS_ID, 0)), int(os.environ.get(KERAS_NUM_PROCESSES, 1))


def process_index() -> int:
    """This process's index among the training processes (0: the chief).

    JAX multi-process runs: `jax.process_index()`. TensorFlow: from
    `TF_CONFIG` (the chief task first, then workers by index); -1 for a task
    outside training (an evaluator). Otherwise Keras's
    `KERAS_DISTRIBUTION_PROCESS_ID`, else 0.

    Example:

    ```python
    if keras_psp.distributed.process_index() == 0:
        print("the chief")
    ```
    """
    return _process()[0]


def process_count() -> int:
    """Number of training processes (1 when not distributed over processes).

    Example:

    ```python
    per_process_batch = global_batch // keras_psp.distributed.process_count()
    ```
    """
    return _process()[1]


def is_chief() -> bool:
    """True in the one process that writes files (logs, plots, checkpoints).

    Example:

    ```python
    if keras_psp.distributed.is_chief():
        model.save("model.keras")
    ```
    """
    return process_index() == 0


@contextlib.contextmanager
def process_local():
    """Inside, Keras works in this process only: no global `keras.distribution`.

    Code that runs in one process only (the chief saving a checkpoint) must
    not start cross-process work, or it waits for the others forever or
    pairs with an unrelated collective of theirs. Under a JAX multi-process
    `DataParallel`, even creating a Keras variable is such work (Keras's
    saving creates one: `model.save_weights` on the chief alone fails with
    "passed to device_put is not the same on each process"). `ChiefOnly`
    and `BackupAndRestore` run their writing inside this. No effect on
    TensorFlow.

    Example:

    ```python
    if keras_psp.distributed.is_chief():
        with keras_psp.distributed.process_local():
            model.save("model.keras")
    ```
    """
    if keras.backend.backend() != "jax":
        yield
        return
    from keras.src.distribution import distribution_lib

    previous = distribution_lib.distribution()
    distribution_lib.set_distribution(None)
    try:
        yield
    finally:
        distribution_lib.set_distribution(previous)
