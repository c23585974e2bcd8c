"""PSP inside tf.distribute.MirroredStrategy on two logical CPU devices.

Logical devices must be configured before TensorFlow runs anything, so the
check runs in a fresh process.
"""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from helpers import small_cnn
    from keras_psp import strip, wrap
    from keras_psp.cloning import psp_layers
    from keras_psp.datasets import load_digits

    (x, y), _ = load_digits()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        model = wrap(small_cnn(), strength=0.05)
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                      "sparse_categorical_crossentropy", metrics=["accuracy"])
    alpha = psp_layers(model)[1].alpha
    mirrored = alpha.value  # the backend variable behind keras.Variable
    assert isinstance(mirrored, tf.distribute.DistributedValues), type(mirrored)
    assert len(mirrored.values) == 2
    before = np.array(alpha.numpy())
    model.fit(x[:512], y[:512], batch_size=64, epochs=2, verbose=0)
    after = np.array(alpha.numpy())
    assert np.all(np.isfinite(after)) and not np.allclose(after, before)
    replicas = [np.array(v.numpy()) for v in mirrored.values]
    np.testing.assert_array_equal(replicas[0], replicas[1])
    plain = strip(model)
    # both called directly (not split over replicas), so the same kernels run
    np.testing.assert_allclose(np.asarray(plain(x[:64], training=False)),
                               np.asarray(model(x[:64], training=False)), rtol=1e-5, atol=1e-6)
    distributed = model.predict(x[:64], verbose=0)  # split over the two replicas
    np.testing.assert_allclose(distributed, np.asarray(plain(x[:64])), rtol=1e-3, atol=1e-5)
    print("MIRRORED-OK", psp_layers(model)[1].mask().sum())
    """
)


@pytest.mark.tensorflow_only
def test_training_under_mirrored_strategy(tmp_path):
    tests_dir = __file__.rsplit("/", 1)[0]
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=tests_dir,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "KERAS_BACKEND": "tensorflow"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MIRRORED-OK" in result.stdout
