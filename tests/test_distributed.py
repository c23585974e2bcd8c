"""keras_psp.distributed in one process: who is the chief, chief-only callbacks,
and the custom training loop against `fit`."""

import json
import os

import keras
import numpy as np
import pytest

import keras_psp
from helpers import small_cnn
from keras_psp import distributed
from keras_psp.budget import set_strength
from keras_psp.cloning import psp_layers


def _tf_config(monkeypatch, cluster, kind, index):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster,
                                                "task": {"type": kind, "index": index}}))


@pytest.mark.parametrize("cluster, kind, index, expected", [
    ({"worker": ["a:1", "b:1", "c:1"]}, "worker", 0, (0, 3, True)),
    ({"worker": ["a:1", "b:1", "c:1"]}, "worker", 2, (2, 3, False)),
    ({"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "chief", 0, (0, 3, True)),
    ({"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "worker", 0, (1, 3, False)),
    ({"chief": ["a:1"], "worker": ["b:1"], "evaluator": ["c:1"]}, "evaluator", 0, (-1, 2, False)),
])
def test_process_index_from_tf_config(monkeypatch, cluster, kind, index, expected):
    _tf_config(monkeypatch, cluster, kind, index)
    got = (distributed.process_index(), distributed.process_count(), distributed.is_chief())
    assert got == expected


def test_single_process_is_the_chief(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("KERAS_DISTRIBUTION_PROCESS_ID", raising=False)
    assert (distributed.process_index(), distributed.is_chief()) == (0, True)
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "1")
    assert not distributed.is_chief()


def test_bad_tf_config_names_the_fix(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{cluster: oops")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        distributed.process_index()


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.calls = []

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(epoch)


def _model(strength=0.05):
    model = keras_psp.wrap(small_cnn(), strength=strength)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy")
    return model


@pytest.mark.parametrize("index, runs", [(0, True), (1, False)])
def test_chief_only_runs_the_callback_on_the_chief(monkeypatch, digits, tmp_path, index, runs):
    _tf_config(monkeypatch, {"worker": ["a:1", "b:1"]}, "worker", index)
    (x, y), _ = digits
    recorder = Recorder()
    csv = tmp_path / "log.csv"
    wrapped = distributed.ChiefOnly(recorder)
    # only the hooks the callback has: no batch hook, so no loss of async dispatch
    assert keras.src.utils.is_default(wrapped.on_train_batch_end)
    backup = distributed.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)
    _model().fit(x[:64], y[:64], batch_size=32, epochs=2, verbose=0,
                 callbacks=[wrapped, distributed.ChiefOnly(keras.callbacks.CSVLogger(str(csv))),
                            backup])
    assert recorder.calls == ([0, 1] if runs else [])
    assert csv.exists() == runs
    assert os.path.exists(tmp_path / "backup" / "training_metadata.json") == runs


def test_backup_restores_in_every_process(monkeypatch, digits, tmp_path):
    """A non-chief writes no backup, but loads the chief's: all resume alike."""
    (x, y), _ = digits
    _tf_config(monkeypatch, {"worker": ["a:1", "b:1"]}, "worker", 0)
    chief = _model()
    chief.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0,
              callbacks=[distributed.BackupAndRestore(str(tmp_path), delete_checkpoint=False)])
    _tf_config(monkeypatch, {"worker": ["a:1", "b:1"]}, "worker", 1)
    worker = _model()
    start = {}

    class Peek(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            start["alpha"] = psp_layers(self.model)[1].alpha.numpy().copy()

    history = worker.fit(x[:64], y[:64], batch_size=32, epochs=2, verbose=0,
                         callbacks=[distributed.BackupAndRestore(str(tmp_path)), Peek()])
    np.testing.assert_array_equal(start["alpha"], psp_layers(chief)[1].alpha.numpy())
    assert history.epoch == [1]  # resumed after epoch 1


def test_local_copy_is_an_equal_plain_model(digits):
    (x, _), _ = digits
    model = _model()
    copy = distributed.local_copy(model)
    assert copy is not model and len(psp_layers(copy)) == len(psp_layers(model))
    np.testing.assert_array_equal(np.asarray(copy(x[:8])), np.asarray(model(x[:8])))


# --- the custom loop (TensorFlow) -------------------------------------------------


class Tighten(keras.callbacks.Callback):
    """At epoch 1, raises the α strength and the thresholds, as FlopsBudget
    does; a threshold is a Python float in the trace, so it then calls
    `make_train_function(force=True)` (the step must be traced again)."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            set_strength(self.model, 0.5)
            for layer in psp_layers(self.model):
                layer.threshold = 0.9
            self.model.make_train_function(force=True)


def _train_both(digits, **kwargs):
    import tensorflow as tf

    (x, y), _ = digits
    x, y = x[:128], y[:128]
    keras.utils.set_random_seed(0)
    reference = _model()
    keras.utils.set_random_seed(0)
    model = _model()
    ref_history = reference.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0,
                                callbacks=[Tighten()])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    history = distributed.train(model, dataset, epochs=3, callbacks=[Tighten()], **kwargs)
    return reference, model, ref_history, history


@pytest.mark.tensorflow_only
def test_train_equals_fit_in_one_process(digits):
    """Same steps, loss (with the α regularization) and strength change as `fit`.

    Tolerance 1e-5 on α (measured: 0); without the retrace after the
    threshold change α differs by 5e-3, without the α regularization by 1.1."""
    reference, model, ref_history, history = _train_both(digits, verbose=0)
    for a, b in zip(psp_layers(model), psp_layers(reference), strict=True):
        np.testing.assert_allclose(a.alpha.numpy(), b.alpha.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(history.history["loss"], ref_history.history["loss"], rtol=1e-5)
    assert history.epoch == [0, 1, 2]
    assert "make_train_function" not in model.__dict__  # the retrace hook is removed


@pytest.mark.tensorflow_only
def test_train_logs_and_stops_like_fit(digits):
    import tensorflow as tf

    (x, y), _ = digits
    model = _model()
    monitor = keras_psp.SeparationMonitor(verbose=0)

    class StopAfterOne(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.logs = dict(logs)
            self.model.stop_training = True

    stop = StopAfterOne()
    dataset = tf.data.Dataset.from_tensor_slices((x[:64], y[:64])).batch(16).repeat()
    history = distributed.train(model, dataset, epochs=5, steps_per_epoch=2, verbose=0,
                                callbacks=[monitor, stop])
    assert history.epoch == [0] and len(monitor.history) == 1
    assert {"loss", "psp_cut", "psp_separation", "psp_flops"} <= set(stop.logs)


@pytest.mark.tensorflow_only
def test_train_errors_name_the_fix(digits):
    import tensorflow as tf

    (x, y), _ = digits
    model = keras_psp.wrap(small_cnn())
    with pytest.raises(ValueError, match="is not compiled"):
        distributed.train(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(TypeError, match="from_tensor_slices"):
        distributed.train(model, x)
    lost = distributed.loop.lost_worker_error(
        tf.errors.UnavailableError(None, None, "Collective ops is aborted"), "in epoch 2")
    assert "Restart all processes" in str(lost) and "UnavailableError" in str(lost)
